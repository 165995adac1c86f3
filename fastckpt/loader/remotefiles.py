"""Remote checkpoints where an entry point needs files, not tensors: a complete local copy for
``fastckpt.convert`` and the carried files (``config.json``...) for ``load_model``. Everything
goes through
``Loader.open_source`` (``remotesource``): the same download, checks and SSD tier as a load.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fastckpt.format.index import Index
from fastckpt.loader.remotesource import wait_kept
from fastckpt.rules.urls import is_url

if TYPE_CHECKING:  # pragma: no cover
    from fastckpt.loader.session import Loader


@contextlib.contextmanager
def local_copy(url: str, loader: Loader | None = None, *, near: str = "") -> Iterator[str]:
    """A complete local copy of the remote checkpoint at ``url``, as a directory (or the one
    file the URL names in it): the SSD tier's entry when the Loader has the tier (downloaded
    into it first when needed), else a temporary download beside ``near`` (a path on the
    filesystem it should use), removed on exit."""
    from fastckpt.loader.api import default_loader
    from fastckpt.loader.session import Loader as _Loader

    session = loader if loader is not None else default_loader()
    scratch = ""
    if session.ssd_tier is None:
        parent = os.path.dirname(os.path.abspath(near)) if near else None
        scratch = tempfile.mkdtemp(prefix=".fastckpt-remote-", dir=parent)
        # a throwaway SSD tier: the download lands in files and is published there
        session = _Loader(ssd_tier_bytes=1 << 62, ssd_tier_dir=scratch)
    try:
        with session.open_source(url, daemon=False) as opened:
            if opened.ssd_key is None and not wait_kept(session.ssd_tier, opened):
                raise OSError(
                    f"no local copy of {url} could be made (see the warnings): the SSD tier "
                    "could not keep it"
                )
        tier = session.ssd_tier
        assert tier is not None
        key = opened.ssd_key or opened.stream.key
        got = tier.open_entry(key)
        if got is None:
            raise OSError(f"the local copy of {url} vanished before it could be used")
        ck, key = got
        try:
            root = ck.index.root
            single = ck.index.source.get("path")
            yield single if isinstance(single, str) and os.path.isfile(single) else root
        finally:
            ck.close()
            tier.unpin(key)
    finally:
        if scratch:
            session.close()
            shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def model_folder(url: str, loader: Loader | None = None) -> Iterator[tuple[str, Index]]:
    """(a local folder holding the checkpoint's carried files, its validated index) for a remote
    model checkpoint: the SSD tier's entry itself, or a temporary folder of the carried files
    (``config.json``, ``generation_config.json``, tokenizer files...) as they arrive, while the
    download goes on. ``load_model`` reads its configuration there and the weights from
    ``url``."""
    from fastckpt.loader.api import default_loader

    session = loader if loader is not None else default_loader()
    with session.open_source(url, daemon=False) as opened:
        if opened.stream is None:  # an SSD-tier entry: a local checkpoint folder
            yield opened.index.root, opened.index
            return
        folder = tempfile.mkdtemp(prefix=".fastckpt-config-")
        try:
            parts = {p.file for p in opened.index.partitions}
            for name in opened.stream.names():
                if name in parts or name.endswith(".index.json") or name == "fastckpt.index":
                    continue
                full = os.path.join(folder, name)
                os.makedirs(os.path.dirname(full), exist_ok=True)
                with open(full, "wb") as f:
                    f.write(opened.stream.read_file(name))
            yield folder, opened.index
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def convert(src: Any, dst: Any, **options: Any) -> Index:
    """``fastckpt.convert`` for every source, local or remote: a remote ``src`` is downloaded
    first (into the SSD tier when the default Loader has one, else beside ``dst``, removed
    after). See ``fastckpt.format.convert.convert`` for the options."""
    from fastckpt.format.convert import convert as _convert

    if not is_url(src):
        return _convert(src, dst, **options)
    with local_copy(os.fspath(src), near=os.fspath(dst)) as local:
        return _convert(local, dst, **options)


__all__ = ["convert", "local_copy", "model_folder"]
