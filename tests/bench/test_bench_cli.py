"""The harness end to end on a tiny checkpoint (CPU; and CUDA on the GPU box), plus its errors."""

from __future__ import annotations

import json
import os
import re
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from fastckpt.bench import cli, loaders
from fastckpt.bench.runner import run_worker


def _fastckpt_loaders() -> list[str]:
    return [n for n in ("fastckpt",) if loaders.availability(n, cuda=False)["available"]]


def _run(tmp_path: Path, *extra: str) -> tuple[int, dict[str, Any], Path]:
    out = tmp_path / "out"
    rc = cli.main(
        [
            "--size",
            "8MB",
            "--workdir",
            str(tmp_path / "work"),
            "--out",
            str(out),
            "--repeats",
            "1",
            *extra,
        ]
    )
    data = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    return rc, data, out


def test_smoke_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    names = [*_fastckpt_loaders(), "safetensors"]
    if len(names) == 1:
        names.append("torch-mmap")
    rc, data, out = _run(
        tmp_path,
        "--states",
        "cold,tmpfs",
        "--loaders",
        ",".join(names),
        "--verify",
        "all",
        "--keep",
    )
    assert rc == 0, capsys.readouterr().err[-3000:]
    ms = data["measurements"]
    scen = ["cold"] + (["tmpfs"] if os.path.isdir("/dev/shm") else [])
    assert sorted((m["loader"], m["scenario"]) for m in ms) == sorted(
        (n, s) for n in names for s in scen
    )
    for m in ms:
        assert m["ok"], m
        assert m["bitwise"] is True, m
        assert m["seconds"] > 0 and m["nbytes"] == data["checkpoint"]["nbytes"]
        assert m["peak_rss_bytes"] > 0
    assert [m["resident_before"] for m in ms if m["scenario"] == "cold"] == [
        pytest.approx(0.0, abs=0.1)
    ] * len(names)
    kinds = {c["name"] for c in data["ceilings"]}
    assert {"disk_buffered", "pagecache_to_host"} <= kinds
    assert data["machine"]["cpu_count"] and data["machine"]["torch"]
    md = (out / "results.md").read_text()
    assert "## Results (cpu)" in md and "## Ceilings" in md
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert "| scenario | loader |" in capsys.readouterr().out
    kept = [p for p in (tmp_path / "work").iterdir() if p.name.startswith("llama-")]
    assert len(kept) == 1 and (kept[0] / "manifest.json").is_file()  # --keep
    assert not [p for p in Path("/dev/shm").glob(f"fastckpt-bench-{os.getpid()}*")]


def test_generated_checkpoint_removed_without_keep(tmp_path: Path) -> None:
    # --scenarios: the former name of --states, still accepted
    rc, data, _ = _run(
        tmp_path, "--scenarios", "warm", "--loaders", "safetensors", "--skip-ceilings"
    )
    assert rc == 0
    assert data["ceilings"] == []
    assert [m["bitwise"] for m in data["measurements"]] == [True]
    assert not [p for p in (tmp_path / "work").iterdir() if p.name.startswith("llama-")]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "tpu"], "expected cpu or cuda:N"),
        (["--repeats", "0"], "at least 1"),
        (["--size", "100KB"], "at least 1MB"),
        (["--size", "lots"], "invalid size"),
        (["--loaders", "safetensors,magic"], "unknown loader 'magic'"),
        (["--states", "lukewarm"], "unknown cache state 'lukewarm'"),
        (["--states", "cold,engine"], "engine is a scenario (what to measure), not a cache state"),
        (["--checkpoint", "/nonexistent/ckpt"], "no such file or folder"),
        (["--shard-size", "1KB"], "at least 4KiB"),
        (["--time-budget-s", "-1"], "must be >= 0"),
    ],
)
def test_bad_options(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--workdir", str(tmp_path), "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastckpt bench: error:") and message in err
    assert not (tmp_path / "o").exists()


def test_missing_cuda_is_refused_before_generating(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc, _, out = _run(tmp_path, "--device", "cuda:0", "--size", "200MB")
    assert rc == 1
    assert "sees no CUDA device" in capsys.readouterr().err
    assert not out.exists()
    assert not [p for p in (tmp_path / "work").iterdir() if p.name.startswith("llama-")]


def test_run_worker_failures(tmp_path: Path) -> None:
    res = run_worker(sys.executable, "ceilings", ["--ckpt", str(tmp_path / "x.json")], timeout_s=60)
    assert res["ok"] is False and res["error"].startswith("FileNotFoundError")
    res = run_worker("/bin/false", "load", [], timeout_s=60)
    assert res["ok"] is False and "exited with status 1 and no result" in res["error"]
    sleeper = tmp_path / "sleeper"
    sleeper.write_text("#!/bin/sh\nsleep 30\n")
    sleeper.chmod(sleeper.stat().st_mode | stat.S_IEXEC)
    res = run_worker(str(sleeper), "load", [], timeout_s=0.5)
    assert res["ok"] is False and "timed out" in res["error"]


@pytest.mark.gpu
def test_smoke_cuda(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    names = [*_fastckpt_loaders(), "safetensors"]
    rc, data, _ = _run(
        tmp_path, "--device", "cuda:0", "--states", "warm", "--loaders", ",".join(names)
    )
    assert rc == 0, capsys.readouterr().err[-3000:]
    for m in data["measurements"]:
        assert m["ok"] and m["bitwise"] is True, m
        assert m["peak_device_bytes"] >= data["checkpoint"]["nbytes"]
    kinds = {c["name"] for c in data["ceilings"]}
    assert {"pagecache_to_host", "pinned_to_gpu"} <= kinds
    assert data["machine"]["gpu"]


def test_help_describes_each_scenario_and_groups_options_by_scenario(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import argparse

    from fastckpt.bench import harness

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    texts = [harness.help_of(n) for n in harness.SCENARIOS]
    assert len(set(texts)) == len(texts), "two scenarios share a description"
    help_text = parser.format_help()
    assert "--states" in help_text and "--scenarios" not in help_text  # the old name is hidden
    groups = {g.title: [a.dest for a in g._group_actions] for g in parser._action_groups if g.title}
    # an option sits in the group of the scenarios that use it
    owner = next(title for title, dests in groups.items() if "lora_size" in dests)
    assert "lora" in owner.split(" ", 1)[1].split(", ")
    # no help gives its default twice
    assert not re.search(r"\(([^()]+)\) \(default: \1\)", " ".join(help_text.split()))


@pytest.mark.parametrize(
    ("argv", "hint"),
    [
        (["--scenario", "cold"], "give it with --states cold"),
        (["--scenario", "lorra"], "did you mean lora?"),
        (["--scenario", "nothing"], "known: load, engine"),
    ],
)
def test_scenario_mistakes_get_a_hint(
    argv: list[str], hint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from fastckpt.cli import main

    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert "argument --scenario" in err and hint in err
