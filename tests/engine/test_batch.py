"""Batch semantics: completion reporting, cancel, keep-alive, GIL release, concurrency."""

from __future__ import annotations

import gc
import os
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest

from fastckpt.io_engine import AlignedBuffer, Engine, File

from .conftest import BACKENDS, DATA_NBYTES, as_array

PIECE = 8192


def reads_of(f: File, dest: object, n: int, size: int = PIECE) -> list[tuple]:
    return [(f, i * size, size, dest, i * size, i) for i in range(n)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_completions_are_reported_once_each(engine: Engine, data_file: Path, backend: str) -> None:
    n = DATA_NBYTES // PIECE
    with File(data_file) as f:
        buf = AlignedBuffer(DATA_NBYTES)
        batch = engine.submit(reads_of(f, buf, n))
        assert len(batch) == n
        seen: list[int] = []
        while tags := batch.wait(min_completions=3):
            assert len(tags) >= 3 or len(seen) + len(tags) == n
            seen.extend(tags)
        assert sorted(seen) == list(range(n))
        assert batch.wait() == [] and batch.done and batch.pending == 0


def test_zero_length_reads_and_empty_batches(disk_file: Path) -> None:
    with Engine() as engine, File(disk_file) as f:
        empty = engine.submit([])
        assert empty.done and empty.wait() == [] and len(empty) == 0
        empty.wait_all()
        dest = bytearray(1)
        batch = engine.submit([(f, 0, 0, dest, 0, 5), (f, DATA_NBYTES, 0, dest, 1, 6)])
        assert sorted(batch.wait(min_completions=2)) == [5, 6]
        assert batch.done
        dest.extend(b"x")  # released once the batch finished


def test_poll_and_timeout(disk_file: Path) -> None:
    with Engine(chunk_bytes=PIECE) as engine, File(disk_file) as f:
        buf = AlignedBuffer(DATA_NBYTES)
        engine._set_paused(True)
        batch = engine.submit(reads_of(f, buf, 4))
        assert batch.wait(min_completions=0) == []  # poll: nothing yet, not finished
        assert batch.pending == 4 and not batch.done
        with pytest.raises(TimeoutError, match="4 request"):
            batch.wait(timeout_s=0.05)
        with pytest.raises(TimeoutError):
            batch.wait_all(timeout_s=0)
        engine._set_paused(False)
        assert sorted(batch.wait(min_completions=4, timeout_s=30)) == [0, 1, 2, 3]
        with pytest.raises(ValueError, match="timeout_s"):
            batch.wait(timeout_s=-1)
        with pytest.raises(ValueError, match="min_completions"):
            batch.wait(min_completions=-1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cancel_mid_batch(disk_file: Path, data: np.ndarray, backend: str) -> None:
    n = DATA_NBYTES // PIECE
    repeats = 40  # thousands of 4 KiB pieces: the batch is still running when cancelled
    with (
        Engine(backend, threads=2, queue_depth=2, chunk_bytes=4096) as engine,
        File(disk_file) as f,
    ):
        for _ in range(10):
            dest = bytearray(DATA_NBYTES)
            reads = [
                (f, i * PIECE, PIECE, dest, i * PIECE, r * n + i)
                for r in range(repeats)
                for i in range(n)
            ]
            batch = engine.submit(reads)
            first = batch.wait()
            assert first
            batch.cancel()
            batch.cancel()  # idempotent
            assert batch.done and batch.pending == 0
            try:
                rest = batch.wait()
            except RuntimeError as e:
                assert "cancelled" in str(e)
                break
            assert rest == []  # the batch had finished before cancel(): try again
        else:
            pytest.fail("every batch finished before it could be cancelled")
        # No read touches the destination any more: it was released and can be resized.
        dest.extend(b"x")
        for tag in first:  # what was reported complete is complete and exact
            lo = (tag % n) * PIECE
            assert dest[lo : lo + PIECE] == data[lo : lo + PIECE].tobytes()
        # The engine is still usable afterwards.
        out = AlignedBuffer(PIECE)
        engine.read([(f, 0, PIECE, out, 0, 0)])
        assert bytes(out) == data[:PIECE].tobytes()


def test_cancel_while_paused_drops_everything(disk_file: Path) -> None:
    with Engine(chunk_bytes=4096) as engine, File(disk_file) as f:
        engine._set_paused(True)
        dest = bytearray(DATA_NBYTES)
        batch = engine.submit(reads_of(f, dest, 50))
        batch.cancel()
        assert engine.bytes_read == 0
        dest.extend(b"x")
        engine._set_paused(False)


def test_context_manager_cancels_on_exception(disk_file: Path) -> None:
    with Engine(chunk_bytes=4096) as engine, File(disk_file) as f:
        engine._set_paused(True)
        dest = bytearray(DATA_NBYTES)
        with pytest.raises(KeyError), engine.submit(reads_of(f, dest, 50)) as batch:
            raise KeyError("boom")
        assert batch.done
        dest.extend(b"x")
        engine._set_paused(False)


def test_closing_the_engine_cancels_its_batches(disk_file: Path) -> None:
    engine = Engine(chunk_bytes=4096)
    with File(disk_file) as f:
        engine._set_paused(True)
        dest = bytearray(DATA_NBYTES)
        batch = engine.submit(reads_of(f, dest, 50))
        engine.close()
        with pytest.raises(RuntimeError, match="engine was closed"):
            batch.wait()
        dest.extend(b"x")


def test_batch_keeps_destination_and_file_alive(disk_file: Path, data: np.ndarray) -> None:
    with Engine() as engine:
        f = File(disk_file)
        arr = np.zeros(DATA_NBYTES, dtype=np.uint8)
        ref = weakref.ref(arr)
        engine._set_paused(True)
        batch = engine.submit([(f, 0, DATA_NBYTES, arr, 0, 0)])
        view = memoryview(arr.data)  # to check the bytes after the array object is gone
        del arr
        f.close()  # the batch keeps its own reference to the open file
        gc.collect()
        assert ref() is not None
        engine._set_paused(False)
        batch.wait_all()
        assert np.array_equal(as_array(view), data)
        del batch
        view.release()
        gc.collect()
        assert ref() is None


def test_dropping_an_unfinished_batch_is_safe(disk_file: Path) -> None:
    with Engine(chunk_bytes=4096) as engine, File(disk_file) as f:
        engine._set_paused(True)
        dest = bytearray(DATA_NBYTES)
        engine.submit(reads_of(f, dest, 50))  # the batch object is dropped at once
        gc.collect()
        dest.extend(b"x")  # it was cancelled and released its destination
        engine._set_paused(False)
        engine.read([(f, 0, 10, dest, 0, 0)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_wait_releases_the_gil(disk_file: Path, data: np.ndarray, backend: str) -> None:
    """A Python thread makes progress while another waits on a large read."""
    with Engine(backend) as engine, File(disk_file) as f:
        buf = AlignedBuffer(DATA_NBYTES)
        engine._set_paused(True)  # the read cannot finish before the counter has run
        batch = engine.submit([(f, 0, DATA_NBYTES, buf, 0, 0)])
        waiting = threading.Event()
        counted: list[int] = []

        def count_then_release() -> None:
            assert waiting.wait(30)
            n = 0
            deadline = time.monotonic() + 30
            while n < 100_000 and time.monotonic() < deadline:
                n += 1  # pure Python: needs the GIL on every step
            counted.append(n)
            engine._set_paused(False)

        t = threading.Thread(target=count_then_release)
        t.start()
        waiting.set()
        # If wait() held the GIL, the counter could not run, the engine would stay paused and
        # this would time out.
        batch.wait_all(timeout_s=60)
        t.join()
        assert counted == [100_000]
        assert np.array_equal(as_array(buf), data)


def test_overlap_of_two_threads_during_a_real_read(disk_file: Path) -> None:
    """Without the pause hook: the counter advances while the waiter is inside wait()."""
    with Engine("pread", threads=1, chunk_bytes=4096) as engine, File(disk_file) as f:
        buf = AlignedBuffer(DATA_NBYTES)
        stop = threading.Event()
        count = [0]

        def spin() -> None:
            while not stop.is_set():
                count[0] += 1

        t = threading.Thread(target=spin)
        t.start()
        try:
            overlapped = False
            for _ in range(20):  # each round: many 4 KiB preads on one thread
                reads = [(f, 0, DATA_NBYTES, buf, 0, 0)] * 8
                batch = engine.submit([(*r[:5], i) for i, r in enumerate(reads)])
                before = count[0]
                batch.wait_all(timeout_s=60)
                if count[0] > before:
                    overlapped = True
                    break
        finally:
            stop.set()
            t.join()
        assert overlapped


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_concurrent_batches(data_file: Path, data: np.ndarray, backend: str) -> None:
    rng = np.random.default_rng(7)
    with Engine(backend, queue_depth=8, threads=3, chunk_bytes=8192) as engine:
        f = File(data_file)
        errors: list[BaseException] = []

        def worker(seed: int) -> None:
            r = np.random.default_rng(seed)
            try:
                for _ in range(15):
                    dest = bytearray(64 << 10)
                    plans = []
                    for i in range(int(r.integers(1, 5))):
                        n = int(r.integers(0, 16 << 10))
                        off = int(r.integers(0, DATA_NBYTES - n))
                        plans.append((f, off, n, dest, i * (16 << 10), i))
                    engine.read(plans)
                    for _, off, n, _, d, _ in plans:
                        assert dest[d : d + n] == data[off : off + n].tobytes()
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
        for t in threads:
            t.start()
        # Meanwhile, many batches in flight from this thread, waited in reverse order.
        outs = [AlignedBuffer(PIECE) for _ in range(30)]
        offsets = [int(x) for x in rng.integers(0, DATA_NBYTES - PIECE, size=30)]
        batches = [
            engine.submit([(f, off, PIECE, out, 0, i)])
            for i, (off, out) in enumerate(zip(offsets, outs, strict=True))
        ]
        for i in reversed(range(30)):
            assert batches[i].wait() == [i]
            assert bytes(outs[i]) == data[offsets[i] : offsets[i] + PIECE].tobytes()
        for t in threads:
            t.join()
        f.close()
        assert not errors, errors[0]


def test_a_batch_keeps_its_engine_alive(disk_file: Path, data: np.ndarray) -> None:
    f = File(disk_file)
    buf = AlignedBuffer(DATA_NBYTES)
    batch = Engine().submit([(f, 0, DATA_NBYTES, buf, 0, 3)])  # the engine is not referenced
    gc.collect()
    batch.wait_all()
    assert np.array_equal(as_array(buf), data)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork()")
def test_engine_used_after_fork_fails_clearly(disk_file: Path) -> None:
    with Engine() as engine, File(disk_file) as f:
        pid = os.fork()
        if pid == 0:  # child: must raise, not hang
            code = 1
            try:
                engine.submit([(f, 0, 1, bytearray(1), 0, 0)])
            except ValueError as e:
                code = 0 if "another process" in str(e) else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        engine.read([(f, 0, 1, bytearray(1), 0, 0)])  # the parent's engine is unaffected
