"""Turn a run's JSON into a summary table, markdown, a PNG chart, and target verdicts.

Everything here works from the JSON written to ``results.json`` (``BenchResult.to_json()``), so a
report can be re-rendered later: ``python -m fastckpt.bench.report results.json [OUT_DIR]``.

Per loader and scenario: the median of the successful runs' seconds, GB/s from it (GB = 1e9
bytes of tensor data), the spread (min-max seconds), the ratio to the scenario's ceiling, the
speed-up over safetensors ``load_file`` measured in the same run, the peak RSS increase and
peak device memory, and the bitwise verdict.

Ceilings per scenario: cold -> the best sequential disk read (O_DIRECT or buffered, whichever is
faster); warm and tmpfs -> page cache -> host memory on CPU, and on a GPU the slower of page
cache -> pinned host and pinned host -> GPU (a pipeline cannot beat its slowest stage).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any

from fastckpt.bench.common import median
from fastckpt.rules.units import format_bytes

BASELINES = ("safetensors", "torch-mmap", "runai", "fastsafetensors", "instanttensor")
FASTCKPT_LOADERS = ("fastckpt", "fastckpt-st")


@dataclass
class Row:
    scenario: str
    loader: str
    label: str
    runs: int
    ok_runs: int
    median_s: float | None
    min_s: float | None
    max_s: float | None
    gbps: float | None
    ceiling: str
    ceiling_gbps: float | None
    of_ceiling: float | None
    vs_safetensors: float | None
    rss_delta_bytes: int | None
    peak_rss_bytes: int | None
    peak_device_bytes: int | None
    bitwise: str  # OK | FAIL | n/a
    path_taken: str
    error: str


def ceiling_summary(ceilings: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    by: dict[str, list[dict[str, Any]]] = {}
    for c in ceilings:
        by.setdefault(c["name"], []).append(c)
    out: dict[str, dict[str, Any]] = {}
    for name, samples in by.items():
        rates = [s["gbps"] for s in samples if s.get("gbps")]
        if not rates:
            continue
        out[name] = {
            "median_gbps": median(rates),
            "min_gbps": min(rates),
            "max_gbps": max(rates),
            "runs": len(rates),
            "method": samples[-1]["method"],
            "note": samples[-1].get("note", ""),
        }
    return out


def scenario_ceiling(
    scenario: str, device: str, summary: dict[str, dict[str, Any]]
) -> tuple[str, float | None]:
    """(description, GB/s) of the ceiling a loader in ``scenario`` is compared with."""

    def med(name: str) -> float | None:
        entry = summary.get(name)
        return float(entry["median_gbps"]) if entry else None

    if scenario == "cold":
        options = [(n, med(n)) for n in ("disk_direct", "disk_buffered")]
        present = [(n, v) for n, v in options if v is not None]
        if not present:
            return "disk (not measured)", None
        name, value = max(present, key=lambda nv: nv[1] or 0.0)
        return {"disk_direct": "disk O_DIRECT", "disk_buffered": "disk buffered"}[name], value
    host = med("pagecache_to_host")
    if device == "cpu":
        return "page cache -> host", host
    h2d = med("pinned_to_gpu")
    if host is None or h2d is None:
        return "page cache -> pinned -> GPU (not measured)", host or h2d
    if host <= h2d:
        return "page cache -> pinned", host
    return "pinned -> GPU", h2d


def summarize(data: dict[str, Any]) -> list[Row]:
    device = data["options"]["device"]
    nbytes = int(data["checkpoint"]["nbytes"])
    summary = ceiling_summary(data.get("ceilings", []))
    labels = {n: info.get("label", n) for n, info in data.get("loaders", {}).items()}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for m in data.get("measurements", []):
        groups.setdefault((m["scenario"], m["loader"]), []).append(m)
    scen_order = list(data["options"]["scenarios"])
    load_order = list(data["options"]["loaders"])
    rows: list[Row] = []
    medians: dict[tuple[str, str], float] = {}
    for (sc, ld), ms in groups.items():
        secs = [m["seconds"] for m in ms if m["ok"] and m["seconds"]]
        if secs:
            medians[(sc, ld)] = median(secs)
    for (sc, ld), ms in sorted(
        groups.items(),
        key=lambda kv: (
            scen_order.index(kv[0][0]) if kv[0][0] in scen_order else 99,
            load_order.index(kv[0][1]) if kv[0][1] in load_order else 99,
        ),
    ):
        ok = [m for m in ms if m["ok"] and m["seconds"]]
        secs = [m["seconds"] for m in ok]
        med = medians.get((sc, ld))
        gbps = nbytes / med / 1e9 if med else None
        cname, cval = scenario_ceiling(sc, device, summary)
        st = medians.get((sc, "safetensors"))
        checked = [m["bitwise"] for m in ms if m.get("bitwise") is not None]
        bitwise = "n/a" if not checked else ("OK" if all(checked) else "FAIL")
        rss = [m["rss_delta_bytes"] for m in ms if m.get("rss_delta_bytes") is not None]
        peak = [m["peak_rss_bytes"] for m in ms if m.get("peak_rss_bytes") is not None]
        dev = [
            max(m.get("peak_device_bytes") or 0, m.get("device_used_bytes") or 0)
            for m in ms
            if m.get("peak_device_bytes") is not None or m.get("device_used_bytes") is not None
        ]
        paths = sorted(
            {
                str(m["extra"]["load_stats"].get("path_taken"))
                for m in ok
                if isinstance(m.get("extra"), dict) and m["extra"].get("load_stats")
            }
        )
        errors = sorted({m["error"] for m in ms if not m["ok"] and m.get("error")})
        mismatches = sorted({m["mismatch"] for m in ms if m.get("mismatch")})
        rows.append(
            Row(
                scenario=sc,
                loader=ld,
                label=labels.get(ld, ld),
                runs=len(ms),
                ok_runs=len(ok),
                median_s=med,
                min_s=min(secs) if secs else None,
                max_s=max(secs) if secs else None,
                gbps=gbps,
                ceiling=cname,
                ceiling_gbps=cval,
                of_ceiling=(gbps / cval) if gbps and cval else None,
                vs_safetensors=(st / med) if st and med else None,
                rss_delta_bytes=max(rss) if rss else None,
                peak_rss_bytes=max(peak) if peak else None,
                peak_device_bytes=max(dev) if dev else None,
                bitwise=bitwise,
                path_taken=", ".join(paths),
                error="; ".join(errors + mismatches),
            )
        )
    return rows


def targets(data: dict[str, Any], rows: list[Row]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for each fastckpt row against the project's benchmark brief."""
    device = data["options"]["device"]
    by = {(r.scenario, r.loader): r for r in rows}
    out: list[tuple[str, str, str]] = []

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "MISSED")

    for ld in FASTCKPT_LOADERS:
        cold, warm, tmpfs = by.get(("cold", ld)), by.get(("warm", ld)), by.get(("tmpfs", ld))
        if device == "cpu":
            if cold and cold.gbps:
                ok = cold.of_ceiling is not None and cold.of_ceiling >= 0.90
                out.append(
                    (
                        f"{ld} cold >= 90% of best sequential read",
                        _pct(cold.of_ceiling),
                        verdict(ok if cold.of_ceiling is not None else None),
                    )
                )
                st = by.get(("cold", "safetensors"))
                if st and st.median_s and cold.median_s:
                    out.append(
                        (
                            f"{ld} cold not slower than safetensors",
                            f"{cold.median_s:.3f} s vs {st.median_s:.3f} s",
                            verdict(cold.median_s <= st.median_s),
                        )
                    )
            if warm and warm.median_s:
                base = [
                    by[("warm", b)]
                    for b in BASELINES
                    if ("warm", b) in by and by[("warm", b)].median_s
                ]
                if base:
                    best = min(base, key=lambda r: r.median_s or float("inf"))
                    assert best.median_s is not None
                    out.append(
                        (
                            f"{ld} warm no slower than the fastest baseline ({best.loader})",
                            f"{warm.median_s:.3f} s vs {best.median_s:.3f} s",
                            verdict(warm.median_s <= best.median_s),
                        )
                    )
        else:
            if cold and cold.gbps:
                direct = ceiling_summary(data.get("ceilings", [])).get("disk_direct")
                if direct:
                    ratio = cold.gbps / direct["median_gbps"]
                    out.append(
                        (f"{ld} cold >= 93% of O_DIRECT disk", _pct(ratio), verdict(ratio >= 0.93))
                    )
            if warm and warm.gbps:
                out.append(
                    (f"{ld} warm >= 26 GB/s", f"{warm.gbps:.1f} GB/s", verdict(warm.gbps >= 26))
                )
            if tmpfs and tmpfs.gbps:
                out.append(
                    (f"{ld} tmpfs >= 45 GB/s", f"{tmpfs.gbps:.1f} GB/s", verdict(tmpfs.gbps >= 45))
                )
                it = by.get(("tmpfs", "instanttensor"))
                if it and it.median_s and tmpfs.median_s:
                    out.append(
                        (
                            f"{ld} tmpfs faster than InstantTensor",
                            f"{tmpfs.median_s:.3f} s vs {it.median_s:.3f} s",
                            verdict(tmpfs.median_s < it.median_s),
                        )
                    )
        for r in (cold, warm, tmpfs):
            if r is not None and r.bitwise != "n/a":
                out.append(
                    (f"{ld} {r.scenario} bitwise equal", r.bitwise, verdict(r.bitwise == "OK"))
                )
    return out


def _clip(text: str, limit: int = 160) -> str:
    """``text`` cut to at most ``limit`` characters at a word boundary, never mid-word."""
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit - 1)
    return text[: cut if cut > 0 else limit - 1].rstrip(" ,;:") + "…"


def _engine_text(info: Any) -> str:
    if isinstance(info, dict):
        reason = str(info.get("reason", ""))
        return f"{info.get('name', '?')}: {_clip(reason)}".replace("|", "/")
    return _clip(str(info)).replace("|", "/")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.0f}%"


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _bytes(value: int | None) -> str:
    return "n/a" if value is None else format_bytes(value)


def table_markdown(rows: list[Row]) -> str:
    head = (
        "| scenario | loader | median s | GB/s | min-max s | of ceiling | vs safetensors "
        "| peak RSS + | device mem | bitwise | runs |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|\n"
    )
    lines = []
    for r in rows:
        spread = "n/a" if r.min_s is None else f"{r.min_s:.3f}-{r.max_s:.3f}"
        ceiling = "n/a" if r.of_ceiling is None else f"{r.of_ceiling * 100:.0f}% ({r.ceiling})"
        speed = "n/a" if r.vs_safetensors is None else f"{r.vs_safetensors:.2f}x"
        runs = f"{r.ok_runs}/{r.runs}"
        if r.rss_delta_bytes is not None:
            rss = _bytes(r.rss_delta_bytes)
        elif r.peak_rss_bytes is not None:
            rss = f"{_bytes(r.peak_rss_bytes)} (absolute)"
        else:
            rss = "n/a"
        lines.append(
            f"| {r.scenario} | {r.loader} | {_num(r.median_s, '.3f')} | {_num(r.gbps, '.2f')} "
            f"| {spread} | {ceiling} | {speed} | {rss} "
            f"| {_bytes(r.peak_device_bytes)} | {r.bitwise} | {runs} |"
        )
    return head + "\n".join(lines) + "\n"


def render_markdown(data: dict[str, Any], rows: list[Row]) -> str:
    mach = data["machine"]
    ck = data["checkpoint"]
    opts = data["options"]
    desc = ck.get("description", {})
    shape = (
        f"LLaMA-like h={desc['hidden']} layers={desc['layers']} vocab={desc['vocab']} bf16"
        if "hidden" in desc
        else str(desc.get("source", ""))
    )
    out = [f"# fastckpt load benchmark: {opts['device']}, {mach.get('date', '')}\n"]
    out.append("## Machine\n")
    out.append("| | |\n|---|---|")
    gpu = mach.get("gpu") or "none"
    if mach.get("gpu_memory_bytes"):
        gpu += f" ({format_bytes(mach['gpu_memory_bytes'])})"
    cpus = f"{mach.get('cpu_model')} x {mach.get('cpu_count')}"
    for key, value in (
        ("CPU", cpus),
        ("RAM", _bytes(mach.get("ram_bytes"))),
        ("GPU", gpu),
        ("OS / kernel", f"{mach.get('os')} / {mach.get('kernel')}"),
        ("Python / torch", f"{mach.get('python')} / {mach.get('torch')}"),
        ("workdir filesystem", f"{mach.get('workdir_fs')} on {mach.get('workdir_device')}"),
        ("fio", mach.get("fio") or "not installed"),
        ("I/O engine", _engine_text(mach.get("engine_info"))),
    ):
        out.append(f"| {key} | {value} |")
    out.append("")
    out.append(
        f"Checkpoint: {shape}, {format_bytes(ck['nbytes'])} in {ck['tensors']} tensors, "
        f"{len(ck['safetensors_files'])} safetensors shard(s). Repeats: {opts['repeats']} "
        "(interleaved), fresh process per measurement, CPU done = every page touched, "
        "GPU done = synchronized.\n"
    )
    out.append("## Ceilings (same run)\n")
    out.append("| ceiling | method | median GB/s | min-max GB/s | runs |\n|---|---|---:|---:|---:|")
    for name, c in ceiling_summary(data.get("ceilings", [])).items():
        out.append(
            f"| {name} | {c['method']} | {c['median_gbps']:.2f} "
            f"| {c['min_gbps']:.2f}-{c['max_gbps']:.2f} | {c['runs']} |"
        )
    out.append("")
    out.append(f"## Results ({opts['device']})\n")
    out.append(table_markdown(rows))
    loaders = data.get("loaders", {})
    versions = [
        f"{n} {info.get('version') or ''}".strip()
        for n, info in loaders.items()
        if info.get("selected")
    ]
    out.append("Loaders: " + ", ".join(versions) + ".\n")
    paths = [f"{r.loader}/{r.scenario}: {r.path_taken}" for r in rows if r.path_taken]
    if paths:
        out.append("fastckpt path taken: " + "; ".join(paths) + ".\n")
    tg = targets(data, rows)
    if tg:
        out.append("## Targets (the project's benchmark brief)\n")
        out.append("| target | measured | verdict |\n|---|---|---|")
        out.extend(f"| {a} | {b} | {c} |" for a, b, c in tg)
        out.append("")
    notes = list(data.get("notes", []))
    notes += [f"{r.loader}/{r.scenario}: {r.error}" for r in rows if r.error]
    unavailable = [
        f"{n}: {info.get('reason')}"
        for n, info in loaders.items()
        if not info.get("available") and n in opts["loaders"]
    ]
    if unavailable:
        notes.append("not measured: " + "; ".join(unavailable))
    if notes:
        out.append("## Notes\n")
        out.extend(f"- {n}" for n in notes)
        out.append("")
    return "\n".join(out)


def plot_png(data: dict[str, Any], rows: list[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nbytes = int(data["checkpoint"]["nbytes"])
    scen = [s for s in data["options"]["scenarios"] if any(r.scenario == s for r in rows)]
    loaders = [ld for ld in data["options"]["loaders"] if any(r.loader == ld for r in rows)]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.6 + 0.55 * len(scen) * len(loaders)), 4.8))
    width = 0.8 / max(1, len(loaders))
    by = {(r.scenario, r.loader): r for r in rows}
    cmap = plt.get_cmap("tab10")
    for j, ld in enumerate(loaders):
        xs, ys, lo, hi = [], [], [], []
        for i, sc in enumerate(scen):
            r = by.get((sc, ld))
            if r is None or r.gbps is None or r.min_s is None or r.max_s is None:
                continue
            xs.append(i - 0.4 + width * (j + 0.5))
            ys.append(r.gbps)
            lo.append(r.gbps - nbytes / r.max_s / 1e9)
            hi.append(nbytes / r.min_s / 1e9 - r.gbps)
        if xs:
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=ld, color=cmap(j % 10))
    summary = ceiling_summary(data.get("ceilings", []))
    tops = [nbytes / r.min_s / 1e9 for r in rows if r.min_s]
    for i, sc in enumerate(scen):
        name, value = scenario_ceiling(sc, data["options"]["device"], summary)
        if value:
            tops.append(value)
            ax.hlines(value, i - 0.45, i + 0.45, colors="black", linestyles="dashed")
            ax.text(i, value, f"{name}\n{value:.2f} GB/s", ha="center", va="bottom", fontsize=6)
    if tops:
        ax.set_ylim(0, max(tops) * 1.15)
    ax.set_xticks(range(len(scen)))
    ax.set_xticklabels(scen)
    ax.set_ylabel("GB/s (median; bars: min-max)")
    mach = data["machine"]
    where = mach.get("gpu") or mach.get("cpu_model") or ""
    ax.set_title(
        f"{format_bytes(nbytes)} LLaMA-like checkpoint -> {data['options']['device']} ({where})",
        fontsize=9,
    )
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(data: dict[str, Any], out_dir: str) -> tuple[list[Row], dict[str, str]]:
    """Write results.json, results.md and results.png into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    rows = summarize(data)
    data = dict(data, summary=[asdict(r) for r in rows])
    paths = {
        "json": os.path.join(out_dir, "results.json"),
        "md": os.path.join(out_dir, "results.md"),
        "png": os.path.join(out_dir, "results.png"),
    }
    with open(paths["json"], "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, sort_keys=False)
    with open(paths["md"], "w", encoding="utf-8") as fh:
        fh.write(render_markdown(data, rows))
    plot_png(data, rows, paths["png"])
    return rows, paths


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or len(args) > 2:
        print("usage: python -m fastckpt.bench.report results.json [OUT_DIR]", file=sys.stderr)
        return 2
    with open(args[0], encoding="utf-8") as fh:
        data = json.load(fh)
    out_dir = args[1] if len(args) > 1 else os.path.dirname(os.path.abspath(args[0]))
    rows, _ = write_all(data, out_dir)
    print(table_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
