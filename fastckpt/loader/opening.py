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
from typing import TYPE_CHECKING

from fastckpt.config import Config
from fastckpt.format.fsdir import OpenFile
from fastckpt.format.index import Index
from fastckpt.format.reader import OpenCheckpoint, open_checkpoint, open_partitions
from fastckpt.loader.daemonsource import fetch
from fastckpt.loader.ssdconvert import convert_opened, through_ssd
from fastckpt.loader.tiering import checkpoint_identity

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
    _close: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        for fn in reversed(self._close):
            with contextlib.suppress(Exception):
                fn()
        self._close.clear()

    def __enter__(self) -> Opened:
        return self

    def __exit__(self, *exc: object) -> None:
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
    the cache daemon's copies when a server is configured and ``daemon``."""
    ck = (
        OpenCheckpoint(path, open_partitions(path), {})
        if isinstance(path, Index)
        else open_checkpoint(path)
    )
    closers: list[Callable[[], None]] = [ck.close]
    try:
        use = ck
        ssd_key: str | None = None
        if convert and loader.ssd_tier is not None and not isinstance(path, Index):
            # the copy is made by reading the source through this very core
            src = Opened(
                ck.index,
                ck.partitions,
                checkpoint_identity(ck.index, ck.partitions),
                carried=ck.carried,
            )
            converted, ssd_key = through_ssd(
                loader.ssd_tier,
                ck.index,
                os.fspath(path),
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
