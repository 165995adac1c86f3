"""The SSD tier: converted copies of slower sources in a local directory, LRU under a byte budget.

A source (stock safetensors, a checkpoint on a network filesystem) is converted once into a
fastckpt checkpoint under ``<dir>/<key>/``, where ``key`` is a hash of the source's identity: its
resolved path and, for each data file, name, size, modification time and a fingerprint of its
first bytes (the header). A source rewritten in place gets a new key, so an old copy is never
served for it; old copies age out by LRU.

Publishing is atomic: the conversion writes ``<dir>/.tmp-<key>-<pid>-<n>/`` and renames it to
``<dir>/<key>`` (same filesystem), so a crash leaves a temporary directory (removed by ``clear``
and on the next start) but never a half copy under a key. Eviction renames the copy away first,
then deletes it. The LRU order lives on disk (the modification time of ``<key>/.last-used``), so
it survives restarts and is shared by processes using the same directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import time
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Any

from fastckpt.tiers.base import LruTier

FINGERPRINT_BYTES = 1 << 20
_STAMP = ".last-used"
_META = ".source.json"
_counter = itertools.count()


def source_identity(files: Iterable[str], root: str) -> str:
    """Key of a source: hash of its resolved root and each file's name, size, mtime and the
    hash of its first ``FINGERPRINT_BYTES``."""
    h = hashlib.sha256(os.path.realpath(root).encode())
    for path in sorted(files):
        st = os.stat(path)
        h.update(f"\0{os.path.basename(path)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        with open(path, "rb") as f:
            h.update(hashlib.sha256(f.read(FINGERPRINT_BYTES)).digest())
    return h.hexdigest()[:32]


def _du(path: str) -> int:
    total = 0
    for dirpath, _, names in os.walk(path):
        for n in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, n)).st_size
    return total


@dataclass(frozen=True)
class SsdEntry:
    key: str
    path: str
    nbytes: int
    last_used: float
    source: str


def scan(directory: str) -> list[SsdEntry]:
    """Entries in ``directory``, least recently used first (for ``fastckpt cache ls``)."""
    out: list[SsdEntry] = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return out
    for name in names:
        path = os.path.join(directory, name)
        if name.startswith(".") or not os.path.isdir(path):
            continue
        try:
            last = os.stat(os.path.join(path, _STAMP)).st_mtime
        except OSError:
            last = 0.0
        source = ""
        try:
            with open(os.path.join(path, _META), encoding="utf-8") as f:
                source = str(json.load(f).get("source", ""))
        except (OSError, ValueError):
            pass
        out.append(SsdEntry(name, path, _du(path), last, source))
    out.sort(key=lambda e: e.last_used)
    return out


class SsdTier(LruTier[str]):
    """Values are the paths of converted checkpoints; ``put`` takes a staged directory (made by
    ``stage``) and publishes it."""

    def __init__(self, capacity_bytes: int, directory: str) -> None:
        super().__init__(capacity_bytes, name="ssd")
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        for name in os.listdir(directory):
            if name.startswith(".tmp-") or name.startswith(".old-"):
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        for e in scan(directory):
            if self._used + e.nbytes <= capacity_bytes:
                super().put(e.key, e.path, e.nbytes)
                self._in -= e.nbytes  # found on disk, not brought in
            else:
                self._remove(e.path)

    def stage(self, key: str) -> str:
        """A fresh temporary directory path (not created) on the tier's filesystem."""
        return os.path.join(self.directory, f".tmp-{key}-{os.getpid()}-{next(_counter)}")

    def put(self, key: Hashable, value: str, nbytes: int, *, pin: bool = False) -> bool:
        """Publish the staged directory ``value`` under ``key``; on a bypass (too large, or no
        room because everything is in use) the staged directory is deleted."""
        final = os.path.join(self.directory, str(key))
        if not super().put(key, final, nbytes, pin=pin):
            self._remove(value)
            return False
        try:
            if os.path.exists(final):  # another process published it first
                self._remove(value)
            else:
                os.replace(value, final)
            self._touch(final)
        except OSError:
            with self._lock:
                self._pop(key)
            self._remove(value)
            raise
        return True

    def record_source(self, staged: str, source: str) -> None:
        with open(os.path.join(staged, _META), "w", encoding="utf-8") as f:
            json.dump({"source": source, "created": time.time()}, f)

    def get(self, key: Hashable) -> str | None:
        path = super().get(key)
        if path is not None:
            if not os.path.isdir(path):  # deleted behind our back (fastckpt cache clear)
                with self._lock:
                    if key in self._items:
                        self._pop(key)
                return None
            self._touch(path)
        return path

    def _touch(self, path: str) -> None:
        stamp = os.path.join(path, _STAMP)
        try:
            with open(stamp, "a"):
                pass
            os.utime(stamp)
        except OSError:
            pass

    def _release(self, key: Hashable, value: str) -> None:
        self._remove(value)

    def _remove(self, path: str) -> None:
        if not os.path.exists(path):
            return
        gone = os.path.join(self.directory, f".old-{os.path.basename(path)}-{next(_counter)}")
        try:
            os.replace(path, gone)
        except OSError:
            gone = path
        shutil.rmtree(gone, ignore_errors=True)


def clear(directory: str) -> tuple[int, int]:
    """Delete every entry (and leftover temporary directory) of an SSD tier directory; returns
    (entries, bytes) removed."""
    entries = scan(directory)
    removed = sum(e.nbytes for e in entries)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return 0, 0
    for name in names:
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
    return len(entries), removed


def describe(entries: list[SsdEntry]) -> list[dict[str, Any]]:
    return [
        {"key": e.key, "nbytes": e.nbytes, "last_used": e.last_used, "source": e.source}
        for e in entries
    ]
