"""The read -> host-to-device copy pipeline, on the fake device (CPU) and, marked ``gpu``, CUDA.

The fake device copies to host memory on one worker thread per stream, and checks every copy's
bytes when it runs against its source when it was enqueued: a staging slot overwritten before
its copy ran shows up in ``violations``. Destinations are numpy arrays (their addresses).
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fastckpt.io_engine import (
    CancelFlag,
    CopyOp,
    CopyResult,
    Engine,
    FakeCopyBackend,
    File,
    PinnedBuffer,
    RangeGate,
    SlotSource,
    crc32c,
    cuda_copy_backend,
    cuda_driver_problem,
    run_copy_pipeline,
)

from .conftest import BACKENDS, random_bytes, write_file

KiB = 1 << 10
MiB = 1 << 20
# Long enough never to fire in a healthy run, short enough that a broken one fails, not hangs.
GUARD_S = 60.0


def addr(a: np.ndarray) -> int:
    return int(a.ctypes.data)


def make_slots(backend: Any, count: int, slot_nbytes: int, method: str = "register") -> SlotSource:
    slots = SlotSource(slot_nbytes)
    if count:
        assert slots.add(PinnedBuffer(backend, count * slot_nbytes, method)) == count
    return slots


def split(size: int, piece: int) -> list[tuple[int, int]]:
    return [(off, min(piece, size - off)) for off in range(0, size, piece)]


def read_ops(
    f: File, dst: np.ndarray, size: int, piece: int, gate: RangeGate | None = None
) -> list[CopyOp]:
    """The file's first ``size`` bytes in ``piece``-byte reads, each to the same offset of dst."""
    return [("read", f, off, n, addr(dst) + off, gate) for off, n in split(size, piece)]


def assert_clean(slots: SlotSource, backend: FakeCopyBackend) -> None:
    """After a run, failed or not: every slot is back and no copy is left to run."""
    assert slots.available == slots.total
    assert slots.running == 0
    assert backend.pending == 0
    assert backend.violations == 0, backend.violation_notes


def run_in_thread(fn: Callable[[], CopyResult]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["result"] = fn()
        except BaseException as exc:
            out["error"] = exc

    t = threading.Thread(target=target)
    t.start()
    return t, out


def wait_until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + GUARD_S
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


@pytest.fixture
def data() -> np.ndarray:
    # Odd size: the last read is short and no read is page-aligned in length.
    return random_bytes(3 * MiB + 12_345, seed=7)


@pytest.fixture
def data_path(tmp_path: Path, data: np.ndarray) -> Path:
    return write_file(tmp_path / "data.bin", data)


@pytest.fixture
def f(data_path: Path) -> Iterator[File]:
    with File(data_path) as fh:
        yield fh


@pytest.fixture
def engine() -> Iterator[Engine]:
    with Engine("pread", threads=2, chunk_bytes=16 * KiB) as e:
        yield e


# ------------------------------------------------------------------------- bytes land exactly


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("method", ["register", "memfd", "alloc"])
def test_bytes_land_exactly(kind: str, method: str, f: File, data: np.ndarray) -> None:
    backend = FakeCopyBackend(streams=3)
    slots = make_slots(backend, 4, 256 * KiB, method)
    dst = np.zeros(data.size, dtype=np.uint8)
    ops = read_ops(f, dst, data.size, 200_000)
    with Engine(kind, queue_depth=8, threads=2, chunk_bytes=64 * KiB) as engine:
        result = run_copy_pipeline(engine, ops, slots, backend)
    assert np.array_equal(dst, data)
    assert result.copies == len(ops) and backend.copies == len(ops)
    assert result.bytes_staged == data.size and result.bytes_host == 0
    assert result.crcs == ()
    assert 1 <= result.slots_used <= 4
    assert_clean(slots, backend)


def test_several_copies_in_flight(engine: Engine, f: File, data: np.ndarray) -> None:
    # A slow link (20 ms a copy) and reads from the page cache that keep up: copies queue on
    # every stream at once instead of one at a time.
    backend = FakeCopyBackend(streams=4, delay_s=0.02)
    slots = make_slots(backend, 8, 64 * KiB)
    dst = np.zeros(32 * 64 * KiB, dtype=np.uint8)
    result = run_copy_pipeline(engine, read_ops(f, dst, dst.size, 64 * KiB), slots, backend)
    assert np.array_equal(dst, data[: dst.size])
    assert backend.max_in_flight >= 3
    assert result.max_copies_in_flight >= 3
    assert result.max_reads_in_flight >= 1
    assert_clean(slots, backend)


@pytest.mark.parametrize(
    ("nslots", "slot_nbytes", "piece"),
    [(2, 4 * KiB, 4 * KiB), (2, 4 * KiB, 4_000), (3, 10_000, 9_999), (5, 64 * KiB, 65_000)],
)
def test_slot_reuse_never_overwrites_a_pending_copy(
    engine: Engine, f: File, data: np.ndarray, nslots: int, slot_nbytes: int, piece: int
) -> None:
    # Many more reads than slots, with copies slower than reads: every slot is reused many
    # times, and the device checks that none was refilled before its previous copy ran.
    backend = FakeCopyBackend(streams=2, delay_s=0.0005)
    slots = make_slots(backend, nslots, slot_nbytes)
    size = min(data.size, 150 * piece + 77)
    dst = np.zeros(size, dtype=np.uint8)
    ops = read_ops(f, dst, size, piece)
    assert len(ops) > 8 * nslots
    result = run_copy_pipeline(engine, ops, slots, backend)
    assert np.array_equal(dst, data[:size])
    assert result.slots_used == nslots
    assert backend.copies == len(ops)
    assert_clean(slots, backend)


def test_the_fake_device_catches_an_overwritten_source() -> None:
    # The check above can fail: a source changed after copy_async and before the copy ran.
    backend = FakeCopyBackend(streams=1)
    src = np.arange(4096, dtype=np.uint8)
    dst = np.zeros(4096, dtype=np.uint8)
    backend._set_paused(True)
    backend._copy_async(0, addr(dst), addr(src), src.size)
    src[100] ^= 0xFF
    backend._set_paused(False)
    backend.drain()
    assert backend.violations == 1
    assert "source changed" in backend.violation_notes[0]


def test_the_fake_device_without_checks_or_copies(engine: Engine, f: File) -> None:
    unchecked = FakeCopyBackend(streams=1, check=False)
    src = np.arange(4096, dtype=np.uint8)
    dst = np.zeros(4096, dtype=np.uint8)
    unchecked._set_paused(True)
    unchecked._copy_async(0, addr(dst), addr(src), src.size)
    src[100] ^= 0xFF
    unchecked._set_paused(False)
    unchecked.drain()
    assert unchecked.violations == 0 and np.array_equal(dst, src)  # copied, not checked
    null = FakeCopyBackend(streams=2, copy=False)  # a device that costs nothing (benchmarks)
    slots = make_slots(null, 2, 16 * KiB)
    dst = np.zeros(64 * KiB, dtype=np.uint8)
    result = run_copy_pipeline(engine, read_ops(f, dst, dst.size, 16 * KiB), slots, null)
    assert result.copies == null.copies == 4 and not dst.any()
    assert_clean(slots, null)


@pytest.mark.parametrize("crc_threads", [0, 1, 3])
def test_crcs_per_op(engine: Engine, f: File, data: np.ndarray, crc_threads: int) -> None:
    # Checksums on the loop's thread (0) or on workers. The workers are slowed down (2 ms each)
    # so that copies finish first: a slot must still wait for its checksum before it is refilled,
    # or the checksum would be of the next read's bytes.
    backend = FakeCopyBackend()
    slots = make_slots(backend, 3, 100_000)
    dst = np.zeros(data.size, dtype=np.uint8)
    host_src = random_bytes(5000, seed=3)
    host_dst = np.zeros(5000, dtype=np.uint8)
    ops = read_ops(f, dst, data.size, 99_999)
    ops.insert(2, ("read", f, 123, 0, addr(dst), None))  # empty: CRC 0, nothing copied
    ops.append(("host", addr(host_src), host_src.size, addr(host_dst)))
    result = run_copy_pipeline(
        engine, ops, slots, backend, crc=True, crc_threads=crc_threads, _crc_delay_s=0.002
    )
    assert len(result.crcs) == len(ops)
    for op, got in zip(ops, result.crcs, strict=True):
        if op[0] == "read":
            off, n = op[2], op[3]
            assert got == (crc32c(data[off : off + n]) if n else 0)
        else:
            assert got == crc32c(host_src)
    assert np.array_equal(dst, data) and np.array_equal(host_dst, host_src)
    assert result.copies == len(ops) - 1
    assert_clean(slots, backend)


def test_host_ops_copy_exactly_beside_reads(engine: Engine, f: File, data: np.ndarray) -> None:
    backend = FakeCopyBackend(streams=2, delay_s=0.001)
    slots = make_slots(backend, 2, 64 * KiB)
    src = random_bytes(MiB + 333, seed=5)
    out = np.zeros(src.size, dtype=np.uint8)
    dst = np.zeros(data.size, dtype=np.uint8)
    host: list[CopyOp] = [
        ("host", addr(src) + off, n, addr(out) + off) for off, n in split(src.size, 50_000)
    ]
    reads = read_ops(f, dst, data.size, 64 * KiB)
    ops = [op for pair in zip(host, reads[: len(host)], strict=True) for op in pair]
    ops += reads[len(host) :]
    result = run_copy_pipeline(engine, ops, slots, backend, host_window=2)
    assert np.array_equal(out, src) and np.array_equal(dst, data)
    assert result.bytes_host == src.size and result.bytes_staged == data.size
    assert_clean(slots, backend)


def test_max_slots_bounds_what_one_pipeline_holds(
    engine: Engine, f: File, data: np.ndarray
) -> None:
    dst = np.zeros(MiB, dtype=np.uint8)
    held = []
    for max_slots in (0, 2):
        backend = FakeCopyBackend(streams=2, delay_s=0.002)
        slots = make_slots(backend, 6, 32 * KiB)
        ops = read_ops(f, dst, MiB, 32 * KiB)
        result = run_copy_pipeline(engine, ops, slots, backend, max_slots=max_slots)
        assert np.array_equal(dst, data[:MiB])
        assert_clean(slots, backend)
        held.append(max(backend.max_in_flight, result.max_copies_in_flight))
    assert held[0] > 2 and held[1] <= 2


def test_two_pipelines_share_one_slot_source(f: File, data: np.ndarray) -> None:
    backend = FakeCopyBackend(streams=2, delay_s=0.0005)
    slots = make_slots(backend, 3, 16 * KiB)
    dsts = [np.zeros(MiB, dtype=np.uint8) for _ in range(2)]
    with Engine("pread", threads=2) as e1, Engine("pread", threads=2) as e2:
        runs = [
            run_in_thread(
                lambda e=e, d=d: run_copy_pipeline(e, read_ops(f, d, MiB, 16 * KiB), slots, backend)
            )
            for e, d in ((e1, dsts[0]), (e2, dsts[1]))
        ]
        for t, _ in runs:
            t.join(GUARD_S)
    for _, out in runs:
        assert "error" not in out, out.get("error")
    for d in dsts:
        assert np.array_equal(d, data[:MiB])
    assert_clean(slots, backend)


# ------------------------------------------------------------------------ slots from elsewhere


def test_slots_added_during_a_run_are_used(engine: Engine, f: File, data: np.ndarray) -> None:
    # The pipeline starts with no slot at all; a slot arrives, then two more while it runs
    # (background pinning growing the ring).
    backend = FakeCopyBackend(streams=2, delay_s=0.005)
    slots = SlotSource(16 * KiB)
    dst = np.zeros(100 * 16 * KiB, dtype=np.uint8)
    ops = read_ops(f, dst, dst.size, 16 * KiB)
    t, out = run_in_thread(lambda: run_copy_pipeline(engine, ops, slots, backend))
    wait_until(lambda: slots.running == 1, "the pipeline to start")
    assert backend.stats()["enqueued"] == 0  # nothing to copy without a slot
    slots.add(PinnedBuffer(backend, 16 * KiB))
    wait_until(lambda: backend.stats()["enqueued"] >= 1, "the first copy")
    slots.add(PinnedBuffer(backend, 2 * 16 * KiB))
    t.join(GUARD_S)
    assert "error" not in out, out.get("error")
    result: CopyResult = out["result"]
    assert result.slots_used == 3
    assert result.slot_wait_s > 0
    assert np.array_equal(dst, data[: dst.size])
    assert slots.total == 3
    assert_clean(slots, backend)


def test_close_during_a_load_frees_every_slot(engine: Engine, f: File) -> None:
    backend = FakeCopyBackend(streams=2, delay_s=0.005)
    slots = make_slots(backend, 4, 16 * KiB)
    assert backend.stats()["pins"] == 1
    dst = np.zeros(2 * MiB, dtype=np.uint8)
    ops = read_ops(f, dst, dst.size, 16 * KiB)
    t, out = run_in_thread(lambda: run_copy_pipeline(engine, ops, slots, backend))
    wait_until(lambda: backend.stats()["enqueued"] >= 4, "copies")
    assert slots.close(timeout_s=GUARD_S) is True
    t.join(GUARD_S)
    assert isinstance(out.get("error"), RuntimeError), out
    assert "closed" in str(out["error"])
    assert backend.copies < len(ops)  # it stopped early
    assert backend.pending == 0 and backend.violations == 0
    assert slots.total == 0 and slots.closed
    assert backend.stats()["unpins"] == 1  # the source held the last reference: unpinned
    with pytest.raises(RuntimeError, match="closed"):
        run_copy_pipeline(engine, ops, slots, backend)


def test_close_without_cancel_lets_running_pipelines_finish(
    engine: Engine, f: File, data: np.ndarray
) -> None:
    backend = FakeCopyBackend(streams=2, delay_s=0.002)
    slots = make_slots(backend, 2, 16 * KiB)
    dst = np.zeros(64 * 16 * KiB, dtype=np.uint8)
    ops = read_ops(f, dst, dst.size, 16 * KiB)
    t, out = run_in_thread(lambda: run_copy_pipeline(engine, ops, slots, backend))
    wait_until(lambda: backend.stats()["enqueued"] >= 1, "copies")
    assert slots.close(cancel_running=False, timeout_s=GUARD_S) is True
    t.join(GUARD_S)
    assert "error" not in out, out.get("error")
    assert np.array_equal(dst, data[: dst.size])
    assert slots.total == 0


def test_close_times_out_while_a_pipeline_holds_slots(engine: Engine, f: File) -> None:
    backend = FakeCopyBackend(streams=1)
    slots = make_slots(backend, 2, 16 * KiB)
    backend._set_paused(True)  # copies stay pending: the pipeline holds its slots
    dst = np.zeros(64 * KiB, dtype=np.uint8)
    t, out = run_in_thread(
        lambda: run_copy_pipeline(engine, read_ops(f, dst, dst.size, 16 * KiB), slots, backend)
    )
    wait_until(lambda: backend.pending == 2, "two pending copies")
    assert slots.close(cancel_running=False, timeout_s=0.05) is False
    assert slots.closed and slots.total == 2
    backend._set_paused(False)
    t.join(GUARD_S)
    assert "error" not in out, out.get("error")
    assert slots.close(timeout_s=GUARD_S) is True and slots.total == 0


# ------------------------------------------------------------------------------------ errors


def test_a_read_error_mid_run_stops_cleanly(f: File, data_path: Path) -> None:
    backend = FakeCopyBackend(streams=2, delay_s=0.001)
    slots = make_slots(backend, 3, 64 * KiB)
    dst = np.zeros(MiB, dtype=np.uint8)
    ops = read_ops(f, dst, MiB, 64 * KiB)
    with (
        Engine("pread", threads=2, _fault_after_bytes=300 * KiB, _fault_errno=errno.EIO) as engine,
        pytest.raises(OSError) as info,
    ):
        run_copy_pipeline(engine, ops, slots, backend)
    assert info.value.errno == errno.EIO
    assert info.value.filename == str(data_path)
    assert "offset" in str(info.value)
    assert backend.copies < len(ops)
    assert_clean(slots, backend)


def test_a_failed_copy_stops_cleanly(engine: Engine, f: File) -> None:
    backend = FakeCopyBackend(streams=2, delay_s=0.001, _fail_after_copies=5)
    slots = make_slots(backend, 3, 64 * KiB)
    dst = np.zeros(MiB, dtype=np.uint8)
    with pytest.raises(RuntimeError, match="copy 5 refused"):
        run_copy_pipeline(engine, read_ops(f, dst, MiB, 64 * KiB), slots, backend)
    assert backend.copies == 5
    assert_clean(slots, backend)


def test_cancel_from_another_thread(engine: Engine, f: File) -> None:
    backend = FakeCopyBackend(streams=2, delay_s=0.005)
    slots = make_slots(backend, 4, 16 * KiB)
    dst = np.zeros(2 * MiB, dtype=np.uint8)
    ops = read_ops(f, dst, dst.size, 16 * KiB)
    cancel = CancelFlag()
    t, out = run_in_thread(lambda: run_copy_pipeline(engine, ops, slots, backend, cancel=cancel))
    wait_until(lambda: backend.stats()["enqueued"] >= 4, "copies")
    cancel.set()
    t.join(GUARD_S)
    assert isinstance(out.get("error"), RuntimeError), out
    assert "cancelled" in str(out["error"])
    assert backend.copies < len(ops)
    assert_clean(slots, backend)
    with pytest.raises(RuntimeError, match="cancelled"):  # a set flag stops the next run at once
        run_copy_pipeline(engine, ops, slots, backend, cancel=cancel)


def test_engine_closed_during_a_run(f: File) -> None:
    backend = FakeCopyBackend(streams=1)
    slots = make_slots(backend, 2, 16 * KiB)
    dst = np.zeros(MiB, dtype=np.uint8)
    engine = Engine("pread", threads=1)
    engine._set_paused(True)  # reads stay queued
    t, out = run_in_thread(
        lambda: run_copy_pipeline(engine, read_ops(f, dst, MiB, 16 * KiB), slots, backend)
    )
    wait_until(lambda: slots.available == 0, "the reads to be submitted")
    engine.close()
    t.join(GUARD_S)
    assert isinstance(out.get("error"), RuntimeError), out
    assert "closed" in str(out["error"])
    assert_clean(slots, backend)


def test_a_read_larger_than_a_slot_is_refused(engine: Engine, f: File) -> None:
    backend = FakeCopyBackend()
    slots = make_slots(backend, 2, 16 * KiB)
    dst = np.zeros(64 * KiB, dtype=np.uint8)
    ops = [*read_ops(f, dst, 32 * KiB, 16 * KiB), ("read", f, 0, 16 * KiB + 1, addr(dst), None)]
    with pytest.raises(ValueError, match=r"op 2: a read of 16385 bytes is larger than a staging"):
        run_copy_pipeline(engine, ops, slots, backend)
    assert engine.bytes_read == 0 and backend.stats()["enqueued"] == 0  # nothing ran
    assert_clean(slots, backend)


def test_a_range_past_the_end_of_the_file_is_refused(engine: Engine, f: File) -> None:
    backend = FakeCopyBackend()
    slots = make_slots(backend, 2, 16 * KiB)
    dst = np.zeros(16 * KiB, dtype=np.uint8)
    ops: list[CopyOp] = [("read", f, 0, 100, addr(dst), None), ("read", f, f.size - 5, 10, 1, None)]
    with pytest.raises(ValueError, match=r"op 1 .*the range ends at byte"):
        run_copy_pipeline(engine, ops, slots, backend)
    assert engine.bytes_read == 0
    assert_clean(slots, backend)


@pytest.mark.parametrize(
    ("op", "error", "match"),
    [
        ("read", TypeError, "op 0: expected a tuple"),
        (("copy", 1, 2, 3), ValueError, 'must be "read" or "host"'),
        (("read", "f.bin", 0, 1, 1, None), TypeError, "expected a fastckpt File"),
        (("read", None, 0, 1, 1, None), TypeError, "expected a fastckpt File"),
        (("host", 1, 2), ValueError, "expected"),
        (("host", 1, -2, 3), ValueError, "nbytes must be >= 0"),
        (("host", 1, True, 3), TypeError, "nbytes must be an int"),
        (("host", 0, 10, 3), ValueError, "host source address is 0"),
        (("host", 1, 10, 0), ValueError, "destination address is 0"),
    ],
)
def test_bad_ops(engine: Engine, op: Any, error: type[Exception], match: str) -> None:
    backend = FakeCopyBackend()
    slots = make_slots(backend, 1, 4 * KiB)
    with pytest.raises(error, match=match):
        run_copy_pipeline(engine, [op], slots, backend)
    assert_clean(slots, backend)


def test_a_closed_file_and_a_bad_gate_are_refused(engine: Engine, data_path: Path) -> None:
    backend = FakeCopyBackend()
    slots = make_slots(backend, 1, 4 * KiB)
    f = File(data_path)
    with pytest.raises(TypeError, match="RangeGate or None"):
        run_copy_pipeline(engine, [("read", f, 0, 1, 1, "gate")], slots, backend)
    f.close()
    with pytest.raises(ValueError, match="is closed"):
        run_copy_pipeline(engine, [("read", f, 0, 1, 1, None)], slots, backend)


def test_settings_are_checked(engine: Engine) -> None:
    backend = FakeCopyBackend()
    slots = make_slots(backend, 1, 4 * KiB)
    for kwargs in (
        {"max_slots": -1},
        {"host_window": 0},
        {"copy_poll_s": 0.0},
        {"crc_threads": -1},
        {"crc_threads": 65},
    ):
        with pytest.raises(ValueError):
            run_copy_pipeline(engine, [], slots, backend, **kwargs)
    with pytest.raises(ValueError, match="gate_timeout_s"):
        run_copy_pipeline(engine, [], slots, backend, gate_timeout_s=-1.0)
    with pytest.raises(ValueError, match="streams"):
        FakeCopyBackend(streams=0)
    with pytest.raises(ValueError, match="delay_s"):
        FakeCopyBackend(delay_s=-1.0)
    result = run_copy_pipeline(engine, [], slots, backend)
    assert result.copies == 0 and result.slots_used == 0


# -------------------------------------------------------------------------------------- gates


def test_a_gate_holds_reads_until_their_bytes_are_ready(
    engine: Engine, f: File, data: np.ndarray
) -> None:
    # The producer is another Python thread: the run completes only because it releases the GIL.
    backend = FakeCopyBackend(streams=2)
    slots = make_slots(backend, 4, 64 * KiB)
    gate = RangeGate("s3://bucket/model/part-0")
    size = 10 * 64 * KiB
    dst = np.zeros(size, dtype=np.uint8)
    seen: dict[str, int] = {}

    def producer() -> None:
        wait_until(lambda: slots.running == 1, "the pipeline to start")
        seen["read_before"] = engine.bytes_read
        gate.mark_ready(0, 3 * 64 * KiB)  # the first three reads may go
        wait_until(lambda: backend.copies == 3, "three copies")
        time.sleep(0.01)
        seen["copies_at_3"] = backend.copies
        gate.mark_ready(5 * 64 * KiB, size)  # out of order: reads 3 and 4 still wait
        time.sleep(0.01)
        seen["copies_after_tail"] = backend.copies
        gate.mark_ready(3 * 64 * KiB, 5 * 64 * KiB)

    t = threading.Thread(target=producer)
    t.start()
    result = run_copy_pipeline(
        engine, read_ops(f, dst, size, 64 * KiB, gate), slots, backend, gate_timeout_s=GUARD_S
    )
    t.join(GUARD_S)
    assert seen == {"read_before": 0, "copies_at_3": 3, "copies_after_tail": 3}
    assert np.array_equal(dst, data[:size])
    assert result.gate_wait_s > 0
    assert gate.ready(0, size) and gate.ready_bytes == size
    assert_clean(slots, backend)


def test_the_run_releases_the_gil(engine: Engine, f: File, data: np.ndarray) -> None:
    # Nothing can be read until a Python thread opens the gate while the main thread is inside
    # run_copy_pipeline; with the GIL held that thread could not run and the run would time out.
    backend = FakeCopyBackend()
    slots = make_slots(backend, 1, 4 * KiB)
    gate = RangeGate()
    dst = np.zeros(4 * KiB, dtype=np.uint8)
    ticks = []

    def producer() -> None:
        wait_until(lambda: slots.running == 1, "the pipeline to start")
        ticks.extend(range(1000))  # plain Python work while the pipeline waits
        gate.mark_ready(0, f.size)

    t = threading.Thread(target=producer)
    t.start()
    run_copy_pipeline(
        engine, read_ops(f, dst, dst.size, 4 * KiB, gate), slots, backend, gate_timeout_s=GUARD_S
    )
    t.join(GUARD_S)
    assert len(ticks) == 1000
    assert np.array_equal(dst, data[: dst.size])


def test_a_failed_gate_raises_its_error(engine: Engine, f: File) -> None:
    backend = FakeCopyBackend()
    slots = make_slots(backend, 2, 16 * KiB)
    gate = RangeGate("https://example.invalid/model.bin")
    gate.mark_ready(0, 16 * KiB)
    dst = np.zeros(64 * KiB, dtype=np.uint8)

    def producer() -> None:
        wait_until(lambda: backend.copies == 1, "the first copy")
        gate.fail(errno.ECONNRESET, "connection reset after 16384 bytes")

    t = threading.Thread(target=producer)
    t.start()
    with pytest.raises(OSError) as info:
        run_copy_pipeline(engine, read_ops(f, dst, dst.size, 16 * KiB, gate), slots, backend)
    t.join(GUARD_S)
    assert info.value.errno == errno.ECONNRESET
    assert info.value.filename == "https://example.invalid/model.bin"
    assert "connection reset after 16384 bytes" in str(info.value)
    assert_clean(slots, backend)
    with pytest.raises(OSError):  # failed for good
        gate.wait(0, 1)


def test_a_gate_that_never_opens_times_out(engine: Engine, f: File) -> None:
    backend = FakeCopyBackend()
    slots = make_slots(backend, 2, 16 * KiB)
    gate = RangeGate("slow-source")
    dst = np.zeros(16 * KiB, dtype=np.uint8)
    with pytest.raises(TimeoutError, match=r"op 0: timed out .* \[0, 16384\) of 'slow-source'"):
        run_copy_pipeline(
            engine, read_ops(f, dst, dst.size, 16 * KiB, gate), slots, backend, gate_timeout_s=0.05
        )
    assert_clean(slots, backend)


def test_range_gate_bookkeeping() -> None:
    gate = RangeGate()
    assert gate.ready(5, 5)  # empty ranges are always ready
    gate.mark_ready(10, 20)
    gate.mark_ready(30, 40)
    assert gate.ready(10, 20) and gate.ready(12, 18) and not gate.ready(10, 21)
    assert not gate.ready(15, 35)
    gate.mark_ready(20, 30)  # touching on both sides: one range
    assert gate.ready(10, 40) and gate.ready_bytes == 30
    gate.mark_ready(0, 50)
    assert gate.ready_bytes == 50
    assert gate.wait(0, 50, timeout_s=0) is True
    assert gate.wait(0, 51, timeout_s=0.01) is False
    with pytest.raises(ValueError):
        gate.mark_ready(5, 1)
    with pytest.raises(ValueError):
        gate.ready(-1, 3)


@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(), reason="needs the main thread"
)
def test_ctrl_c_interrupts_a_run(engine: Engine, f: File) -> None:
    backend = FakeCopyBackend()
    slots = make_slots(backend, 2, 16 * KiB)
    gate = RangeGate()  # never opens: the run waits until interrupted
    dst = np.zeros(16 * KiB, dtype=np.uint8)
    # Python's own SIGINT handler, also where the suite was started with SIGINT ignored (a
    # background job of a non-interactive shell), where the signal would never arrive
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.1, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_copy_pipeline(engine, read_ops(f, dst, dst.size, 16 * KiB, gate), slots, backend)
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert_clean(slots, backend)


# ---------------------------------------------------------------------------- pinned buffers


@pytest.mark.parametrize("method", ["register", "memfd", "alloc"])
def test_pinned_buffer_is_a_writable_buffer(method: str) -> None:
    torch = pytest.importorskip("torch")
    backend = FakeCopyBackend()
    buf = PinnedBuffer(backend, 3 * MiB + 5, method)
    assert buf.nbytes == len(buf) == 3 * MiB + 5 and buf.method == method
    assert buf.setup_s >= 0
    t = torch.frombuffer(buf, dtype=torch.uint8)
    t[:] = 7
    assert memoryview(buf)[-1] == 7 and t.data_ptr() == buf.address
    stats = backend.stats()
    pinned = method != "alloc"
    assert (stats["pins"], stats["host_allocs"]) == ((1, 0) if pinned else (0, 1))
    del buf
    assert backend.stats()["unpins"] == 0  # the tensor still holds the memory
    del t
    stats = backend.stats()
    assert (stats["unpins"], stats["host_frees"]) == ((1, 0) if pinned else (0, 1))


def test_pinned_buffer_arguments() -> None:
    backend = FakeCopyBackend()
    with pytest.raises(ValueError, match="nbytes"):
        PinnedBuffer(backend, 0)
    with pytest.raises(ValueError, match="expected register, memfd or alloc"):
        PinnedBuffer(backend, 4096, "mlock")
    with pytest.raises(TypeError):
        PinnedBuffer(None, 4096)  # type: ignore[arg-type]
    slots = SlotSource(10_000)
    buf = PinnedBuffer(backend, 35_000)
    assert slots.add(buf) == 3  # the tail is not a slot
    with pytest.raises(ValueError, match="already holds slots"):  # never two overlapping slots
        SlotSource(10_000).add(buf)
    with pytest.raises(ValueError, match="holds no slot"):
        slots.add(PinnedBuffer(backend, 9_999))
    with pytest.raises(ValueError):
        SlotSource(0)


# -------------------------------------------------------------------------------------- fork


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork()")
def test_a_forked_child_refuses_to_run(engine: Engine, f: File) -> None:
    backend = FakeCopyBackend()
    slots = make_slots(backend, 1, 4 * KiB)
    dst = np.zeros(4 * KiB, dtype=np.uint8)
    ops = read_ops(f, dst, dst.size, 4 * KiB)
    pid = os.fork()
    if pid == 0:  # child: must raise clearly, not hang
        code = 1
        try:
            run_copy_pipeline(engine, ops, slots, backend)
        except ValueError as e:
            code = 0 if "copy backend (fake) was created in another process" in str(e) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    run_copy_pipeline(engine, ops, slots, backend)  # the parent's objects are unaffected


# ------------------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(cuda_driver_problem() is None, reason="a CUDA driver is installed")
def test_cuda_backend_without_a_driver_says_so() -> None:
    with pytest.raises(RuntimeError, match=r"CUDA driver libcuda\.so\.1 not found"):
        cuda_copy_backend(0, [0])


def _cuda() -> Any:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch


@pytest.mark.gpu
def test_cuda_copies_256_mib_through_4_streams(tmp_path: Path) -> None:
    torch = _cuda()
    size = 256 * MiB
    data = random_bytes(size, seed=11)
    path = write_file(tmp_path / "big.bin", data)
    streams = [torch.cuda.Stream() for _ in range(4)]
    backend = cuda_copy_backend(0, [s.cuda_stream for s in streams])
    assert backend.name == "cuda" and backend.streams == 4
    slots = make_slots(backend, 8, 8 * MiB)
    dst = torch.zeros(size, dtype=torch.uint8, device="cuda:0")
    torch.cuda.synchronize()
    device_before = torch.cuda.current_device()
    with Engine() as engine, File(path) as f:
        ops: list[CopyOp] = [
            ("read", f, off, n, dst.data_ptr() + off, None) for off, n in split(size, 8 * MiB)
        ]
        result = run_copy_pipeline(engine, ops, slots, backend, crc=True)
    assert torch.cuda.current_device() == device_before
    assert result.copies == len(ops) and result.bytes_staged == size
    assert result.crcs[0] == crc32c(data[: 8 * MiB])
    assert torch.equal(dst.cpu(), torch.from_numpy(data))
    assert slots.available == slots.total == 8
    assert slots.close(timeout_s=GUARD_S)


@pytest.mark.gpu
def test_cuda_tiny_slots_are_reused_safely(tmp_path: Path) -> None:
    # Three 64 KiB slots for 129 odd-sized reads: each slot is refilled dozens of times, only
    # after its previous copy's event completed; any early reuse would corrupt the destination.
    torch = _cuda()
    size = 129 * 65_000 + 321
    data = random_bytes(size, seed=13)
    path = write_file(tmp_path / "odd.bin", data)
    streams = [torch.cuda.Stream() for _ in range(2)]
    backend = cuda_copy_backend(0, [s.cuda_stream for s in streams])
    slots = make_slots(backend, 3, 64 * KiB)
    dst = torch.zeros(size, dtype=torch.uint8, device="cuda:0")
    torch.cuda.synchronize()
    with Engine() as engine, File(path) as f:
        ops: list[CopyOp] = [
            ("read", f, off, n, dst.data_ptr() + off, None) for off, n in split(size, 65_000)
        ]
        result = run_copy_pipeline(engine, ops, slots, backend)
    assert result.copies == len(ops) and result.slots_used == 3
    assert torch.equal(dst.cpu(), torch.from_numpy(data))
    assert slots.available == slots.total == 3


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["register", "memfd", "alloc"])
def test_cuda_pins_each_method(method: str) -> None:
    torch = _cuda()
    stream = torch.cuda.Stream()
    backend = cuda_copy_backend(0, [stream.cuda_stream])
    buf = PinnedBuffer(backend, 64 * MiB, method)
    host = torch.frombuffer(buf, dtype=torch.uint8)
    assert host.is_pinned()
    host.copy_(torch.randint(0, 256, (64 * MiB,), dtype=torch.uint8))
    dst = torch.empty(64 * MiB, dtype=torch.uint8, device="cuda:0")
    slots = SlotSource(MiB)
    with Engine() as engine:
        result = run_copy_pipeline(
            engine, [("host", buf.address, buf.nbytes, dst.data_ptr())], slots, backend
        )
    assert result.bytes_host == 64 * MiB
    assert torch.equal(dst.cpu(), host)
    del host, buf  # unpinned / freed here; a new buffer of the same kind still works
    assert torch.frombuffer(PinnedBuffer(backend, MiB, method), dtype=torch.uint8).is_pinned()


@pytest.mark.gpu
def test_cuda_events_are_reused_across_runs() -> None:
    # Host ops on two streams, many more than the host window, three runs on one backend: the
    # pooled events come back and are recorded again.
    torch = _cuda()
    streams = [torch.cuda.Stream() for _ in range(2)]
    backend = cuda_copy_backend(torch.cuda.current_device(), [s.cuda_stream for s in streams])
    buf = PinnedBuffer(backend, 32 * MiB, "register")
    host = torch.frombuffer(buf, dtype=torch.uint8)
    slots = SlotSource(MiB)
    with Engine() as engine:
        for seed in range(3):
            host.copy_(torch.randint(0, 256, (32 * MiB,), dtype=torch.uint8))
            dst = torch.empty(32 * MiB, dtype=torch.uint8, device="cuda")
            ops: list[CopyOp] = [
                ("host", buf.address + off, n, dst.data_ptr() + off)
                for off, n in split(32 * MiB, MiB)
            ]
            result = run_copy_pipeline(engine, ops, slots, backend, host_window=4)
            assert result.copies == 32, seed
            assert torch.equal(dst.cpu(), host), seed


@pytest.mark.gpu
def test_cuda_bad_arguments_are_named() -> None:
    torch = _cuda()
    with pytest.raises(RuntimeError, match="cuDeviceGet failed: CUDA_ERROR_INVALID_DEVICE"):
        cuda_copy_backend(torch.cuda.device_count() + 7, [0])
    with pytest.raises(ValueError, match="needs 1 to 64 streams"):
        cuda_copy_backend(0, [])
    with pytest.raises(ValueError, match="device index must be >= 0"):
        cuda_copy_backend(-1, [0])
