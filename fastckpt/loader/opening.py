"""Opening a checkpoint for the core: ``Opened`` and ``open_source``.

A read of a checkpoint, whatever asked for it, opens it once here: its validated files
(beneath its directory, or the SSD tier's converted copy of a slow source, made by reading the
source through the very same core), and the cache daemon's sealed copies when a server is set.
Every entry point does this, a load by ``Index`` included, so the daemon and the SSD tier serve
them all. ``Loader.open_source`` calls this.
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
from fastckpt.loader.ssdconvert import convert_opened, through_ssd
from fastckpt.loader.tiering import checkpoint_identity
from fastckpt.rules.urls import is_url

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

    def close(self) -> None:
        for fn in reversed(self._close):
            with contextlib.suppress(Exception):
                fn()
        self._close.clear()

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
        if convert and loader.ssd_tier is not None:
            # the copy is made by reading the source through this very core; an Index read by
            # the caller (load_model reads it once) names its checkpoint by its root
            src = Opened(
                ck.index,
                ck.partitions,
                checkpoint_identity(ck.index, ck.partitions),
                carried=ck.carried,
            )
            converted, ssd_key = through_ssd(
                loader.ssd_tier,
                ck.index,
                path.root if isinstance(path, Index) else os.fspath(path),
                convert=lambda _src, dst: convert_opened(loader, src, dst),
            )
            if converted is not None and ssd_key is not None:
                tier, key = loader.ssd_tier, ssd_key
                closers.append(lambda: tier.unpin(key))
                closers.append(converted.close)
                use = converted
        opened = Opened(
            use.index,
            use.partitions,
            checkpoint_identity(use.index, use.partitions),
            carried=use.carried,
        )
        opened.ssd_key = ssd_key
        opened._close = closers
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


__all__ = ["Opened", "open_source"]
