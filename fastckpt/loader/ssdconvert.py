"""The SSD tier's side of a load: a converted local copy of a slower source, made after (or,
``inline``, before) the first load that finds none.

Whether a source is slow is the policy's rule (``policy.is_slow_source``: stock safetensors, a
network or FUSE filesystem). Keying by content, one conversion for concurrent callers, checking a
copy before it is used, dropping and rebuilding one that fails a check and falling back to the
source on a full disk are the tier's (``SsdTier.open_copy``).

When the copy is made (``ssd_convert``): by default (``background``) a load that finds no
complete copy reads the source directly, as it would without the tier, and the conversion starts
after it, on the Loader's conversion thread (``Conversions``): one at a time per Loader, one per
source for concurrent loads and for processes sharing the tier's directory (``FlightLock``). A
load while it runs reads the source too (a copy is found only once it is published and checked);
the next load after it reads the copy. ``inline`` converts first and reads the copy (the first
load waits for the conversion). Why after the load and not beside it: docs/tiers.md (measured).

The conversion itself reads the source through the one load core: the checkpoint is opened and
validated and read window by window by ``Loader.execute`` (mapped where it is in the page cache,
as after a buffered or mapped load of it, else read from storage again; FORMAT.md's rules
checked on every tensor) and handed to the writer, so a converted copy is made of exactly the
bytes a load of the source would return.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from fastckpt.errors import MissingPartitionError
from fastckpt.format.fsdir import CheckpointDir
from fastckpt.format.index import Index, TensorEntry
from fastckpt.format.stored import StoredTensor
from fastckpt.format.writer import tool_name, write_checkpoint
from fastckpt.loader import policy, profile
from fastckpt.loader.plan import windows
from fastckpt.tiers.ssd import SsdTier
from fastckpt.tiers.ssdfiles import source_files, stamp_key

if TYPE_CHECKING:  # pragma: no cover
    from fastckpt.loader.opening import Opened
    from fastckpt.loader.session import Loader

WINDOW_BYTES = 256 << 20  # tensors read per executor run while converting

log = logging.getLogger("fastckpt.loader")


def slow_source(index: Index) -> bool:
    """Whether the SSD tier keeps a copy of this source (``policy.is_slow_source`` on its kind
    and the filesystem of its first data file)."""
    if not index.partitions:
        return False
    try:
        _, fs_type = profile.fs_key(index.partitions[0].path)
    except OSError:
        return False
    return policy.is_slow_source(index.kind, fs_type)


def ssd_key(tier: SsdTier, index: Index, source: str) -> str | None:
    """The key of the copy the tier holds for this source as it is now (None: none known)."""
    return tier.key_of(source_files(index), source)


def source_stamp(index: Index, source: str) -> str | None:
    """The source's stamp key as it is now (``stat`` calls; None when a file is gone): what
    names one source's conversion while it runs."""
    try:
        return stamp_key(source_files(index), source)
    except OSError:
        return None


class ConversionCancelled(Exception):
    """A background conversion stopped because its Loader closed or the process is exiting
    (nothing of it is kept)."""


class Conversions:
    """The conversions a Loader runs in the background: one thread (at the process's own
    priority: see the note above ``_Windows``), one conversion at a time, one per source (its
    stamp key) however many loads ask; what ran, for ``cache_info``.

    A conversion that failed, or whose copy the tier could not keep (too large, no room, disk
    full), is not tried again for the same source stamps by this Loader (a changed source, or
    a new Loader, tries again); a failure is logged once (``fastckpt.loader``) and noted in the
    next loads of that source. ``close`` cancels, and so does the interpreter's exit: a
    conversion running then stops at its next window (its staged files are removed, as for any
    failed conversion), queued ones never start."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._running: dict[str, tuple[str, float]] = {}  # stamp key -> (source, since)
        self._given_up: dict[str, str] = {}  # stamp key -> why
        self._cancel = threading.Event()
        self._lane: ThreadPoolExecutor | None = None
        self.counts = {
            "scheduled": 0,
            "done": 0,
            "not_kept": 0,
            "failed": 0,
            "cancelled": 0,
            "elsewhere": 0,
        }
        self.last_error = ""

    @property
    def cancelled(self) -> bool:
        """Whether conversions stop: ``cancel`` was called (``Loader.close``), or the
        interpreter is exiting (its main thread has finished)."""
        return self._cancel.is_set() or not threading.main_thread().is_alive()

    def state(self, skey: str) -> str:
        """``running`` (scheduled or running), ``given up: <why>``, or ``""``."""
        with self._lock:
            if skey in self._running:
                return "running"
            why = self._given_up.get(skey)
        return f"given up: {why}" if why is not None else ""

    def schedule(self, skey: str, source: str, work: Callable[[], str]) -> bool:
        """Run ``work`` (returns an outcome: ``done``, ``not_kept``, ``elsewhere``) on the
        conversion thread, unless this source's conversion is running, was given up, or the
        Loader is closing; True when scheduled."""
        with self._lock:
            if self.cancelled or skey in self._running or skey in self._given_up:
                return False
            if self._lane is None:
                self._lane = ThreadPoolExecutor(1, thread_name_prefix="fastckpt-ssd-convert")
            self._running[skey] = (source, time.time())
            self.counts["scheduled"] += 1
            lane = self._lane
        try:
            lane.submit(self._run, skey, source, work)
        except RuntimeError:  # shut down meanwhile (the Loader closed)
            with self._lock:
                self._running.pop(skey, None)
                self.counts["scheduled"] -= 1
                self._idle.notify_all()
            return False
        return True

    def _run(self, skey: str, source: str, work: Callable[[], str]) -> None:
        outcome, why = "failed", ""
        try:
            if self.cancelled:
                raise ConversionCancelled
            outcome = work()
        except BaseException as exc:  # a conversion never fails anyone's load
            # (a thread pool refusing work at exit may say so before the main thread ends)
            exiting = isinstance(exc, RuntimeError) and "interpreter shutdown" in str(exc)
            if self.cancelled or exiting or isinstance(exc, ConversionCancelled):
                outcome = "cancelled"
            else:
                why = f"{type(exc).__name__}: {exc}"
                log.warning("fastckpt: the SSD-tier conversion of %s failed (%s)", source, why)
        with self._lock:
            self._running.pop(skey, None)
            self.counts[outcome] += 1
            if outcome == "failed":
                self.last_error = f"{source}: {why}"
                self._given_up[skey] = why
            elif outcome == "not_kept":
                self._given_up[skey] = "the SSD tier could not keep the copy"
            self._idle.notify_all()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait until no conversion is running or queued (those scheduled meanwhile too);
        False when ``timeout_s`` passed first. ``Loader.close`` cancels conversions: a caller
        that wants the copy kept waits here first (or warms the tier with
        ``Loader.prefetch(path, tier="ssd")``, which makes it before it returns)."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._running, timeout_s)

    def cancel(self) -> None:
        """From now on nothing starts, and a running conversion stops at its next window (it
        is not published)."""
        self._cancel.set()

    def close(self) -> None:
        """Cancel, drop queued conversions and wait for the running one to stop."""
        self.cancel()
        with self._lock:
            lane, self._lane = self._lane, None
        if lane is not None:
            lane.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self.counts["cancelled"] += len(self._running)  # queued, never started
            self._running.clear()
            self._idle.notify_all()

    def info(self) -> dict[str, Any]:
        """Counts by outcome, the conversions running or queued (``converting``: source and
        since when), the last error."""
        with self._lock:
            return {
                **self.counts,
                "converting": [
                    {"source": src, "since": since} for src, since in self._running.values()
                ],
                "last_error": self.last_error,
            }


# The conversion thread runs at the process's own priority. It was niced to 19 once (on an idle
# machine, touching an 800 MB load right after it took 0.04-0.14 s beside a niced conversion,
# 0.17-0.25 s beside one at normal priority), but the conversion holds the interpreter lock
# between its C++ reads and writes, and a niced thread that other processes' threads keep off
# the CPU keeps that lock: with two CPU-bound processes beside it on the 2-core VM, a token step
# of the same replica (0.02-0.03 s) waited 2.5 s in 1 round of 6 and 0.4-0.5 s in 2 more, and
# no conversion finished within 3 s; at normal priority the slowest step took 0.08-0.09 s (the
# median 0.032 s against 0.017 s alone) and every copy was done in time
# (benchmarks/ssd_convert_priority.py, 2026-12-05).


class _Windows:
    """The tensors of an opened checkpoint, read by the load core one window at a time, in the
    order their bytes are stored (the order the writer asks for them in)."""

    def __init__(self, loader: Loader, opened: Opened, window_bytes: int) -> None:
        self._loader = loader
        self._opened = opened
        self._cfg = loader.config()
        self._groups = [
            [stored for stored, _ in group]
            for group in windows(opened.index, list(opened.index.tensors), window_bytes)
        ]
        self._where = {name: g for g, group in enumerate(self._groups) for name in group}
        self._current = -1
        self._tensors: dict[str, Any] = {}

    def bytes_of(self, name: str) -> memoryview:
        g = self._where[name]
        if g != self._current:
            self._tensors = {}
            if self._loader.conversions.cancelled:
                raise ConversionCancelled  # the Loader is closing, or the process exiting
            tensors, _ = self._loader.execute(
                self._opened, "cpu", names=self._groups[g], cfg=self._cfg, tiers=False
            )
            self._tensors, self._current = tensors, g
        import torch

        t = self._tensors.pop(name).reshape(-1).view(torch.uint8)
        return memoryview(t.numpy())


class _CoreTensor(StoredTensor):
    def __init__(self, source: _Windows, entry: TensorEntry) -> None:
        self._source = source
        self.name = entry.name
        self.dtype = entry.dtype
        self.shape = tuple(entry.shape)
        self.nbytes = entry.nbytes

    def write_to(self, out: Any) -> None:
        if self.nbytes:
            out.write(self._source.bytes_of(self.name))


def convert_opened(
    loader: Loader, opened: Opened, dst: str, *, window_bytes: int = WINDOW_BYTES
) -> Index:
    """Write the opened checkpoint as a fastckpt checkpoint at ``dst`` (published atomically),
    its tensors read through the load core, its carried files copied from descriptors opened
    beneath its directory."""
    index = opened.index
    source = _Windows(loader, opened, window_bytes)
    order = sorted(index.tensors.values(), key=lambda e: (e.partition, e.offset, e.name))
    tensors = [_CoreTensor(source, e) for e in order]
    carried = [*index.files, *index.tree]
    fds: dict[str, int] = {}
    try:
        if carried:
            with CheckpointDir(index.root) as d:
                for rel in carried:
                    held = opened.carried.get(rel)
                    if held is not None:
                        fds[rel] = os.dup(held.fd)
                        continue
                    try:
                        f = d.open(rel, error=MissingPartitionError, what="carried file")
                    except FileNotFoundError:
                        raise MissingPartitionError(
                            "carried file is missing", path=os.path.join(index.root, rel)
                        ) from None
                    fds[rel] = f.fd
        top = [rel for rel in carried if "/" not in rel]
        return write_checkpoint(
            dst,
            tensors,
            aliases=dict(index.aliases),
            files=[(rel, os.path.join(index.root, rel)) for rel in top],
            file_fds={rel: fds[rel] for rel in top},
            tree={rel: fds[rel] for rel in carried if "/" in rel},
            metadata={str(k): str(v) for k, v in index.metadata.items()},
            source={"kind": index.kind, "path": index.root, "tool": tool_name()},
            progress=False,
        )
    finally:
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
