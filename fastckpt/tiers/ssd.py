"""The SSD tier: converted copies of slower sources in a local directory, LRU under a byte budget.

A source (stock safetensors, a checkpoint on a network filesystem) is converted once into a
fastckpt checkpoint under ``<dir>/<key>/``, where ``key`` is a hash of the source's **content**:
a SHA-256 tree hash of every byte of its data files and carried files (with their names and
sizes), computed with a few threads when the tier first sees the source. A source rewritten in
any way gets a new key, so an old copy is never served for it; a source whose bytes are the same
(touched, chmod-ed, copied elsewhere) finds its copy again after one hash.

Hashing is not repeated at every load: each copy records the stamps of the sources it was made
from or found for (device, inode, size, mtime and ctime of every file; nobody but the kernel sets
ctime, so a file rewritten with its size and mtime restored still shows a new one). A load whose
source stamps match a record uses that copy after ``stat`` calls only; any other stamp costs one
read of the source to hash it.

A copy is checked before it is handed out: every file of it must still have the stamps it had
when it was published (a copy written to is caught by its ctime), and it must open and validate.
A copy that fails a check, or whose checksums fail a ``verify=True`` load (``reject``), is
dropped and rebuilt from the source, with a ``CacheWarning``. A conversion that runs out of space
(``ENOSPC``, ``EDQUOT``) leaves nothing behind and the load reads the source; the tier says so
once. What each check costs: docs/tiers.md.

Publishing is atomic: the conversion writes ``<dir>/.tmp-<key>-<pid>-<n>/`` and renames it to
``<dir>/<key>`` (same filesystem), so a crash leaves a temporary directory (removed by ``clear``
and by the next start once its process is gone) but never a half copy under a key. Eviction
renames the copy away first, then deletes it; loads that already opened its files keep reading
them. The LRU order lives on disk (the modification time of ``<key>/.last-used``), so it survives
restarts and is shared by processes using the same directory.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastckpt.errors import CacheWarning, FormatError
from fastckpt.format.reader import OpenCheckpoint, open_checkpoint
from fastckpt.tiers.base import LruTier
from fastckpt.tiers.ssdfiles import (
    META_FILE,
    STAMP_FILE,
    FlightLock,
    content_key,
    disk_usage,
    owner_gone,
    read_meta,
    scan,
    stamp_key,
)

META_VERSION = 2
MAX_ALIASES = 16
_STAMP = STAMP_FILE
_META = META_FILE
_counter = itertools.count()
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class SsdTier(LruTier[str]):
    """Values are the paths of converted checkpoints; ``put`` takes a staged directory (made by
    ``stage``) and publishes it. ``open_copy`` is what a load calls: the checked, opened copy of
    a source, converted on first use.

    Args:
        capacity_bytes: disk budget; directory: where copies live.
        convert: ``convert(src, dst)`` making a fastckpt checkpoint (default
            ``fastckpt.convert``); a seam for tests.
        hash_threads: threads hashing a source the tier has not seen (default 4).
    """

    def __init__(
        self,
        capacity_bytes: int,
        directory: str,
        *,
        convert: Callable[[str, str], Any] | None = None,
        hash_threads: int = 4,
    ) -> None:
        super().__init__(capacity_bytes, name="ssd")
        self.directory = directory
        self._convert = convert
        self._hash_threads = hash_threads
        self._aliases: dict[str, str] = {}  # stamp key -> content key
        self._alias_lock = threading.Lock()
        self._flights: dict[str, threading.Lock] = {}
        self._said: set[str] = set()
        self._orphan_pins: dict[Hashable, int] = {}
        os.makedirs(directory, exist_ok=True)
        for name in os.listdir(directory):
            if name.startswith(".old-") or (
                name.startswith((".tmp-", "..tmp-")) and owner_gone(name)
            ):
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        for e in scan(directory):
            if self._used + e.nbytes <= capacity_bytes:
                super().put(e.key, e.path, e.nbytes)
                self._in -= e.nbytes  # found on disk, not brought in
                self._learn(e.key, read_meta(e.path))
            else:
                self._remove(e.path)

    # ------------------------------------------------------------------ what a load calls
    def open_copy(
        self,
        files: Sequence[str],
        source: str,
        *,
        convert: Callable[[str, str], Any] | None = None,
        make: bool = True,
    ) -> tuple[OpenCheckpoint, str] | None:
        """The copy of ``source`` (whose bytes are ``files``), checked, opened and pinned for the
        caller (``unpin(key)`` when done), converted first when there is none (by ``convert``,
        else the tier's own). None when the tier cannot hold one (too large, no room, disk full,
        the source changing while it is read): the caller reads the source.

        Without ``make``, only a complete copy already recorded for the source's stamps is
        looked for (``stat`` calls and the copy's check: nothing is hashed or converted, and a
        copy still being made is never found); None otherwise."""
        try:
            skey = stamp_key(files, source)
        except OSError:
            return None  # the load itself reports a vanished source
        key = self._alias(skey)
        if key is not None:
            got = self._open_checked(key)
            if got is not None:
                return got
        if not make:
            return None
        with self._flight(skey):  # one hash and one conversion for concurrent loads
            key = self._alias(skey)
            if key is not None:
                got = self._open_checked(key)
                if got is not None:
                    return got
            try:
                shape = _shape(files)
                key = None
                if self._may_hold(shape):
                    # a copy of the same sizes exists: the bytes may be the same (a touched or
                    # copied source), so hash first and reuse it if they are
                    key = content_key(files, self._hash_threads)
                    if stamp_key(files, source) != skey:
                        return None  # written while it was hashed: nothing stable to copy
                    got = self._open_checked(key)
                    if got is not None:
                        self._add_alias(key, skey)
                        return got
            except OSError:
                return None
            if key is None:
                with self._lock:
                    self._misses += 1  # not looked up: nothing of this shape is held
            made = self._make(source, files, skey, shape, key, convert)
            got = None if made is None else self._open_checked(made)
            if made is not None and got is not None:
                self._add_alias(made, skey)
            return got

    def reject(self, key: str, reason: str) -> None:
        """Drop the copy ``key``: it failed a check (say, its checksums in a ``verify=True``
        load). Warns; loads that already opened its files keep reading them, and unpin as
        usual; the next load of its source builds a new one."""
        path = self.peek(key) or os.path.join(self.directory, key)
        source = read_meta(path).get("source", "?")
        warnings.warn(
            f"fastckpt: the SSD-tier copy of {source} failed a check ({reason}); it was "
            "removed and is rebuilt from the source",
            CacheWarning,
            stacklevel=3,
        )
        with self._alias_lock:
            for a in [a for a, k in self._aliases.items() if k == key]:
                del self._aliases[a]
        with self._lock:
            # pins held now (the caller's included) are undone by their holders' ``unpin``
            self._orphan_pins[key] = self._orphan_pins.get(key, 0) + self.pins(key)
            value = self._pop(key) if key in self._items else None
            if value is not None:
                self._dropped += 1
        if value is not None:
            self._release(key, value)
        else:
            self._remove(path)

    def key_of(self, files: Sequence[str], source: str) -> str | None:
        """The key of the copy the tier knows for this source as it is now (its stamps; nothing
        is hashed), or None."""
        try:
            key = self._alias(stamp_key(files, source))
        except OSError:
            return None
        return key if key is not None and self.holds(key) else None

    def unpin(self, key: Hashable) -> None:
        """Undo one pin (of a copy dropped by ``reject`` while pinned too)."""
        with self._lock:
            if self._orphan_pins.get(key):
                self._orphan_pins[key] -= 1
                return
            super().unpin(key)

    # ------------------------------------------------------------------ remote sources
    # A remote checkpoint's entry is a copy of its objects' bytes as downloaded (written through
    # while a load streams them), keyed by the objects' identity (``remote_key``), recorded with
    # the URL it came from; it is checked like a converted copy before it is handed out.

    def open_entry(self, key: str) -> tuple[OpenCheckpoint, str] | None:
        """The entry ``key`` (also one another process published), checked, opened and pinned
        for the caller (``unpin(key)``), or None."""
        if not self.holds(key):
            self.adopt(key)
        return self._open_checked(key)

    def adopt(self, key: str) -> bool:
        """Take in an entry another process sharing the directory published under ``key``."""
        path = os.path.join(self.directory, key)
        if self.holds(key) or not os.path.isdir(path) or not read_meta(path):
            return self.holds(key)
        if super().put(key, path, disk_usage(path)):
            with self._lock:
                self._in -= self.size_of(key)  # found on disk, not brought in
            return True
        return False

    def entries_from(self, source: str) -> list[tuple[str, dict[str, Any]]]:
        """(key, record) of the entries recorded for ``source`` (a URL), the most recently
        validated first (one small read per entry held)."""
        out = []
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            if name.startswith(".") or not os.path.isdir(path):
                continue
            meta = read_meta(path)
            if meta.get("source") == source and isinstance(meta.get("remote"), dict):
                out.append((name, meta))
        out.sort(key=lambda e: -float(e[1]["remote"].get("validated", 0.0)))
        return out

    def record(self, key: str) -> dict[str, Any]:
        """What entry ``key`` records of itself (source, remote identity...), or {}."""
        return read_meta(os.path.join(self.directory, key))

    def validated(self, key: str) -> None:
        """Record that the store confirmed entry ``key``'s identity now."""
        path = os.path.join(self.directory, key)
        meta = read_meta(path)
        if isinstance(meta.get("remote"), dict):
            meta["remote"]["validated"] = time.time()
            with contextlib.suppress(OSError):
                _write_json(os.path.join(path, _META), meta)

    def reserve(self, staged: str, sizes: dict[str, int]) -> None:
        """Create the files of a staged entry at their sizes, with their space allocated now
        (``fallocate``), so a disk that fills later cannot fail the download half way. Raises
        OSError (``ENOSPC``, ``EDQUOT``...; the staged directory is removed then)."""
        try:
            os.makedirs(staged)
            for rel, size in sizes.items():
                full = os.path.join(staged, rel)
                os.makedirs(os.path.dirname(full), exist_ok=True)
                fd = os.open(full, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                try:
                    if size:
                        os.posix_fallocate(fd, 0, size)
                finally:
                    os.close(fd)
        except BaseException:
            self._discard(staged)
            raise

    def publish(self, key: str, staged: str, source: str, remote: dict[str, Any]) -> bool:
        """Publish a complete, verified staged entry (its data flushed to disk first) under
        ``key``, recording ``source`` and ``remote`` (identity, validation time). False when the
        tier could not keep it (then nothing of it is left); a full disk warns once."""
        try:
            for dirpath, _, names in os.walk(staged):
                for n in names:
                    fd = os.open(os.path.join(dirpath, n), os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
            meta = {
                "version": META_VERSION,
                "source": source,
                "created": time.time(),
                "aliases": [],
                "shape": sorted(
                    os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(staged) for n in ns
                ),
                "files": _copy_stamps(staged),
                "remote": {**remote, "validated": time.time()},
            }
            _write_json(os.path.join(staged, _META), meta)
            return self.put(key, staged, disk_usage(staged)) or self.holds(key)
        except OSError as exc:
            self._discard(staged)
            if exc.errno in _FULL:
                self._say_once("full", f"fastckpt: no space left for the SSD tier ({exc})")
                return False
            raise
        except BaseException:
            self._discard(staged)
            raise

    def discard(self, staged: str) -> None:
        """Remove a staged entry that will not be published."""
        self._discard(staged)

    def say_once(self, what: str, message: str) -> None:
        self._say_once(what, message)

    def flight_lock(self, key: str) -> FlightLock:
        """The lock that makes one process of those sharing the directory fill entry ``key``."""
        return FlightLock(os.path.join(self.directory, f".lock-{key}"))

    # ------------------------------------------------------------------ pieces
    def _flight(self, skey: str) -> threading.Lock:
        with self._alias_lock:
            lock = self._flights.get(skey)
            if lock is None:
                if len(self._flights) > 1024:
                    self._flights = {k: v for k, v in self._flights.items() if v.locked()}
                lock = self._flights[skey] = threading.Lock()
            return lock

    def _alias(self, skey: str) -> str | None:
        with self._alias_lock:
            key = self._aliases.get(skey)
        if key is None:
            # another process sharing the directory may have recorded it on a copy held here
            for k in self.keys():
                path = self.peek(k)
                if path is not None and skey in read_meta(path).get("aliases", ()):
                    self._learn(str(k), read_meta(path))
                    return str(k)
            # or published a copy of it since this tier scanned the directory
            for name in self._unheld():
                meta = read_meta(os.path.join(self.directory, name))
                known = skey in meta.get("aliases", ()) and meta.get("version") == META_VERSION
                if known and self.adopt(name):
                    self._learn(name, meta)
                    return name
        return key

    def _unheld(self) -> list[str]:
        """Names of published entries in the directory this tier does not hold."""
        try:
            names = os.listdir(self.directory)
        except OSError:
            return []
        return [n for n in names if not n.startswith(".") and not self.holds(n)]

    def _learn(self, key: str, meta: dict[str, Any]) -> None:
        if meta.get("version") != META_VERSION:
            return  # made by an older keying: never found again, it ages out
        with self._alias_lock:
            for a in meta.get("aliases", ()):
                self._aliases[str(a)] = key

    def _add_alias(self, key: str, skey: str) -> None:
        path = self.peek(key)
        with self._alias_lock:
            self._aliases[skey] = key
        if path is None:
            return
        meta = read_meta(path)
        aliases = [a for a in meta.get("aliases", []) if a != skey][-(MAX_ALIASES - 1) :]
        meta["aliases"] = [*aliases, skey]
        with contextlib.suppress(OSError):
            _write_json(os.path.join(path, _META), meta)

    def _open_checked(self, key: str) -> tuple[OpenCheckpoint, str] | None:
        path = self._get(key, pin=True)
        if path is None:
            return None
        try:
            problem = _check_copy(path)
            if problem is None:
                try:
                    return open_checkpoint(path), key
                except (FormatError, OSError) as exc:
                    problem = f"it does not open: {exc}"
        except BaseException:
            self.unpin(key)
            raise
        self.unpin(key)
        self.reject(key, problem)
        return None

    def _make(
        self,
        source: str,
        files: Sequence[str],
        skey: str,
        shape: list[int],
        key: str | None,
        convert: Callable[[str, str], Any] | None = None,
    ) -> str | None:
        """Convert ``source`` and publish it under its content key (``key``, or hashed on a
        thread while the conversion runs); returns the key, or None when it could not be kept."""
        staged = self.stage(skey)
        convert = convert or self._convert
        if convert is None:
            from fastckpt.format.convert import convert as _convert

            def convert(src: str, dst: str) -> Any:
                return _convert(src, dst, progress=False)

        with ThreadPoolExecutor(1, thread_name_prefix="fastckpt-hash") as pool:
            hashing = (
                None if key is not None else pool.submit(content_key, files, self._hash_threads)
            )
            try:
                try:
                    convert(source, staged)
                finally:
                    if hashing is not None:
                        key = hashing.result()  # waited for even when the conversion failed
                assert key is not None
                if stamp_key(files, source) != skey:
                    self._discard(staged)
                    return None  # the source changed while it was read
                meta = {
                    "version": META_VERSION,
                    "source": os.path.realpath(source),
                    "created": time.time(),
                    "aliases": [skey],
                    "shape": shape,
                    "files": _copy_stamps(staged),
                }
                _write_json(os.path.join(staged, _META), meta)
            except OSError as exc:
                self._discard(staged)
                if exc.errno in _FULL:
                    self._say_once(
                        "full",
                        f"fastckpt: no space left for the SSD tier in {self.directory} ({exc}); "
                        "loads read their sources instead (said once)",
                    )
                    return None
                raise
            except BaseException:
                self._discard(staged)
                raise
        try:
            kept = self.put(key, staged, disk_usage(staged)) or self.holds(key)
        except OSError as exc:
            if exc.errno in _FULL:
                self._say_once("full", f"fastckpt: no space left for the SSD tier ({exc})")
                return None
            raise
        return key if kept else None

    def _may_hold(self, shape: list[int]) -> bool:
        """Whether a held copy was made from files of these sizes (then hashing first may find
        it); one small read per copy held."""
        for k in self.keys():
            path = self.peek(k)
            if path is not None and read_meta(path).get("shape") == shape:
                return True
        return False

    def _discard(self, staged: str) -> None:
        """Remove a staged copy and anything the writer left beside it (nothing half-written
        is kept)."""
        prefix = "." + os.path.basename(staged) + "."
        with contextlib.suppress(OSError):
            for name in os.listdir(self.directory):
                if name.startswith(prefix):
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        shutil.rmtree(staged, ignore_errors=True)

    def _say_once(self, what: str, message: str) -> None:
        if what not in self._said:
            self._said.add(what)
            warnings.warn(message, CacheWarning, stacklevel=4)

    # ------------------------------------------------------------------ the LRU tier
    def stage(self, key: str) -> str:
        """A fresh temporary directory path (not created) on the tier's filesystem."""
        return os.path.join(self.directory, f".tmp-{key}-{os.getpid()}-{next(_counter)}")

    def put(self, key: Hashable, value: str, nbytes: int, *, pin: bool = False) -> bool:
        """Publish the staged directory ``value`` under ``key``; on a bypass (too large, or no
        room because everything is in use) the staged directory is deleted, as it is when the
        key is already held (that copy stays)."""
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

    def get(self, key: Hashable) -> str | None:
        return self._get(key, pin=False)

    def _get(self, key: Hashable, *, pin: bool) -> str | None:
        path = super()._get(key, pin=pin)
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


def _shape(files: Sequence[str]) -> list[int]:
    return sorted(os.stat(f).st_size for f in files)


def _copy_stamps(path: str) -> dict[str, list[int]]:
    """(inode, size, mtime, ctime) of every file of a copy but the tier's own bookkeeping."""
    out: dict[str, list[int]] = {}
    for dirpath, _, names in os.walk(path):
        for n in names:
            full = os.path.join(dirpath, n)
            rel = os.path.relpath(full, path)
            if rel in (_META, _STAMP):
                continue
            st = os.lstat(full)
            out[rel] = [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    return out


def _check_copy(path: str) -> str | None:
    """Why the copy at ``path`` cannot be used (its files differ from what was published), or
    None. One ``lstat`` per file."""
    meta = read_meta(path)
    want = meta.get("files")
    if meta.get("version") != META_VERSION or not isinstance(want, dict):
        return "it has no record of its files"
    try:
        have = _copy_stamps(path)
    except OSError as exc:
        return f"its files cannot be listed: {exc}"
    if have != want:
        changed = sorted(set(have) ^ set(want)) or sorted(k for k in have if have[k] != want.get(k))
        return f"its files were modified since it was made: {', '.join(changed[:3])}"
    return None


def _write_json(path: str, value: Any) -> None:
    tmp = f"{path}.{os.getpid()}.{next(_counter)}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(value, f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
