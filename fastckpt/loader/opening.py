"""Opening a checkpoint for the core: ``Opened`` and ``open_source``.

A read of a checkpoint, whatever asked for it, opens it once here: its validated files
(beneath its directory, or the SSD tier's converted copy of a slow source, made by reading the
source through the very same core), and the cache daemon's sealed copies when a server is set.
Every entry point does this, a load by ``Index`` included, so the daemon and the SSD tier serve
them all. ``Loader.open_source`` calls this.

Which files of a slow source a load reads, when the SSD tier is on:

1. its bytes in a memory tier (the DRAM tier's item, idle GPU-tier buffers) under the source's
   own identity: the source (the policy then serves them from memory; the copy would be a miss
   of those tiers);
2. a complete, checked copy in the SSD tier: the copy;
3. otherwise, with ``ssd_convert="background"``: the source, and the conversion is scheduled
   when the read ends without an error (``ssdconvert.Conversions``; the load's notes say so);
   with ``inline``, and for a ``verify=True`` read of a source without checksums (only the
   copy has them): the conversion first, then the copy.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastckpt.config import Config
from fastckpt.format.fsdir import OpenFile
from fastckpt.format.index import Index
from fastckpt.format.reader import OpenCheckpoint, open_checkpoint, open_partitions
from fastckpt.loader.daemonsource import fetch
from fastckpt.loader.remotesource import open_remote
from fastckpt.loader.ssdconvert import ConversionCancelled, slow_source, source_stamp
from fastckpt.loader.tiering import checkpoint_identity
from fastckpt.rules.urls import is_url
from fastckpt.tiers.ssdfiles import source_files

if TYPE_CHECKING:  # pragma: no cover
    from fastckpt.loader.session import Loader


@dataclass
class Opened:
    """A checkpoint opened for reading through the core: the validated ``index`` and the open
    ``files`` it was validated against, its tier identity, the cache daemon's sealed copies
    (``daemon``, one per partition, when it serves it), the carried files it opened
    (``carried``), and what else must be released."""

    index: Index
    files: Sequence[OpenFile]
    ident: tuple[str, str]
    daemon: tuple[OpenFile, ...] = ()
    carried: Mapping[str, OpenFile] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    ssd_key: str | None = None  # the SSD tier's copy these files are, if they are one
    # the files' bytes are still arriving from an object store (``remoteflight.StreamView``)
    stream: Any = None
    _close: list[Callable[[], None]] = field(default_factory=list)
    # run once after a read through these files ended without an error (``__exit__``)
    _after: list[Callable[[], Any]] = field(default_factory=list)

    def close(self) -> None:
        for fn in reversed(self._close):
            with contextlib.suppress(Exception):
                fn()
        self._close.clear()
        self._after.clear()

    def _succeeded(self) -> None:
        after, self._after = self._after, []
        self.close()
        for fn in after:
            with contextlib.suppress(Exception):
                fn()

    def interrupt(self) -> None:
        """Close after Ctrl-C: a download nobody else reads is stopped, not left to finish."""
        if self.stream is not None:
            self.stream.interrupt()
            self._close = self._close[1:]  # the stream's own close (its first) is done
        self.close()

    def __enter__(self) -> Opened:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None and issubclass(exc_type, (KeyboardInterrupt, SystemExit)):
            self.interrupt()
        elif exc_type is None:
            self._succeeded()
        else:
            self.close()


def open_source(
    loader: Loader,
    path: str | os.PathLike[str] | Index,
    cfg: Config,
    *,
    convert: bool = True,
    daemon: bool = True,
    verify: bool = False,
) -> Opened:
    """Open ``path`` for reading through ``loader``'s core (see ``Opened``): its validated files
    (the SSD tier's converted copy of a slow source when ``convert`` and the tier is on), and
    the cache daemon's copies when a server is configured and ``daemon``. An ``s3://`` or
    ``https://`` URL is opened by ``remotesource.open_remote`` (an SSD-tier entry, or a download
    streaming in)."""
    if not isinstance(path, Index) and is_url(path):
        got = open_remote(os.fspath(path), cfg, loader.ssd_tier)
        opened = Opened(got.index, got.files, got.ident, notes=got.notes, stream=got.stream)
        opened.ssd_key = got.ssd_key
        opened._close = got.closers
        return opened
    ck = (
        OpenCheckpoint(path, open_partitions(path), {})
        if isinstance(path, Index)
        else open_checkpoint(path)
    )
    closers: list[Callable[[], None]] = [ck.close]
    try:
        use = ck
        ssd_key: str | None = None
        notes: list[str] = []
        after: list[Callable[[], Any]] = []
        ident = checkpoint_identity(ck.index, ck.partitions)
        if convert and loader.ssd_tier is not None and not _in_memory(loader, ident):
            # an Index read by the caller (load_model reads it once) names its checkpoint by
            # its root
            source = path.root if isinstance(path, Index) else os.fspath(path)
            # a verified read of a source without checksums needs the copy now
            when = "inline" if verify and ck.index.checksum_algorithm is None else cfg.ssd_convert
            converted, ssd_key = _ssd_copy(loader, ck, source, when, notes, after, path)
            if converted is not None and ssd_key is not None:
                tier, key = loader.ssd_tier, ssd_key
                closers.append(lambda: tier.unpin(key))
                closers.append(converted.close)
                use = converted
                ident = checkpoint_identity(use.index, use.partitions)
        opened = Opened(use.index, use.partitions, ident, carried=use.carried, notes=notes)
        opened.ssd_key = ssd_key
        opened._close = closers
        opened._after = after
        if daemon and cfg.server:
            fds = fetch(opened.index, opened.files, cfg, verify=verify, notes=opened.notes)
            if fds:
                opened.daemon = fds
                closers.extend(f.close for f in fds)
        return opened
    except BaseException:
        for fn in reversed(closers):
            with contextlib.suppress(Exception):
                fn()
        raise


def _in_memory(loader: Loader, ident: tuple[str, str]) -> bool:
    """Whether the DRAM tier, or the GPU tier's idle buffers, hold this very checkpoint."""
    if loader.dram_tier.holds(ident):
        return True
    return any(
        isinstance(k, tuple) and k[:2] == ident
        for k in loader.gpu_tier.keys()  # noqa: SIM118 - a tier, not a dict
    )


def _ssd_copy(
    loader: Loader,
    ck: OpenCheckpoint,
    source: str,
    when: str,
    notes: list[str],
    after: list[Callable[[], Any]],
    path: str | os.PathLike[str] | Index,
) -> tuple[OpenCheckpoint | None, str | None]:
    """The SSD tier's copy of a slow source for this read, opened and pinned (its key), made
    first (``when`` is ``inline``) or, when there is none yet, scheduled for after the read
    (``background``: ``after`` gets the scheduling, ``notes`` what the load did); (None, None)
    when the source is not slow or the read uses the source."""
    tier = loader.ssd_tier
    assert tier is not None
    if not slow_source(ck.index):
        return None, None
    files = source_files(ck.index)
    if when == "inline":
        # the copy is made by reading the source through this very core
        src = Opened(
            ck.index,
            ck.partitions,
            checkpoint_identity(ck.index, ck.partitions),
            carried=ck.carried,
        )
        converter = loader.ssd_converter
        got = tier.open_copy(files, source, convert=lambda _src, dst: converter(loader, src, dst))
        return (None, None) if got is None else got
    got = tier.open_copy(files, source, make=False)
    if got is not None:
        return got
    skey = source_stamp(ck.index, source)
    if skey is None:
        return None, None  # a file vanished: the read itself says so
    state = loader.conversions.state(skey)
    if state == "running":
        notes.append("ssd-tier: its copy of this source is being made; read the source")
    elif state:
        notes.append(f"ssd-tier: no copy of this source ({state}); read the source")
    else:
        notes.append(
            "ssd-tier: no copy of this source yet; read the source, the conversion "
            "runs in the background after this read"
        )
        conversions = loader.conversions
        # opened again by the conversion: an Index as it is, a path as it is named now
        again = path if isinstance(path, Index) else os.path.abspath(os.fspath(path))
        after.append(
            lambda: conversions.schedule(
                skey, source, lambda: _convert_later(loader, again, source, skey)
            )
        )
    return None, None


def _convert_later(
    loader: Loader, path: str | os.PathLike[str] | Index, source: str, skey: str
) -> str:
    """A background conversion's work (``ssdconvert.Conversions``): open the source again and
    make the tier's copy of it through the core (``SsdTier.open_copy``: a copy found by hashing
    is reused), unless another process sharing the directory is making it (``elsewhere``)."""
    tier = loader.ssd_tier
    if tier is None:
        return "not_kept"
    lock = tier.flight_lock(f"convert-{skey}")
    if not lock.acquire(timeout_s=0):
        return "elsewhere"
    try:
        ck = (
            OpenCheckpoint(path, open_partitions(path), {})
            if isinstance(path, Index)
            else open_checkpoint(path)
        )
        with ck:
            opened = Opened(
                ck.index,
                ck.partitions,
                checkpoint_identity(ck.index, ck.partitions),
                carried=ck.carried,
            )

            def convert(_src: str, dst: str) -> Any:
                if loader.conversions.cancelled:
                    raise ConversionCancelled
                made = loader.ssd_converter(loader, opened, dst)
                if loader.conversions.cancelled:
                    raise ConversionCancelled  # made, but the Loader closed: not published
                return made

            got = tier.open_copy(source_files(ck.index), source, convert=convert)
    finally:
        lock.release()
    if got is None:
        return "not_kept"
    copy, key = got
    copy.close()
    tier.unpin(key)
    return "done"


__all__ = ["Opened", "open_source"]
