"""The SSD tier's conversion off a first load's critical path (``ssd_convert="background"``, the
default): the first load of a slow source reads the source, the copy is made after it on the
Loader's conversion thread, a load meanwhile reads the source, a later load reads the copy;
``close`` cancels a running conversion and keeps nothing; a failed conversion never fails a load.

The conversion is held with the Loader's public seam ``ssd_converter`` (a converter that waits
on an event before it writes), so nothing here depends on timing."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from loader_helpers import same
from safetensors.torch import save_file

import fastckpt
from fastckpt.loader.ssdconvert import convert_opened

WAIT_S = 60.0


def _source(tmp_path: Path, name: str = "model.safetensors", seed: int = 3) -> tuple[Path, Any]:
    g = torch.Generator().manual_seed(seed)
    sd = {"a": torch.randn(4000, generator=g), "b": torch.randn(33, 7, generator=g)}
    src = tmp_path / name
    save_file(sd, str(src))
    return src, sd


class Gate:
    """An ``ssd_converter`` that says it started, waits for ``go``, then does ``then`` (by
    default the real conversion through the core); counts its calls."""

    def __init__(self, then: Callable[[Any, Any, str], Any] = convert_opened) -> None:
        self.started = threading.Event()
        self.go = threading.Event()
        self.calls = 0
        self.then = then

    def __call__(self, loader: Any, opened: Any, dst: str) -> Any:
        self.calls += 1
        self.started.set()
        assert self.go.wait(WAIT_S), "the test never opened the gate"
        return self.then(loader, opened, dst)


def _entries(ssd: Path) -> list[str]:
    """Published copies in the tier's directory."""
    return sorted(n for n in os.listdir(ssd) if not n.startswith("."))


def _leftovers(ssd: Path) -> list[str]:
    """Staged (temporary) copies in the tier's directory."""
    return sorted(n for n in os.listdir(ssd) if n.startswith((".tmp-", "..tmp-", ".old-")))


def _loader(ssd: Path, **kw: Any) -> fastckpt.Loader:
    return fastckpt.Loader(ssd_tier_bytes=64 << 20, ssd_tier_dir=str(ssd), **kw)


def test_the_first_load_reads_the_source_and_the_copy_serves_the_next(tmp_path: Path) -> None:
    src, sd = _source(tmp_path)
    ssd = tmp_path / "ssd"
    gate = Gate()
    with _loader(ssd, ssd_converter=gate) as loader:
        first, st = loader.load(src, stats=True)
        # returned while the conversion cannot have finished: it waits for the gate
        assert same(first, sd) and st.kind == "safetensors"
        assert any("runs in the background" in n for n in st.notes), st.notes
        assert gate.started.wait(WAIT_S)  # the conversion started after the load
        info = loader.cache_info()["ssd"]
        assert [c["source"] for c in info["conversions"]["converting"]] == [str(src)]
        assert info["keys"] == [] and _entries(ssd) == []  # not held before it is complete
        # a load during the conversion reads the source, never the copy being made
        during, st = loader.load(src, stats=True)
        assert same(during, sd) and st.kind == "safetensors"
        assert any("being made" in n for n in st.notes), st.notes
        gate.go.set()
        assert loader.conversions.wait(WAIT_S)
        info = loader.cache_info()["ssd"]
        assert info["conversions"]["done"] == 1 and info["conversions"]["scheduled"] == 1
        assert len(info["keys"]) == 1 and info["conversions"]["converting"] == []
        hits = info["hits"]
        after, st = loader.load(src, stats=True)
        assert same(after, sd) and st.kind == "fastckpt"  # the copy
        assert st.path == str(ssd / info["keys"][0]["key"])
        assert loader.cache_info()["ssd"]["hits"] == hits + 1
    assert gate.calls == 1 and _leftovers(ssd) == []
    with _loader(ssd) as again:  # a new Loader on the same directory: the copy
        got, st = again.load(src, stats=True)
        assert same(got, sd) and st.kind == "fastckpt"


def test_close_during_a_conversion_keeps_nothing(tmp_path: Path) -> None:
    src, sd = _source(tmp_path)
    ssd = tmp_path / "ssd"

    gate = Gate()

    def written_then_held(loader: Any, opened: Any, dst: str) -> None:
        convert_opened(loader, opened, dst)  # a whole, valid-looking checkpoint in the stage
        gate(loader, opened, dst)  # then held until close() has begun

    gate.then = lambda *_: None
    loader = _loader(ssd, ssd_converter=written_then_held)
    assert same(loader.load(src), sd)
    assert gate.started.wait(WAIT_S)
    closing = threading.Thread(target=loader.close)
    closing.start()
    deadline = time.monotonic() + WAIT_S
    while not loader.conversions.cancelled:  # close() has begun; it waits for the conversion
        assert time.monotonic() < deadline
        time.sleep(0.01)
    gate.go.set()
    closing.join(WAIT_S)
    assert not closing.is_alive()
    assert loader.conversions.info()["cancelled"] == 1
    assert _entries(ssd) == [] and _leftovers(ssd) == []
    with _loader(ssd) as again:  # nothing was kept: the source again, and a conversion
        got, st = again.load(src, stats=True)
        assert same(got, sd) and st.kind == "safetensors"


def test_a_failed_conversion_is_logged_and_never_fails_a_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src, sd = _source(tmp_path)
    ssd = tmp_path / "ssd"

    def broken(loader: Any, opened: Any, dst: str) -> None:
        os.makedirs(dst)
        (Path(dst) / "partial").write_bytes(b"x" * 100)
        raise OSError(5, "simulated I/O error")

    with (
        caplog.at_level(logging.WARNING, logger="fastckpt.loader"),
        _loader(ssd, ssd_converter=broken) as loader,
    ):
        assert same(loader.load(src), sd)
        assert loader.conversions.wait(WAIT_S)
        info = loader.cache_info()["ssd"]["conversions"]
        assert info["failed"] == 1 and "simulated I/O error" in info["last_error"]
        # the next load reads the source and says why; the same source is not tried again
        got, st = loader.load(src, stats=True)
        assert same(got, sd) and st.kind == "safetensors"
        assert any("given up" in n and "simulated" in n for n in st.notes), st.notes
        assert loader.conversions.wait(WAIT_S)
        assert loader.cache_info()["ssd"]["conversions"]["scheduled"] == 1
    assert any("simulated I/O error" in r.getMessage() for r in caplog.records)
    assert _entries(ssd) == [] and _leftovers(ssd) == []


@pytest.mark.parametrize("how", ["setting", "environment"])
def test_inline_converts_before_the_first_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    src, sd = _source(tmp_path)
    ssd = tmp_path / "ssd"
    kw: dict[str, Any] = {}
    if how == "setting":
        kw["ssd_convert"] = "inline"
    else:
        monkeypatch.setenv("FASTCKPT_SSD_CONVERT", "inline")
    with _loader(ssd, **kw) as loader:
        got, st = loader.load(src, stats=True)
        assert same(got, sd) and st.kind == "fastckpt"  # converted first, read from the copy
        assert not any("ssd-tier" in n for n in st.notes)
        info = loader.cache_info()["ssd"]
        assert (info["misses"], info["items"]) == (1, 1)
        assert info["conversions"]["scheduled"] == 0
    with pytest.raises(ValueError, match="ssd_convert"):
        fastckpt.Loader(ssd_convert="later")


def test_concurrent_loads_make_one_copy(tmp_path: Path) -> None:
    src, sd = _source(tmp_path)
    ssd = tmp_path / "ssd"
    gate = Gate()
    with _loader(ssd, ssd_converter=gate) as loader:
        got: list[Any] = []
        threads = [threading.Thread(target=lambda: got.append(loader.load(src))) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S)
        assert len(got) == 4 and all(same(g, sd) for g in got)
        gate.go.set()
        assert loader.conversions.wait(WAIT_S)
        assert loader.cache_info()["ssd"]["items"] == 1
    assert gate.calls == 1 and len(_entries(ssd)) == 1


def test_a_second_process_leaves_the_conversion_to_the_first(tmp_path: Path) -> None:
    # two Loaders on one directory stand for two processes: the lock that makes one of them
    # convert is an flock, held per open file, so it excludes a second Loader of this process
    src, sd = _source(tmp_path)
    ssd = tmp_path / "ssd"
    gate = Gate()
    calls_b: list[int] = []

    def counted(loader: Any, opened: Any, dst: str) -> Any:
        calls_b.append(1)
        return convert_opened(loader, opened, dst)

    with _loader(ssd, ssd_converter=gate) as a, _loader(ssd, ssd_converter=counted) as b:
        assert same(a.load(src), sd)
        assert gate.started.wait(WAIT_S)  # a's conversion holds the lock
        assert same(b.load(src), sd)
        assert b.conversions.wait(WAIT_S)
        assert b.cache_info()["ssd"]["conversions"]["elsewhere"] == 1
        gate.go.set()
        assert a.conversions.wait(WAIT_S)
        got, st = b.load(src, stats=True)  # a's copy, found on disk
        assert same(got, sd) and st.kind == "fastckpt"
    assert gate.calls == 1 and calls_b == [] and len(_entries(ssd)) == 1


def test_the_dram_tier_item_of_the_source_is_used_before_the_copy(tmp_path: Path) -> None:
    src, sd = _source(tmp_path)
    ssd = tmp_path / "ssd"
    with _loader(ssd, dram_tier_bytes=8 << 20) as loader:
        assert same(loader.load(src), sd)  # the source, into the DRAM tier
        assert loader.conversions.wait(WAIT_S)
        got, st = loader.load(src, stats=True)
        assert same(got, sd)
        # served by the DRAM tier under the source's identity; no second item for the copy
        assert st.kind == "safetensors" and set(st.tier_nbytes) <= {"dram", "none"}
        info = loader.cache_info()
        assert len(info["dram"]["keys"]) == 1 and len(info["ssd"]["keys"]) == 1
        assert loader.evict(src) == 2  # the source's DRAM item and the copy
        got, st = loader.load(src, stats=True)
        assert same(got, sd) and st.kind == "safetensors"  # no copy: the source again


def test_prefetch_to_ssd_makes_the_copy_before_it_returns(tmp_path: Path) -> None:
    src, sd = _source(tmp_path)
    ssd = tmp_path / "ssd"
    with _loader(ssd) as loader:
        assert loader.prefetch(src, tier="ssd").result(timeout=WAIT_S) is True
        assert len(_entries(ssd)) == 1
        assert loader.cache_info()["ssd"]["conversions"]["scheduled"] == 0
        got, st = loader.load(src, stats=True)
        assert same(got, sd) and st.kind == "fastckpt"


def test_a_verified_first_load_converts_first(tmp_path: Path) -> None:
    # a stock source has no checksums: verify=True needs the copy, so it is made before the read
    src, sd = _source(tmp_path)
    with _loader(tmp_path / "ssd") as loader:
        got, st = loader.load(src, verify=True, stats=True)
        assert same(got, sd) and st.kind == "fastckpt" and st.verified_chunks > 0
        assert loader.cache_info()["ssd"]["conversions"]["scheduled"] == 0


_EXIT_RIGHT_AFTER_THE_LOAD = """
import sys
import fastckpt
tensors, stats = fastckpt.load(sys.argv[1], stats=True)
assert stats.kind == "safetensors", stats
print("loaded")
"""


def test_an_exit_right_after_the_first_load_leaves_no_partial_copy(tmp_path: Path) -> None:
    # the default Loader is never closed: the exit cancels its conversion (or the copy, if it
    # was quick enough, is complete); never a failure, never a staged or half copy
    g = torch.Generator().manual_seed(9)
    src = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(4 << 20, generator=g)}, str(src))  # 16 MiB
    ssd = tmp_path / "ssd"
    env = {
        **os.environ,
        "FASTCKPT_SSD_TIER_BYTES": str(1 << 30),
        "FASTCKPT_SSD_TIER_DIR": str(ssd),
    }
    done = subprocess.run(
        [sys.executable, "-c", _EXIT_RIGHT_AFTER_THE_LOAD, str(src)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.strip() == "loaded", done.stderr
    assert "failed" not in done.stderr, done.stderr
    assert _leftovers(ssd) == []
    for entry in _entries(ssd):  # complete, or not there
        assert fastckpt.read_index(ssd / entry).kind == "fastckpt"
