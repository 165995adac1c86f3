"""Bookkeeping the Loader needs around its tiers: what identifies a checkpoint and a plan, and
single flight (concurrent loads of one checkpoint share one read). Pure Python, no torch."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from typing import Any

from fastckpt.format.fsdir import OpenFile
from fastckpt.format.index import Index
from fastckpt.loader.plan import LoadPlan


def checkpoint_identity(index: Index, files: Sequence[OpenFile] = ()) -> tuple[str, str]:
    """(root, fingerprint): the fingerprint changes when any partition file is replaced or
    rewritten (inode, size, modification and change times: a rewrite in place that restores the
    modification time still moves the change time). With ``files`` (the partitions' validated
    open files) the files the load reads are fingerprinted, not whatever the paths name now: a
    checkpoint republished meanwhile cannot be cached under the new files' identity."""
    h = hashlib.sha256()
    for i, part in enumerate(index.partitions):
        st = os.fstat(files[i].fd) if i < len(files) else os.stat(part.path)
        h.update(
            f"{part.file}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0".encode()
        )
    return os.path.realpath(index.root), h.hexdigest()[:24]


class SingleFlight:
    """Single flight: concurrent calls with one key share one execution of the work."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[Hashable, Future[Any]] = {}
        self.leaders = 0
        self.followers = 0

    def run(self, key: Hashable, work: Callable[[], Any]) -> tuple[Any, bool]:
        """(result, led): ``led`` is True for the call that did the work."""
        with self._lock:
            fut = self._running.get(key)
            leader = fut is None
            if fut is None:
                fut = Future()
                self._running[key] = fut
                self.leaders += 1
            else:
                self.followers += 1
        if not leader:
            return fut.result(), False
        try:
            result = work()
        except BaseException as exc:
            fut.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._running.pop(key, None)
        fut.set_result(result)
        return result, True


def plan_signature(plan: LoadPlan, device: str) -> str:
    """A short hash of the buffers a plan places on ``device`` (the GPU tier revives buffers
    only for the very same layout)."""
    h = hashlib.sha256()
    for b in plan.buffers:
        if b.device != device:
            continue
        h.update(repr((b.index, b.partition, b.nbytes, b.segments)).encode())
    return h.hexdigest()[:16]
