"""Orchestration: checkpoint, reference, ceilings, then interleaved rounds of measurements.

The parent process never imports torch: the checkpoint is generated, the reference fingerprints
are computed, and every load is measured in a fresh child (``fastckpt.bench.worker``), so no
measurement inherits another's allocator, CUDA context, page mappings or imported libraries.

Round ``r`` measures every scenario, and in each scenario every loader once (the loader order
rotates by one each round, so no loader always runs first). With ``time_budget_s``, a round that
would overrun the budget (judged by the same round's last duration) is skipped with a note; the
first round always runs.

(About 500 lines on purpose: the phases of one comparison share its options, checkpoint set and
notes; split apart they would only pass those around.)
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from fastckpt.bench import ceilings as ceil
from fastckpt.bench import scenarios as scen
from fastckpt.bench.common import (
    cpu_model,
    log,
    mount_of,
)
from fastckpt.bench.generate import CheckpointSet
from fastckpt.bench.loaders import LOADERS
from fastckpt.rules.host import meminfo
from fastckpt.rules.units import format_bytes


@dataclass
class Options:
    workdir: str
    out_dir: str
    device: str = "cpu"
    size_bytes: int = 2_000_000_000
    checkpoint: str | None = None
    scenarios: list[str] = field(default_factory=lambda: list(scen.NAMES))
    loaders: list[str] = field(default_factory=lambda: list(LOADERS))
    loaders_explicit: bool = False
    repeats: int = 3
    skip_ceilings: bool = False
    keep: bool = False
    seed: int = 0
    shard_bytes: int | None = None
    time_budget_s: float = 0.0
    verify: str = "first"  # first | all | none
    worker_timeout_s: float = 900.0
    python: str = sys.executable
    tmpfs_dir: str = "/dev/shm"


@dataclass
class Measurement:
    loader: str
    scenario: str
    repeat: int
    ok: bool
    seconds: float | None = None
    nbytes: int = 0
    gbps: float | None = None
    peak_rss_bytes: int | None = None
    rss_delta_bytes: int | None = None
    peak_device_bytes: int | None = None
    device_used_bytes: int | None = None
    bitwise: bool | None = None  # None: not checked in this measurement
    mismatch: str = ""
    error: str = ""
    resident_before: float | None = None
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class BenchResult:
    options: dict[str, Any]
    machine: dict[str, Any]
    checkpoint: dict[str, Any]
    loaders: dict[str, dict[str, Any]]
    ceilings: list[ceil.CeilingSample] = field(default_factory=list)
    measurements: list[Measurement] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    started: str = ""
    finished: str = ""

    def to_json(self) -> dict[str, Any]:
        out = {
            "options": self.options,
            "machine": self.machine,
            "checkpoint": self.checkpoint,
            "loaders": self.loaders,
            "ceilings": [c.to_json() for c in self.ceilings],
            "measurements": [asdict(m) for m in self.measurements],
            "notes": self.notes,
            "started": self.started,
            "finished": self.finished,
        }
        return out


class BenchError(RuntimeError):
    """The harness cannot run (bad options for this machine, no reference loader, ...)."""


def run_worker(
    python: str,
    mode: str,
    args: list[str],
    *,
    timeout_s: float,
    stream: bool = False,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run one worker child; its JSON result, or ``{"ok": False, "error": ...}``. ``env`` is
    added to the child's environment (settings such as ``FASTCKPT_RING_BYTES``), never to
    this process's."""
    child_env = {**os.environ, **env} if env else None
    with tempfile.TemporaryDirectory(prefix="fastckpt-bench-") as tmp:
        result_path = os.path.join(tmp, "result.json")
        cmd = [python, "-u", "-m", "fastckpt.bench.worker", mode, "--result", result_path, *args]
        t0 = time.monotonic()
        output = ""
        try:
            if stream:
                rc = subprocess.run(cmd, timeout=timeout_s, check=False, env=child_env).returncode
            else:
                proc = subprocess.run(
                    cmd,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    errors="replace",
                    timeout=timeout_s,
                    check=False,
                    env=child_env,
                )
                output = proc.stdout or ""
                rc = proc.returncode
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout
            tail: str = out.decode(errors="replace") if isinstance(out, bytes) else (out or "")
            return {
                "ok": False,
                "error": f"worker timed out after {timeout_s:.0f} s",
                "output": tail[-4000:],
                "wall_s": time.monotonic() - t0,
            }
        wall = time.monotonic() - t0
        if os.path.isfile(result_path):
            with open(result_path, encoding="utf-8") as fh:
                result: dict[str, Any] = json.load(fh)
        else:
            lines = output.strip().splitlines()
            result = {
                "ok": False,
                "error": f"worker exited with status {rc} and no result"
                + (f": {lines[-1]}" if lines else ""),
            }
        if not result.get("ok"):
            result["output"] = output[-4000:]
        result["wall_s"] = wall
        return result


def compare_fingerprints(
    got: dict[str, list[Any]], ref: dict[str, list[Any]], *, limit: int = 5
) -> str:
    """'' when equal, else a short description of the first differences."""
    problems: list[str] = []
    missing = sorted(set(ref) - set(got))
    extra = sorted(set(got) - set(ref))
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if extra:
        problems.append(f"{len(extra)} unexpected (e.g. {extra[0]})")
    bad = [n for n in ref if n in got and list(got[n]) != list(ref[n])]
    if bad:
        n = bad[0]
        problems.append(
            f"{len(bad)} differ (e.g. {n}: got {got[n][:3]} crc {got[n][3]:#010x}, "
            f"want {ref[n][:3]} crc {ref[n][3]:#010x})"
        )
    return "; ".join(problems[:limit])


def machine_info(workdir: str, fio: str | None, probe: dict[str, Any]) -> dict[str, Any]:
    mem = meminfo()
    mount = mount_of(workdir)
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "hostname": platform.node(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_bytes": mem.get("MemTotal"),
        "kernel": platform.release(),
        "os": _os_name(),
        "workdir": os.path.abspath(workdir),
        "workdir_fs": mount.fstype,
        "workdir_device": mount.device,
        "fio": ceil.fio_version(fio),
        "python": probe.get("python", platform.python_version()),
        "torch": probe.get("torch"),
        "torch_cuda": probe.get("torch_cuda"),
        "gpu": probe.get("gpu_name"),
        "gpu_memory_bytes": probe.get("gpu_memory_bytes"),
        "gpu_count": probe.get("gpu_count", 0),
        "fastckpt": probe.get("fastckpt"),
        "engine_info": probe.get("engine_info"),
    }
    return info


def _os_name() -> str:
    try:
        with open("/etc/os-release", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.platform()


def _write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh)


class Runner:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.notes: list[str] = []
        self.t_start = time.monotonic()
        self.deadline = self.t_start + opts.time_budget_s if opts.time_budget_s > 0 else None
        self.crc_algo: str | None = None

    # -- helpers -------------------------------------------------------------------------------

    def _left_s(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def _worker(self, mode: str, args: list[str], *, stream: bool = False) -> dict[str, Any]:
        return run_worker(
            self.opts.python, mode, args, timeout_s=self.opts.worker_timeout_s, stream=stream
        )

    # -- phases --------------------------------------------------------------------------------

    def prepare_checkpoint(self) -> tuple[CheckpointSet, dict[str, Any], dict[str, Any]]:
        """The checkpoint set, the machine's probe (the device is checked before generating),
        and the reference fingerprints (safetensors ``load_file`` on CPU)."""
        o = self.opts
        args = ["--workdir", o.workdir, "--seed", str(o.seed), "--device", o.device]
        if o.checkpoint:
            args += ["--checkpoint", o.checkpoint]
        else:
            args += ["--size-bytes", str(o.size_bytes)]
        if o.shard_bytes:
            args += ["--shard-bytes", str(o.shard_bytes)]
        if "torch-mmap" in o.loaders:
            args.append("--torch-bin")
        if "fastckpt" in o.loaders:
            args.append("--convert")
        res = self._worker("generate", args, stream=True)
        if not res.get("ok"):
            raise BenchError(f"could not prepare the checkpoint: {res.get('error')}")
        self.notes.extend(res.get("notes", []))
        data = dict(res["checkpoint"])
        for key in ("safetensors_files", "owned"):
            data[key] = tuple(data[key])
        return CheckpointSet(**data), res["probe"], res["reference"]

    def run(self) -> BenchResult:
        o = self.opts
        started = time.strftime("%Y-%m-%d %H:%M:%S %z")
        os.makedirs(o.workdir, exist_ok=True)
        fio = ceil.find_fio()
        ckpt: CheckpointSet | None = None
        active: list[tuple[scen.Scenario, CheckpointSet, str]] = []
        result: BenchResult | None = None
        ckpt_json = os.path.join(o.workdir, f"ckpt-{os.getpid()}.json")
        try:
            ckpt, probe, ref = self.prepare_checkpoint()
            log(
                f"checkpoint: {format_bytes(ckpt.nbytes)}, {ckpt.tensors} tensors, "
                f"{len(ckpt.safetensors_files)} shard(s) in {ckpt.safetensors_path}; "
                f"reference fingerprints ({ref['crc']}) in {ref['seconds']:.1f} s"
            )
            _write_json(ckpt_json, ckpt.to_json())
            reference = ref["fingerprint"]
            crc_algo = ref["crc"]
            self.crc_algo = crc_algo

            loaders_info = self._select_loaders(probe, ckpt)
            selected = [n for n in o.loaders if loaders_info[n]["selected"]]
            if not selected:
                raise BenchError("no selected loader is available here: " + "; ".join(self.notes))
            log(f"loaders: {', '.join(selected)}")

            result = BenchResult(
                options=_options_json(o),
                machine=machine_info(o.workdir, fio, probe),
                checkpoint=dict(ckpt.to_json(), crc=crc_algo, reference_s=ref.get("seconds")),
                loaders=loaders_info,
                started=started,
            )

            sources = {LOADERS[n].source for n in selected}
            host_bytes = ckpt.nbytes if o.device == "cpu" else 0
            for name in o.scenarios:
                sc = scen.make(name, tmpfs_base=o.tmpfs_dir, host_copy_bytes=host_bytes)
                here = sc.setup(ckpt, sources)
                self.notes.extend(sc.notes)
                if here is None:
                    continue
                path = os.path.join(o.workdir, f"ckpt-{os.getpid()}-{name}.json")
                _write_json(path, here.to_json())
                active.append((sc, here, path))
                sc.notes.clear()

            self._rounds(result, ckpt, ckpt_json, active, selected, reference, fio)
        finally:
            for sc, _, path in active:
                sc.teardown()
                _unlink(path)
            _unlink(ckpt_json)
            if ckpt is not None and not o.keep:
                for owned in ckpt.owned:
                    shutil.rmtree(owned, ignore_errors=True)
        assert result is not None
        result.notes = self.notes
        result.finished = time.strftime("%Y-%m-%d %H:%M:%S %z")
        return result

    def _select_loaders(self, probe: dict[str, Any], ckpt: CheckpointSet) -> dict[str, Any]:
        o = self.opts
        info: dict[str, Any] = {}
        for name in LOADERS:
            spec = LOADERS[name]
            avail = dict(probe["loaders"].get(name, {"available": False, "reason": "not probed"}))
            reason = avail.get("reason", "")
            ok = bool(avail.get("available"))
            if ok and spec.source == "fastckpt" and not ckpt.fastckpt_dir:
                ok, reason = False, "no fastckpt conversion (fastckpt.convert missing or failed)"
            if ok and spec.source == "torch" and not ckpt.torch_file:
                ok, reason = False, "no torch .bin was written"
            requested = name in o.loaders
            info[name] = {
                "label": spec.label,
                "peer": spec.peer,
                "source": spec.source,
                "version": avail.get("version"),
                "available": ok,
                "reason": reason,
                "selected": ok and requested,
            }
            if requested and not ok and (o.loaders_explicit or not spec.peer):
                self.notes.append(f"loader {name} skipped: {reason}")
        return info

    def _rounds(
        self,
        result: BenchResult,
        ckpt: CheckpointSet,
        ckpt_json: str,
        active: list[tuple[scen.Scenario, CheckpointSet, str]],
        selected: list[str],
        reference: dict[str, list[Any]],
        fio: str | None,
    ) -> None:
        o = self.opts
        cost: dict[str, float] = {}
        verified: set[tuple[str, str]] = set()
        for r in range(o.repeats):
            if not o.skip_ceilings:
                if r == 0 or cost.get("ceilings", 0.0) < self._left_s():
                    t0 = time.monotonic()
                    result.ceilings.extend(self._ceilings(ckpt, ckpt_json, r, fio))
                    cost["ceilings"] = time.monotonic() - t0
                else:
                    self.notes.append(f"round {r + 1}: ceilings skipped (time budget)")
            for sc, here, here_json in active:
                if r > 0 and cost.get(sc.name, 0.0) >= self._left_s():
                    self.notes.append(f"round {r + 1}: {sc.name} skipped (time budget)")
                    continue
                t0 = time.monotonic()
                order = selected[r % len(selected) :] + selected[: r % len(selected)]
                for name in order:
                    if not sc.serves(LOADERS[name].source):
                        continue
                    if self._left_s() <= 0:
                        self.notes.append(
                            f"round {r + 1}: {sc.name}/{name} skipped (time budget exhausted)"
                        )
                        continue
                    check = o.verify == "all" or (
                        o.verify == "first" and (name, sc.name) not in verified
                    )
                    m = self._measure(name, sc, here, here_json, r, check, reference, ckpt.nbytes)
                    if check and m.ok:
                        verified.add((name, sc.name))
                    result.measurements.append(m)
                cost[sc.name] = time.monotonic() - t0

    def _ceilings(
        self, ckpt: CheckpointSet, ckpt_json: str, r: int, fio: str | None
    ) -> list[ceil.CeilingSample]:
        files = list(ckpt.safetensors_files)
        out: list[ceil.CeilingSample] = []
        try:
            out += ceil.disk_ceilings(files, r, fio=fio)
        except OSError as exc:
            self.notes.append(f"round {r + 1}: disk ceilings failed: {exc}")
        res = self._worker("ceilings", ["--ckpt", ckpt_json, "--device", self.opts.device])
        if res.get("ok"):
            out += ceil.from_worker(res, r)
        else:
            self.notes.append(f"round {r + 1}: memory ceilings failed: {res.get('error')}")
        for c in out:
            log(f"ceiling {c.name}: {c.gbps:.2f} GB/s ({c.method})")
        return out

    def _measure(
        self,
        name: str,
        sc: scen.Scenario,
        here: CheckpointSet,
        here_json: str,
        r: int,
        check: bool,
        reference: dict[str, list[Any]],
        nbytes: int,
    ) -> Measurement:
        o = self.opts
        files = list(here.files_for(LOADERS[name].source))
        try:
            info = sc.before_each(here, files)
        except OSError as exc:
            return Measurement(name, sc.name, r, False, error=f"scenario setup failed: {exc}")
        args = ["--loader", name, "--device", o.device, "--ckpt", here_json]
        if check:
            args.append("--fingerprint")
        res = self._worker("load", args)
        m = Measurement(
            name,
            sc.name,
            r,
            bool(res.get("ok")),
            resident_before=info.get("resident_before"),
            wall_s=float(res.get("wall_s", 0.0)),
        )
        if not m.ok:
            m.error = str(res.get("error", "failed"))
            tail = (res.get("traceback") or res.get("output") or "").strip().splitlines()
            log(f"{sc.name:5s} {name:16s} FAILED: {m.error}" + (f" | {tail[-1]}" if tail else ""))
            return m
        m.seconds = float(res["seconds"])
        m.nbytes = int(res.get("nbytes", 0))
        m.gbps = nbytes / m.seconds / 1e9 if m.seconds > 0 else None
        m.peak_rss_bytes = res.get("peak_rss_bytes")
        if m.peak_rss_bytes is not None and res.get("peak_rss_is_reset"):
            m.rss_delta_bytes = max(0, int(m.peak_rss_bytes) - int(res.get("rss_before_bytes", 0)))
        m.peak_device_bytes = res.get("peak_device_bytes")
        m.device_used_bytes = res.get("device_used_bytes")
        m.extra = dict(res.get("extra", {}))
        problems: list[str] = []
        want_device = "cpu" if o.device == "cpu" else _canonical_cuda(o.device)
        devices = res.get("devices", [])
        if devices and devices != [want_device]:
            problems.append(f"tensors on {devices}, expected {want_device}")
        if m.nbytes != nbytes:
            problems.append(f"{m.nbytes} tensor bytes, expected {nbytes}")
        if check:
            if res.get("crc") != self.crc_algo:
                problems.append(f"checksum {res.get('crc')} differs from reference {self.crc_algo}")
            diff = compare_fingerprints(res.get("fingerprint", {}), reference)
            if diff:
                problems.append(diff)
            m.bitwise = not problems
        elif problems:
            m.bitwise = False
        m.mismatch = "; ".join(problems)
        resident = "" if m.resident_before is None else f" resident {m.resident_before:.0%}"
        verdict = {None: "", True: " bitwise OK", False: f" MISMATCH: {m.mismatch}"}[m.bitwise]
        log(
            f"round {r + 1}/{self.opts.repeats} {sc.name:5s} {name:16s} {m.seconds:8.3f} s "
            f"{m.gbps or 0:7.2f} GB/s{resident}{verdict}"
        )
        return m


def _canonical_cuda(device: str) -> str:
    return device if ":" in device else "cuda:0"


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _options_json(o: Options) -> dict[str, Any]:
    data = asdict(o)
    data["python"] = o.python
    return data
