"""The model repository tier: checkpoints in S3-compatible object stores and on HTTP servers, as
one more byte source of the load core.

``open_remote`` is what ``Loader.open_source`` does with an ``s3://``, ``https://`` or
``http://`` URL (a fastckpt checkpoint, a stock safetensors file, or a folder of shards):

1. **An SSD-tier copy first.** With the SSD tier on, an entry recorded for this URL is used when
   its objects are still what the store holds (one LIST, or a ranged probe per object over
   HTTP; within ``remote_fresh_s`` of the last check not even that; a store that cannot be
   reached serves the entry with a warning). The entry is then a local checkpoint like any other.
2. **Identify and validate.** Otherwise the index (``fastckpt.index``, a shard index json) and
   each safetensors header are fetched into anonymous memory and validated by
   ``fastckpt.format`` as a local checkpoint is (``FileSet`` answers for the directory); the
   objects the checkpoint consists of, with their sizes, ETags and version ids, are its
   identity.
3. **Land and stream.** Every object is given a local file at its full size: a staging file of
   the SSD tier (space reserved up front; a full disk means no copy this time, never a failed
   load) or a memfd. A ``Download`` fills them with parallel ranged GETs, marking each file's
   ``RangeGate`` as ranges land (fastckpt chunks only after their CRC32C matched). The load
   reads those files through the executor as any other files, each read waiting on its gate:
   download, write-through and the copy to the device overlap, and ``iter_tensors`` yields its
   first tensors before the last byte arrives.
4. **Publish.** A complete, verified staging copy is flushed and renamed into the SSD tier under
   a key made of the objects' identity, recording the URL (``fastckpt cache ls``); a failed or
   cancelled one is removed. Nothing half-written is ever under a key.

Single flight: loads of one URL in this process share one download (while its objects are
unchanged); processes sharing the SSD tier directory take a lock file per URL, so the others wait
for the one downloading and then read its published copy. An object replaced while it is
downloaded fails the download (``ObjectChangedError``, never a mix of generations);
``Loader.load`` then starts once more from the new generation.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from fastckpt import io_engine
from fastckpt.config import Config
from fastckpt.errors import CacheWarning, LimitError, RemoteError
from fastckpt.format import safetensors, spec
from fastckpt.format.fsdir import FileSet, OpenFile
from fastckpt.format.reader import OpenCheckpoint, open_file_set
from fastckpt.loader.remoteflight import (
    Flight,
    RemoteOpened,
    StreamView,
    active_flights,
    find,
    open_file,
    register,
)
from fastckpt.loader.tiering import checkpoint_identity
from fastckpt.remote.download import Download, RetryingStore, Target, fetch_whole
from fastckpt.remote.store import ObjectInfo, Store, Transient, store_for
from fastckpt.rules.urls import Url, parse_url
from fastckpt.tiers.ssd import SsdTier
from fastckpt.tiers.ssdfiles import FlightLock

# Files probed by name in an HTTP folder (no listing there): what load_model needs beside weights
HTTP_CARRIED_PROBES = ("config.json", "generation_config.json")
INDEX_MAX_NBYTES = spec.MAX_BODY_NBYTES + spec.HEADER_NBYTES


# ------------------------------------------------------------------------------------ locating


@dataclass
class Located:
    """Where a URL's checkpoint lies: ``base`` (the folder URL), ``entry`` (the file the user
    named in it, or "" for the folder), and the store's ``listing`` of the folder (None over
    HTTP: files are probed by name)."""

    url: Url
    base: Url
    entry: str
    store: Store
    listing: dict[str, ObjectInfo] | None


def locate(url: Url, store: Store) -> Located:
    """Find what ``url`` names: an object (a checkpoint file) or a folder of objects. Raises
    FileNotFoundError when neither exists."""
    key = url.key.split("?", 1)[0]
    parent_key, _, name = key.rpartition("/")
    parent = Url(url.scheme, url.bucket, url.host, parent_key)
    if not store.listable:
        if (
            name.endswith((".safetensors", spec.SAFETENSORS_INDEX_SUFFIX))
            or name == spec.INDEX_FILE
        ):
            if "?" in url.key:  # a presigned URL names exactly one object
                return Located(url, parent, name, store, {name: store.head(url.key, name)})
            return Located(url, parent, name, store, None)
        return Located(url, url, "", store, None)
    if key:
        try:
            info = store.head(key, name, url.version)
        except FileNotFoundError:
            info = None
        if info is not None:
            if _is_index(name):
                return Located(url, parent, name, store, _listing(store, parent_key))
            return Located(url, parent, name, store, {name: info})
    listing = _listing(store, key)
    if not listing:
        raise FileNotFoundError(errno.ENOENT, "no such checkpoint (no object, no prefix)", str(url))
    return Located(url, url, "", store, listing)


def _is_index(name: str) -> bool:
    return name == spec.INDEX_FILE or name.endswith(spec.SAFETENSORS_INDEX_SUFFIX)


def _listing(store: Store, prefix: str) -> dict[str, ObjectInfo]:
    return {o.name: o for o in store.list(prefix)}


# ------------------------------------------------------------------------------------ objects


def _memfd(name: str, size: int) -> int:
    fd = os.memfd_create("fastckpt-remote:" + name[-200:], os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


class Objects:
    """The objects of one remote checkpoint that the format asked for, each in a memfd with what
    must be known before the index is validated already fetched: index files whole, the header
    of each safetensors file."""

    def __init__(self, loc: Located, retries: int) -> None:
        self.loc = loc
        self.retries = retries
        self.infos: dict[str, ObjectInfo] = {}
        self.fds: dict[str, int] = {}
        self.landed: dict[str, list[tuple[int, int]]] = {}

    def close(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()

    def info(self, name: str) -> ObjectInfo | None:
        if self.loc.listing is not None:
            return self.loc.listing.get(name)
        key = f"{self.loc.base.key}/{name}" if self.loc.base.key else name
        try:
            return self.loc.store.head(key, name)
        except FileNotFoundError:
            return None

    def resolve(self, name: str) -> OpenFile | None:
        info = self.info(name)
        if info is None:
            return None
        fd = _memfd(name, info.size)
        self.fds[name] = fd
        self.infos[name] = info
        store = self.loc.store
        if name == spec.INDEX_FILE or name.endswith(".index.json"):
            if info.size > INDEX_MAX_NBYTES:
                raise LimitError(
                    f"index is {info.size} bytes; the limit is {INDEX_MAX_NBYTES}", path=info.url
                )
            fetch_whole(store, info, fd, retries=self.retries)
            self.landed[name] = [(0, info.size)]
        elif name.endswith(".safetensors"):
            probe = min(info.size, safetensors.HEADER_PROBE_NBYTES)
            fetch_whole(store, info, fd, retries=self.retries, hi=probe)
            span = safetensors.header_span(os.pread(fd, 8, 0), info.size, path=info.url)
            if span > probe:
                fetch_whole(store, info, fd, retries=self.retries, lo=probe, hi=span)
            self.landed[name] = [(0, max(span, probe))]
        else:
            self.landed[name] = []
        return open_file(fd, info.url)

    def checkpoint(self) -> OpenCheckpoint:
        """Validate what the URL names with ``fastckpt.format`` (over these memfds)."""
        loc = self.loc
        files = FileSet(
            str(loc.base),
            listing=None if loc.listing is None else list(loc.listing),
            resolve=self.resolve,
        )
        if loc.listing is None and not loc.entry:
            # an HTTP folder: what a listing would have shown is probed by name
            for name in (spec.INDEX_FILE, "model" + spec.SAFETENSORS_INDEX_SUFFIX):
                if files.has(name):
                    break
            else:
                files.has("model.safetensors")
            for name in HTTP_CARRIED_PROBES:
                files.has(name)
        return open_file_set(files, loc.entry)

    def identity(self, names: Iterable[str]) -> list[Any]:
        return [self.loc.store.name, *[self.infos[n].identity() for n in sorted(names)]]


def identity_key(identity: list[Any]) -> str:
    return "r" + hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:31]


def still_current(loc: Located, recorded: dict[str, list[Any]]) -> bool:
    """Whether every recorded object (name -> identity) is still what the store holds."""
    if not recorded:
        return False
    for name, ident in recorded.items():
        if loc.listing is not None and loc.listing.get(name) is not None:
            now: ObjectInfo | None = loc.listing[name]
        else:
            key = f"{loc.base.key}/{name}" if loc.base.key else name
            try:
                now = loc.store.head(key, name)
            except FileNotFoundError:
                return False
        assert now is not None
        mine = list(ident)
        theirs = now.identity()
        # a listing has no version ids: compare what both sides know
        if loc.listing is not None and not theirs[4]:
            mine[4] = ""
        if mine != theirs:
            return False
    return True


# ------------------------------------------------------------------------------------ opening


def open_remote(url_str: str, cfg: Config, tier: SsdTier | None) -> RemoteOpened:
    """Open the checkpoint at ``url_str`` (see the module docstring)."""
    url = parse_url(url_str)
    source = str(url)
    notes: list[str] = []
    if tier is not None:
        got = _fresh_entry(tier, source, cfg)
        if got is not None:
            return got
    store = RetryingStore(store_for(url, cfg), cfg.remote_retries)
    try:
        loc = locate(url, store)
    except (Transient, RemoteError) as exc:
        if tier is not None and not isinstance(exc, PermissionError):
            got = _any_entry(tier, source, f"the store could not be reached ({exc})")
            if got is not None:
                return got
        if isinstance(exc, Transient):
            raise RemoteError(
                errno.EHOSTUNREACH, f"the store could not be reached: {exc}", source
            ) from None
        raise
    if tier is not None:
        got = _current_entry(tier, source, loc)
        if got is not None:
            return got
    slot = (tier.directory if tier is not None else "", source)
    flight = find(slot)
    if flight is not None and not flight.failed and still_current(loc, flight.objects):
        opened = flight.join()
        opened.notes.append("joined a download of this checkpoint in progress")
        return opened
    lock: FlightLock | None = None
    if tier is not None:
        lock = tier.flight_lock(hashlib.sha256(source.encode()).hexdigest()[:32])
        held = lock.acquire(0)
        if not held:
            notes.append("waited for another process downloading this checkpoint")
            held = lock.acquire(cfg.remote_flight_wait_s)
        # (again: a copy may have been published since the first look)
        got = _current_entry(tier, source, loc)
        if got is not None:
            if held:
                lock.release()
            got.notes.extend(notes)
            return got
        if not held:
            lock = None  # the other process is still at it: download beside it, no copy
    try:
        opened = _start(loc, source, cfg, tier, lock, notes, slot)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return opened


def _start(
    loc: Located,
    source: str,
    cfg: Config,
    tier: SsdTier | None,
    lock: FlightLock | None,
    notes: list[str],
    slot: tuple[str, str],
) -> RemoteOpened:
    objects = Objects(loc, cfg.remote_retries)
    staged: str | None = None
    try:
        ck = objects.checkpoint()
        index = ck.index
        used = sorted(objects.fds)
        identity = objects.identity(used)
        key = identity_key(identity)
        recorded = {n: objects.infos[n].identity() for n in used}
        fds = objects.fds
        sizes = {n: objects.infos[n].size for n in used}
        if tier is not None and lock is not None:
            total = sum(sizes.values())
            if total > tier.capacity_bytes:
                notes.append(
                    f"not kept in the SSD tier: {total} bytes exceed its budget "
                    f"({tier.capacity_bytes})"
                )
            else:
                staged = tier.stage(key)
                try:
                    tier.reserve(staged, sizes)
                except OSError as exc:
                    staged = None
                    tier.say_once(
                        "full",
                        f"fastckpt: no space left for the SSD tier in {tier.directory} ({exc}); "
                        "remote checkpoints are streamed into memory instead (said once)",
                    )
                    notes.append(f"not kept in the SSD tier: {exc}")
        if staged is not None:
            # land in the staging copy: what is fetched already moves over, then validate again
            landing: dict[str, int] = {}
            try:
                for n in used:
                    fd = os.open(os.path.join(staged, n), os.O_RDWR | os.O_CLOEXEC)
                    landing[n] = fd
                    for lo, hi in objects.landed[n]:
                        _copy_range(fds[n], fd, lo, hi)
                ck.close()
                objects.close()
                fds = landing
                ck = open_file_set(
                    FileSet(
                        str(loc.base),
                        {n: open_file(fd, objects.infos[n].url) for n, fd in landing.items()},
                    ),
                    loc.entry,
                )
            except BaseException:
                for fd in landing.values():
                    os.close(fd)
                raise
        else:
            objects.fds = {}  # the flight owns them now
        flight = Flight(source, ck, fds, recorded, key, slot)
        targets: list[Target] = []
        by_file = {p.file: i for i, p in enumerate(index.partitions)}
        # carried files first (small; load_model wants them), then partitions in order
        order = sorted(used, key=lambda n: (n in by_file, by_file.get(n, -1), n))
        for n in order:
            info = objects.infos[n]
            gate = io_engine.RangeGate(info.url)
            part = by_file.get(n)
            checks = index.partitions[part].checksums if part is not None else None
            target = Target(
                info,
                fds[n],
                gate,
                ready=objects.landed[n],
                chunk_bytes=index.checksum_chunk_bytes or 0,
                checksums=checks,
            )
            if part is not None:
                flight.gates[part] = gate
                flight.target_of[part] = len(targets)
            flight.file_gates[n] = gate
            targets.append(target)
        if staged is not None and tier is not None and lock is not None:
            flight.write_through = True
            flight.after.append(_publisher(tier, lock, key, staged, source, identity, recorded))
        elif lock is not None:
            held = lock
            flight.after.append(lambda _err: held.release())
        flight.download = Download(
            loc.store,
            targets,
            concurrency=cfg.remote_concurrency,
            range_bytes=cfg.remote_range_bytes,
            retries=cfg.remote_retries,
            on_finish=flight.finished,
        )
        register(flight)
        opened = flight.join()
        flight.download.start()
        opened.notes.extend(notes)
        return opened
    except BaseException:
        objects.close()
        if staged is not None and tier is not None:
            tier.discard(staged)
        raise


def _copy_range(src: int, dst: int, lo: int, hi: int) -> None:
    while lo < hi:
        data = os.pread(src, min(hi - lo, 8 << 20), lo)
        if not data:
            raise OSError(errno.EIO, "a downloaded file ended early")
        os.pwrite(dst, data, lo)
        lo += len(data)


def _publisher(
    tier: SsdTier,
    lock: FlightLock,
    key: str,
    staged: str,
    source: str,
    identity: list[Any],
    recorded: dict[str, list[Any]],
) -> Callable[[BaseException | None], None]:
    def publish(error: BaseException | None) -> None:
        try:
            if error is None:
                tier.publish(key, staged, source, {"identity": identity, "objects": recorded})
            else:
                tier.discard(staged)
        except Exception as exc:  # a background thread: say it, never raise into nowhere
            tier.discard(staged)
            warnings.warn(
                f"fastckpt: the SSD-tier copy of {source} could not be kept ({exc})",
                CacheWarning,
                stacklevel=2,
            )
        finally:
            lock.release()

    return publish


# ------------------------------------------------------------------------------------ the SSD tier


def wait_kept(tier: SsdTier | None, opened: Any) -> bool:
    """Wait until a remote checkpoint opened (an ``Opened``) with the SSD tier on is kept there;
    True when the tier holds it (an entry already, or a download now written through)."""
    if tier is None:
        return False
    if opened.ssd_key is not None:
        return tier.holds(opened.ssd_key)
    stream = opened.stream
    if stream is None or stream.download is None:
        return False
    stream.download.wait()
    return bool(stream.writes_through and tier.holds(stream.key))


def _entry(tier: SsdTier, key: str, notes: list[str]) -> RemoteOpened | None:
    got = tier.open_entry(key)
    if got is None:
        return None
    ck, key = got
    closers: list[Callable[[], None]] = [lambda: tier.unpin(key), ck.close]
    source = str(tier.record(key).get("source", ""))
    return RemoteOpened(
        ck.index,
        ck.partitions,
        (source, key[:24]) if source else checkpoint_identity(ck.index, ck.partitions),
        closers,
        ssd_key=key,
        notes=notes,
    )


def _fresh_entry(tier: SsdTier, source: str, cfg: Config) -> RemoteOpened | None:
    if cfg.remote_fresh_s <= 0:
        return None
    for key, meta in tier.entries_from(source):
        age = time.time() - float(meta["remote"].get("validated", 0.0))
        if age < cfg.remote_fresh_s:
            got = _entry(tier, key, [f"SSD tier: checked with the store {age:.0f} s ago"])
            if got is not None:
                return got
    return None


def _current_entry(tier: SsdTier, source: str, loc: Located) -> RemoteOpened | None:
    for key, meta in tier.entries_from(source):
        if still_current(loc, meta["remote"].get("objects", {})):
            got = _entry(tier, key, ["SSD tier: the store still holds these objects"])
            if got is not None:
                tier.validated(key)
                return got
    return None


def _any_entry(tier: SsdTier, source: str, why: str) -> RemoteOpened | None:
    for key, _ in tier.entries_from(source):
        got = _entry(tier, key, [f"SSD tier copy used unchecked: {why}"])
        if got is not None:
            warnings.warn(
                f"fastckpt: {why}; loading the SSD tier's copy of {source} without checking it "
                "is current",
                CacheWarning,
                stacklevel=4,
            )
            return got
    return None


__all__ = [
    "Flight",
    "Located",
    "RemoteOpened",
    "StreamView",
    "active_flights",
    "identity_key",
    "locate",
    "open_remote",
    "still_current",
    "wait_kept",
]
