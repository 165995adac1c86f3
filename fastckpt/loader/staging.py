"""The pinned staging ring: page-locked slots that reads land in before a copy to a device.

Pinning host memory is expensive (measured on an H200 box: cudaHostAlloc of 2 GiB 2.1 s,
cudaHostRegister of 7.8 GB 3.2 s), so it is never done per load and never on the critical path
when it can be avoided:

- the ring is made once per process (per copy backend) and reused by every load of every Loader;
- it starts with ``min_slots`` slots pinned when first needed (a few tens of milliseconds), and a
  background thread pins more, up to ``ring_bytes``, only when a load shows it would use them: a
  load larger than the ring, or one whose pipeline waited for a slot. A running pipeline picks up
  slots as they are added;
- the way of pinning is the fastest one measured on this machine (``pin_methods``): 2 MiB-aligned
  anonymous memory advised for transparent huge pages then registered (``register``), a memfd
  then registered (``memfd``), or the driver's own allocation (``alloc``). The figures are stored
  with the machine profile, measured once.

``close()`` stops pipelines using the ring, waits until every slot is back (a pipeline gives a
slot back only after its last copy completed) and frees the memory; a forked child gets a fresh
ring (the parent's pinned memory and CUDA state are not usable there).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
import warnings
from typing import Any

from fastckpt import io_engine
from fastckpt.config import Config
from fastckpt.config import profile_dir as _profile_dir

MIN_SLOTS = 2
PIN_PROBE_BYTES = 16 << 20


class StagingRing:
    """Slots of ``slot_bytes`` for ``backend``'s pipelines: ``min_slots`` pinned on first use,
    grown in the background up to ``max_slots`` (``grow``). Thread-safe."""

    def __init__(
        self,
        backend: Any,
        slot_bytes: int,
        max_slots: int,
        *,
        method: str = "register",
        min_slots: int = MIN_SLOTS,
        make_buffer: Any = None,
    ) -> None:
        if slot_bytes <= 0 or slot_bytes % 4096:
            raise ValueError(f"slot_bytes={slot_bytes}: must be a positive multiple of 4096")
        self.backend = backend
        self.slot_bytes = slot_bytes
        self.max_slots = max(1, max_slots)
        self.min_slots = max(1, min(min_slots, self.max_slots))
        self.method = method
        # nbytes -> pinned memory (a seam: tests make pinning fail)
        self._make_buffer = make_buffer or (
            lambda n: io_engine.PinnedBuffer(self.backend, n, self.method)
        )
        self.slots = io_engine.SlotSource(slot_bytes)
        self._buffers: list[Any] = []
        self._lock = threading.Lock()
        self._growing: threading.Thread | None = None
        self.pin_s = 0.0  # seconds spent pinning, all slots
        self.error: BaseException | None = None
        self.closed = False

    @property
    def total(self) -> int:
        return int(self.slots.total)

    def _pin_one(self) -> bool:
        """Pin one more slot (False when full, closed, or pinning failed before)."""
        with self._lock:
            if self.closed or self.total >= self.max_slots or self.error is not None:
                return False
        t0 = time.perf_counter()
        try:
            buf = self._make_buffer(self.slot_bytes)
        except Exception as exc:  # out of pinnable memory (RLIMIT_MEMLOCK, driver): run with less
            with self._lock:
                self.error = exc
            if self.total == 0:
                raise
            warnings.warn(f"fastckpt: {self.shortfall()}", RuntimeWarning, stacklevel=3)
            return False
        with self._lock:
            self.pin_s += time.perf_counter() - t0
            if self.closed:
                return False
            self._buffers.append(buf)
            self.slots.add(buf)
        return True

    def ready(self) -> float:
        """Make sure ``min_slots`` exist (pinned now, on the caller's time: the first load of a
        process pays this once). Returns the seconds spent."""
        t0 = time.perf_counter()
        while self.total < self.min_slots and self._pin_one():
            pass
        return time.perf_counter() - t0

    def grow(self, want_slots: int) -> None:
        """Pin slots in the background until ``want_slots`` (at most ``max_slots``) exist; a
        no-op while a growth already runs or when the ring is that large."""
        want = min(want_slots, self.max_slots)
        with self._lock:
            if self.closed or self.total >= want or self.error is not None:
                return
            if self._growing is not None and self._growing.is_alive():
                return

            def work() -> None:
                while self.total < want and self._pin_one():
                    pass

            self._growing = threading.Thread(target=work, name="fastckpt-pin", daemon=True)
            self._growing.start()

    def wait_growth(self, timeout_s: float | None = None) -> None:
        """Wait for a background growth to finish (tests, benchmarks)."""
        t = self._growing
        if t is not None:
            t.join(timeout_s)

    def shortfall(self) -> str | None:
        """Why the ring has fewer slots than it may (pinning failed), or None."""
        if self.error is None:
            return None
        return (
            f"pinned staging ring has {self.total} of {self.max_slots} slots: pinning failed "
            f"({type(self.error).__name__}: {self.error}); device loads run with fewer slots"
        )

    def close(self, timeout_s: float | None = None) -> bool:
        """Stop pipelines using the ring, wait for every slot to come back, free the memory.
        False when ``timeout_s`` passed first."""
        with self._lock:
            self.closed = True
        self.wait_growth(timeout_s)
        done = bool(self.slots.close(cancel_running=True, timeout_s=timeout_s))
        if done:
            with self._lock:
                self._buffers.clear()
        return done


# ----------------------------------------------------------------------- pinning methods
def measure_pin_methods(backend: Any, nbytes: int = PIN_PROBE_BYTES) -> dict[str, float]:
    """Seconds to make ``nbytes`` of pinned memory with each method on this machine (inf for
    a method that failed)."""
    out: dict[str, float] = {}
    for method in io_engine.PIN_METHODS:
        try:
            t0 = time.perf_counter()
            buf = io_engine.PinnedBuffer(backend, nbytes, method)
            out[method] = time.perf_counter() - t0
            del buf
        except Exception:
            out[method] = float("inf")
    return out


_pin_lock = threading.Lock()
_pin_memo: dict[str, str] = {}


def pin_method(backend: Any, forced: str, profile_dir: str, key: str) -> str:
    """The pinning method for ``backend``: ``forced`` unless ``auto``, else the fastest one
    measured on this machine (stored in ``profile_dir`` under ``key``, e.g. the GPU's name)."""
    if forced != "auto":
        return forced
    with _pin_lock:
        hit = _pin_memo.get(key)
        if hit is not None:
            return hit
        path = os.path.join(profile_dir, f"pin-{_safe(key)}.json")
        method = None
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            with open(path, encoding="utf-8") as f:
                stored = json.load(f)
            if stored.get("best") in io_engine.PIN_METHODS:
                method = str(stored["best"])
        if method is None:
            figures = measure_pin_methods(backend)
            method = min(figures, key=lambda m: figures[m])
            with contextlib.suppress(OSError):
                _store(
                    path, {"key": key, "seconds": figures, "best": method, "bytes": PIN_PROBE_BYTES}
                )
        _pin_memo[key] = method
        return method


def _safe(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in key)[:80]


def _store(path: str, data: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".pin-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(
                {
                    k: (v if not isinstance(v, dict) else {m: _finite(x) for m, x in v.items()})
                    for k, v in data.items()
                },
                f,
                indent=1,
            )
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _finite(x: float) -> float | None:
    return x if x != float("inf") else None


# ------------------------------------------------------------------ the process's rings
_rings_lock = threading.Lock()
_rings: dict[tuple[int, int], StagingRing] = {}


def process_ring(backend_key: int, make: Any) -> StagingRing:
    """The process's ring for a backend kind (``make()`` builds it the first time)."""
    with _rings_lock:
        ring = _rings.get((backend_key, 0))
        if ring is None or ring.closed:
            ring = make()
            _rings[(backend_key, 0)] = ring
        return ring


def _forget_rings() -> None:
    """In a forked child: the parent's rings (pinned memory, CUDA state) are unusable; keep
    them referenced (never freed here) and start afresh (with new locks: another thread of the
    parent may have held one at the fork)."""
    global _rings_lock, _pin_lock
    _abandoned.append(dict(_rings))
    _rings.clear()
    _pin_memo.clear()
    _rings_lock = threading.Lock()
    _pin_lock = threading.Lock()


def cuda_ring(backend: Any, cfg: Config) -> StagingRing:
    """The process's pinned staging ring for CUDA loads with ``cfg``'s slot size (made, with
    the machine's fastest pinning method, on the first device load)."""
    slot = cfg.ring_slot_bytes

    def make() -> StagingRing:
        import torch

        key = f"cuda-{torch.cuda.get_device_name(0)}"
        method = pin_method(backend, cfg.pin_method, _profile_dir(cfg), key)
        return StagingRing(backend, slot, max(2, cfg.ring_bytes // slot), method=method)

    return process_ring(slot, make)


_abandoned: list[Any] = []
os.register_at_fork(after_in_child=_forget_rings)
