"""Parallel ranged GETs into local files, each byte range announced as it lands.

A ``Download`` moves objects into open local files (a staging file of the SSD tier, or a memfd)
with ``concurrency`` worker threads, each fetching one range of ``range_bytes`` at a time, front
to back. As bytes land they are marked on the file's ``io_engine.RangeGate``; the loader's reads
(the C++ copy pipeline's gated reads, the executor's CPU reads) wait on those gates, so the copy
to the device overlaps the download and the first tensors are usable before the last byte
arrives. ``want`` moves the ranges a reader waits for to the front of the queue.

What is announced is right:

- a fastckpt partition is fetched in whole checksum chunks, and a chunk is announced only after
  its CRC32C matched the index; a mismatch fetches the chunk again, and after the retries the
  download fails with ``ChecksumError`` naming the object and the chunk;
- every response must be the exact range asked for, of the same object generation (the store
  checks ``Content-Range``, size, ETag, version id; ``ObjectChangedError`` otherwise);
- a dropped or stalled connection, throttling (503 SlowDown, 429) or a short body are retried
  from the byte where they stopped, with exponential backoff and jitter (the server's
  ``Retry-After`` honoured), ``retries`` times without progress before the download fails.

A failure or ``cancel`` stops every worker (within one buffer read or the store timeout), fails
every gate (readers then raise the download's error) and runs ``on_finish(error)`` once the last
worker is gone; a complete download runs ``on_finish(None)``. Workers are daemon threads: an
interrupted process never waits for them.
"""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from fastckpt import io_engine
from fastckpt.errors import ChecksumError, RemoteError
from fastckpt.remote.store import ObjectInfo, RangeBody, Store, Transient

_R = TypeVar("_R")
BUFFER_BYTES = 1 << 20  # one socket read, one pwrite
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 10.0


@dataclass
class Target:
    """One object and where it lands: ``fd`` (already sized), its ``gate``, the ranges already
    there (``ready``: fetched before, say a header), and the chunk checksums of a fastckpt
    partition (``chunk_bytes`` and ``checksums``; each landed chunk is checked)."""

    info: ObjectInfo
    fd: int
    gate: io_engine.RangeGate
    ready: Sequence[tuple[int, int]] = ()
    chunk_bytes: int = 0
    checksums: Sequence[int] | None = None


@dataclass
class DownloadStats:
    bytes: int = 0
    requests: int = 0
    retries: int = 0
    refetched_chunks: int = 0
    first_byte_s: float | None = None
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


class Cancelled(Exception):
    pass


class _BadChunk(Exception):
    def __init__(self, lo: int, hi: int, expected: int, actual: int) -> None:
        super().__init__(lo)
        self.lo, self.hi, self.expected, self.actual = lo, hi, expected, actual


@dataclass
class _Policy:
    retries: int
    cancelled: threading.Event
    stats: DownloadStats
    lock: threading.Lock
    t0: float
    sleep: Callable[[float], bool]  # returns True when woken by a cancel


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


def fetch_range(
    store: Store,
    target: Target,
    lo: int,
    hi: int,
    policy: _Policy,
    buf: memoryview,
) -> None:
    """Fetch ``[lo, hi)`` of the target into its file, announcing what lands (chunk by checked
    chunk when the target has checksums: then ``lo`` is a chunk boundary)."""
    info, chunk = target.info, target.chunk_bytes
    pos = chunk_lo = lo
    crc = 0
    attempts = 0  # failures since the last progress
    bad_chunk_attempts = 0
    while pos < hi:
        if policy.cancelled.is_set():
            raise Cancelled()
        progress_at = pos
        try:
            with policy.lock:
                policy.stats.requests += 1
            body = store.get(info, pos, hi)
            try:
                while pos < hi:
                    if policy.cancelled.is_set():
                        raise Cancelled()
                    n = body.readinto(buf[: min(len(buf), hi - pos)])
                    if n <= 0:
                        raise Transient(f"the response ended {hi - pos} bytes early")
                    data = buf[:n]
                    _pwrite_all(target.fd, data, pos)
                    with policy.lock:
                        policy.stats.bytes += n
                        if policy.stats.first_byte_s is None:
                            policy.stats.first_byte_s = time.perf_counter() - policy.t0
                    if target.checksums is None or chunk == 0:
                        target.gate.mark_ready(pos, pos + n)
                        pos += n
                        continue
                    done = 0
                    while done < n:
                        chunk_end = min(chunk_lo + chunk, info.size)
                        take = min(n - done, chunk_end - (pos + done))
                        crc = io_engine.crc32c(data[done : done + take], crc)
                        done += take
                        if pos + done == chunk_end:
                            want = target.checksums[chunk_lo // chunk]
                            if crc != want:
                                raise _BadChunk(chunk_lo, chunk_end, want, crc)
                            target.gate.mark_ready(chunk_lo, chunk_end)
                            bad_chunk_attempts = 0
                            chunk_lo, crc = chunk_end, 0
                    pos += n
            finally:
                body.close()
        except Transient as exc:
            attempts = 1 if pos > progress_at else attempts + 1
            _note_retry(policy, info, exc, attempts)
            if attempts > policy.retries:
                raise RemoteError(
                    errno.ETIMEDOUT if "timeout" in str(exc).lower() else errno.EIO,
                    f"bytes {pos}-{hi - 1} could not be fetched after {attempts} attempts "
                    f"(last: {exc})",
                    info.url,
                ) from None
            if policy.sleep(_backoff(attempts, exc.retry_after_s)):
                raise Cancelled() from None
        except _BadChunk as bad:
            bad_chunk_attempts += 1
            with policy.lock:
                policy.stats.refetched_chunks += 1
            _note_retry(policy, info, f"chunk at {bad.lo} failed its checksum", bad_chunk_attempts)
            if bad_chunk_attempts > policy.retries:
                raise ChecksumError(
                    f"the chunk at offset {bad.lo} failed its CRC32C check "
                    f"{bad_chunk_attempts} times as it was downloaded (expected "
                    f"{bad.expected:#010x}, got {bad.actual:#010x}): the store's copy is "
                    "corrupted",
                    path=info.url,
                    offset=bad.lo,
                    expected=bad.expected,
                    actual=bad.actual,
                ) from None
            pos = chunk_lo = bad.lo
            crc = 0


def _note_retry(policy: _Policy, info: ObjectInfo, what: object, attempt: int) -> None:
    with policy.lock:
        policy.stats.retries += 1
        if len(policy.stats.errors) < 32:
            policy.stats.errors.append(f"{info.name}: {what} (attempt {attempt})")


def _backoff(attempt: int, hint: float | None) -> float:
    delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (attempt - 1))
    delay *= 0.5 + random.random() / 2  # jitter: workers throttled together do not retry together
    return max(delay, hint or 0.0)


class Download:
    """Fetch ``targets`` into their files with ``concurrency`` threads (see the module
    docstring). ``start()`` begins; ``wait()`` blocks until it finished (re-raising its error);
    ``cancel()`` stops it."""

    def __init__(
        self,
        store: Store,
        targets: Sequence[Target],
        *,
        concurrency: int,
        range_bytes: int,
        retries: int,
        on_finish: Callable[[BaseException | None], None] | None = None,
    ) -> None:
        self.store = store
        self.targets = list(targets)
        self.concurrency = max(1, concurrency)
        self.stats = DownloadStats()
        self.error: BaseException | None = None
        self.finished = threading.Event()
        self._on_finish = on_finish
        self._lock = threading.Lock()
        self._cancelled = threading.Event()
        self._policy = _Policy(
            retries, self._cancelled, self.stats, threading.Lock(), 0.0, self._cancelled.wait
        )
        self._pending: list[tuple[int, int, int]] = []  # (target, lo, hi), front first
        for t, target in enumerate(self.targets):
            step = range_bytes
            if target.checksums is not None and target.chunk_bytes:
                step = -(-range_bytes // target.chunk_bytes) * target.chunk_bytes
            for lo, hi in _missing(target.info.size, target.ready):
                if target.checksums is not None and target.chunk_bytes:
                    lo -= lo % target.chunk_bytes  # checked chunks are fetched whole
                at = lo
                while at < hi:
                    end = min(hi, at + step)
                    self._pending.append((t, at, end))
                    at = end
            for lo, hi in target.ready:
                target.gate.mark_ready(lo, hi)
        self.nbytes = sum(hi - lo for _, lo, hi in self._pending)
        self._running = 0
        self._started = False

    # ------------------------------------------------------------------ control
    def start(self) -> Download:
        with self._lock:
            if self._started:
                return self
            self._started = True
            self._policy.t0 = time.perf_counter()
            workers = min(self.concurrency, len(self._pending))
            self._running = workers
        if workers == 0:
            self._finish()
            return self
        for i in range(workers):
            threading.Thread(target=self._worker, name=f"fastckpt-get-{i}", daemon=True).start()
        return self

    def want(self, target: int, lo: int, hi: int) -> None:
        """Fetch the pending ranges of ``target`` that overlap ``[lo, hi)`` next."""
        with self._lock:
            mine = [p for p in self._pending if p[0] == target and p[1] < hi and p[2] > lo]
            if not mine or self._pending[: len(mine)] == mine:
                return
            rest = [p for p in self._pending if not (p[0] == target and p[1] < hi and p[2] > lo)]
            self._pending = mine + rest

    def cancel(self, reason: str = "the download was cancelled") -> None:
        self._fail(RemoteError(errno.ECANCELED, reason, self._name()))

    @property
    def finishing(self) -> bool:
        """Every range is fetched or being fetched, and nothing failed (what is left is the
        last ranges in flight and ``on_finish``: publishing a write-through copy)."""
        with self._lock:
            return self._started and not self._pending and self.error is None

    @property
    def done(self) -> bool:
        return self.finished.is_set() and self.error is None

    def wait(self, timeout_s: float | None = None) -> bool:
        """True once finished (raises the download's error, if it failed); False on timeout.
        Waits in short slices, so Ctrl-C on the main thread interrupts it."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.finished.wait(0.1):
            if deadline is not None and time.monotonic() >= deadline:
                return False
        if self.error is not None:
            raise self.error
        return True

    # ------------------------------------------------------------------ workers
    def _name(self) -> str:
        return self.targets[0].info.url if self.targets else self.store.name

    def _next(self) -> tuple[int, int, int] | None:
        with self._lock:
            if self._cancelled.is_set() or not self._pending:
                return None
            return self._pending.pop(0)

    def _worker(self) -> None:
        buf = memoryview(bytearray(BUFFER_BYTES))
        try:
            while True:
                piece = self._next()
                if piece is None:
                    break
                t, lo, hi = piece
                fetch_range(self.store, self.targets[t], lo, hi, self._policy, buf)
        except Cancelled:
            pass
        except BaseException as exc:
            self._fail(exc)
        finally:
            with self._lock:
                self._running -= 1
                last = self._running == 0
            if last:
                self._finish()

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is not None or self.finished.is_set():
                return
            self.error = exc
            self._cancelled.set()
            self._pending.clear()
            idle = self._started and self._running == 0
        code = getattr(exc, "errno", None) or errno.EIO
        for target in self.targets:
            target.gate.fail(code, str(exc))
        if not self._started or idle:
            self._finish()

    def _finish(self) -> None:
        with self._lock:
            if self.finished.is_set():
                return
            self.stats.seconds = time.perf_counter() - self._policy.t0 if self._started else 0.0
            error = self.error
            if error is None and self._pending:  # pragma: no cover - a worker left work behind
                error = self.error = RuntimeError("internal error: the download stopped early")
        try:
            if self._on_finish is not None:
                self._on_finish(error)
        finally:
            self.finished.set()


def _missing(size: int, ready: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """``[0, size)`` without the ``ready`` ranges."""
    out: list[tuple[int, int]] = []
    at = 0
    for lo, hi in sorted(ready):
        if lo > at:
            out.append((at, min(lo, size)))
        at = max(at, hi)
    if at < size:
        out.append((at, size))
    return [(lo, hi) for lo, hi in out if hi > lo]


def _sleep(seconds: float) -> bool:
    time.sleep(seconds)
    return False


def fetch_whole(
    store: Store, info: ObjectInfo, fd: int, *, retries: int, lo: int = 0, hi: int | None = None
) -> None:
    """Fetch ``[lo, hi)`` (default the whole object) into ``fd`` in this thread, with the same
    retries and checks as a download (for the small files read before the index is known)."""
    end = info.size if hi is None else hi
    if end <= lo:
        return
    policy = _Policy(
        retries,
        threading.Event(),
        DownloadStats(),
        threading.Lock(),
        time.perf_counter(),
        _sleep,
    )
    gate = io_engine.RangeGate(info.url)
    fetch_range(store, Target(info, fd, gate), lo, end, policy, memoryview(bytearray(BUFFER_BYTES)))


class RetryingStore:
    """A store whose identity calls (``head``, ``list``) are retried as a range is: throttling,
    a dropped or stalled connection, a server error, with backoff, ``retries`` times, then
    ``RemoteError`` naming the object. ``get`` is passed through (``fetch_range`` retries it
    from the byte where it stopped)."""

    def __init__(self, store: Store, retries: int) -> None:
        self.store = store
        self.retries = retries
        self.name = store.name
        self.listable = store.listable

    def _retried(self, what: str, fn: Callable[[], _R]) -> _R:
        attempt = 0
        while True:
            try:
                return fn()
            except Transient as exc:
                attempt += 1
                if attempt > self.retries:
                    raise RemoteError(
                        errno.ETIMEDOUT if "timeout" in str(exc).lower() else errno.EIO,
                        f"no answer after {attempt} attempts (last: {exc})",
                        what,
                    ) from None
                time.sleep(_backoff(attempt, exc.retry_after_s))

    def head(self, key: str, name: str, version: str = "") -> ObjectInfo:
        return self._retried(f"{self.name}/{key}", lambda: self.store.head(key, name, version))

    def list(self, prefix: str) -> list[ObjectInfo]:
        return self._retried(f"{self.name}/{prefix}", lambda: self.store.list(prefix))

    def get(self, info: ObjectInfo, lo: int, hi: int) -> RangeBody:
        return self.store.get(info, lo, hi)


__all__ = [
    "BUFFER_BYTES",
    "Download",
    "DownloadStats",
    "RetryingStore",
    "Target",
    "fetch_whole",
]
