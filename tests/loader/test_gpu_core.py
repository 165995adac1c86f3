"""The load core on a real GPU (skipped cleanly without CUDA): what the fake device cannot show.
Slot reuse with tiny slots, the DRAM tier pinned in tiny pieces, ordering against a busy current
stream, the current device, a forked child, verification, iterators and slices on the device."""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from loader_helpers import bits, same

import fastckpt
from fastckpt.errors import ChecksumError

pytestmark = pytest.mark.gpu
MiB = 1 << 20


def _ckpt(root: Path, *, numel: int = 1 << 20, n: int = 6, seed: int = 0) -> tuple[Path, Any]:
    g = torch.Generator().manual_seed(seed)
    sd = {f"layer{i}.w": torch.randn(numel + 1000 * i, generator=g) for i in range(n)}
    sd["half"] = torch.randn(12345, generator=g).to(torch.bfloat16)
    sd["mask"] = torch.tensor([True, False] * 500)
    sd["tied"] = sd["layer1.w"]
    path = root / "ck"
    fastckpt.save(sd, path, partition_bytes=8 * MiB, metadata=None)
    return path, sd


def _on(dev: str, got: dict[str, torch.Tensor]) -> bool:
    return all(str(t.device) == dev for t in got.values())


def test_many_reads_through_tiny_slots(tmp_path: Path) -> None:
    path, sd = _ckpt(tmp_path)
    with fastckpt.Loader(ring_slot_bytes=64 << 10, ring_bytes=256 << 10) as loader:
        got, st = loader.load(path, "cuda:0", stats=True)
        torch.cuda.synchronize()
    assert same(got, sd) and _on("cuda:0", got)
    assert st.copies > 100 and st.max_copies_in_flight >= 2


def test_several_copies_in_flight_on_a_warm_load(tmp_path: Path) -> None:
    path, sd = _ckpt(tmp_path, numel=8 << 20, n=4)
    with fastckpt.Loader() as loader:
        loader.load(path, "cuda:0")
        got, st = loader.load(path, "cuda:0", stats=True)
    assert same(got, sd)
    assert st.max_copies_in_flight >= 3, st


def test_dram_tier_pinned_in_tiny_pieces(tmp_path: Path) -> None:
    path, sd = _ckpt(tmp_path)
    with fastckpt.Loader(dram_tier_bytes=256 * MiB, pool_piece_bytes=256 << 10) as loader:
        first, s1 = loader.load(path, "cuda:0", stats=True)
        assert same(first, sd) and s1.flight == "leader"
        loader.prefetch(path, tier="dram", device="cuda:0").result(60)  # pinned by now
        item = loader.dram_tier.peek(loader.dram_tier.keys()[0])
        assert all(b.pinned_bytes >= b.nbytes for b in item.blocks.values())
        second, s2 = loader.load(path, "cuda:0", stats=True)
    assert same(second, sd) and s2.path_taken == "dram-tier"
    assert not any("not pinned" in n for n in s2.notes), s2.notes


def test_copies_wait_for_the_callers_busy_stream(tmp_path: Path) -> None:
    """A block freed while the caller's stream still has queued work on it is reused for the
    load's buffer: the load's copies must wait for that work, or it overwrites them."""
    path, sd = _ckpt(tmp_path, numel=1 << 18, n=2)
    with fastckpt.Loader() as loader:
        loader.load(path, "cuda:0")  # ring, engine and streams exist
        for _ in range(3):
            nbytes = sum(t.numel() * t.element_size() for t in sd.values())
            junk = torch.empty(nbytes * 2, dtype=torch.uint8, device="cuda:0")
            torch.cuda._sleep(200_000_000)  # the current stream is busy for a while...
            junk.fill_(7)  # ...then writes 7s over what the load's buffer may reuse
            del junk  # the caching allocator may hand this block to the load at once
            got = loader.load(path, "cuda:0")
            torch.cuda.current_stream().synchronize()
            assert same(got, sd)


def test_bare_cuda_is_the_current_device(tmp_path: Path) -> None:
    path, sd = _ckpt(tmp_path, numel=1000, n=2)
    for index in range(torch.cuda.device_count()):
        with torch.cuda.device(index):
            got = fastckpt.load(path, "cuda")
            assert _on(f"cuda:{index}", got) and same(got, sd)
            with fastckpt.open(path, device="cuda") as f:
                assert str(f.get_tensor("layer0.w").device) == f"cuda:{index}"
            one = dict(fastckpt.iter_tensors(path, "cuda"))
            assert _on(f"cuda:{index}", one)


def test_a_forked_child_loads_on_cpu_after_the_parent_used_the_gpu(tmp_path: Path) -> None:
    path, sd = _ckpt(tmp_path, numel=1000, n=2)
    fastckpt.load(path, "cuda:0")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            got = fastckpt.load(path, "cpu", private_copy=True)
            code = 0 if all(torch.equal(bits(got[k]), bits(sd[k])) for k in sd) else 2
        finally:
            os.write(w, bytes([code]))
            os._exit(code)
    os.close(w)
    status = os.read(r, 1)
    os.close(r)
    _, wait = os.waitpid(pid, 0)
    assert status == b"\x00" and os.waitstatus_to_exitcode(wait) == 0


def test_verify_on_the_device(tmp_path: Path) -> None:
    path, sd = _ckpt(tmp_path)
    got, st = fastckpt.load(path, "cuda:0", verify=True, stats=True)
    assert same(got, sd) and st.verified_chunks > 0
    index = fastckpt.read_index(path)
    entry = index.tensors["layer3.w"]
    with open(index.partitions[entry.partition].path, "r+b") as f:
        f.seek(entry.offset + 9)
        f.write(b"\x00\x01\x02")
    with pytest.raises(ChecksumError):
        fastckpt.load(path, "cuda:0", verify=True)


def test_iter_tensors_to_the_gpu_reads_a_warm_file_from_the_page_cache(tmp_path: Path) -> None:
    path, sd = _ckpt(tmp_path)
    with fastckpt.Loader() as loader:
        fastckpt.load(path, "cpu", private_copy=True)  # warm
        eng = loader.engine()
        before = eng.bytes_direct
        got = dict(fastckpt.iter_tensors(path, "cuda:0", loader=loader, window_bytes=4 * MiB))
        assert eng.bytes_direct == before
    assert same(got, sd) and _on("cuda:0", got)


def test_slices_on_the_device(tmp_path: Path) -> None:
    path, sd = _ckpt(tmp_path, numel=4096 * 4, n=2)
    ref = sd["layer0.w"].reshape(-1)
    with fastckpt.open(path, device="cuda:0") as f:
        part = f.get_slice("layer0.w")[100:5000]
        assert part.device.type == "cuda"
        assert torch.equal(part.cpu(), ref[100:5000])


def test_gpu_tier_revives_without_copies(tmp_path: Path) -> None:
    path, sd = _ckpt(tmp_path)
    with fastckpt.Loader(gpu_tier_bytes=512 * MiB) as loader:
        got = loader.load(path, "cuda:0")
        del got
        gc.collect()
        again, st = loader.load(path, "cuda:0", stats=True)
    assert same(again, sd) and st.path_taken == "gpu-tier" and st.copies == 0
