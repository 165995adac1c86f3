"""The model catalog: one file mapping checkpoint names to where their checkpoints are.

A deployment serves the models its catalog names; a request names a model by its catalog name
(Ray Serve's ``multiplexed_model_id``). TOML (Python >= 3.11) or JSON, chosen by the file's
extension::

    # models.toml
    [models.llama-1b]
    path = "/models/llama-1b"          # any path fastckpt's loader takes (a stock safetensors
                                       # model folder, a fastckpt checkpoint; remote URLs once
                                       # the loader takes them)
    nbytes = 2471000000                # optional: read from the checkpoint's index when omitted

    [models.qwen-0.5b]
    path = "/models/qwen-0.5b"

Every entry must have a ``path``; names are non-empty strings without ``/`` or whitespace.
Unknown keys are refused (a typo must not pass silently). Importing this module imports neither
torch nor Ray.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from fastckpt.errors import FastckptError

_NAME = re.compile(r"^[^\s/]+$")
_KEYS = {"path", "nbytes"}


class CatalogError(FastckptError, ValueError):
    """The catalog file or one of its entries is invalid; the message names the file and entry."""


@dataclass(frozen=True)
class ModelEntry:
    """One model of the catalog: its name, where its checkpoint is, and its size in bytes."""

    name: str
    path: str
    nbytes: int

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "nbytes": self.nbytes}


class Catalog(Mapping[str, ModelEntry]):
    """Model name -> ``ModelEntry``; read with ``Catalog.load(path)`` or ``Catalog.from_dict``."""

    def __init__(self, entries: Mapping[str, ModelEntry], source: str = "") -> None:
        self._entries = dict(sorted(entries.items()))
        self.source = source

    def __getitem__(self, name: str) -> ModelEntry:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(self._entries) or "none"
            raise KeyError(f"model {name!r} is not in the catalog (known: {known})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def by_path(self) -> dict[str, str]:
        """Resolved checkpoint path -> model name (local paths only)."""
        return {os.path.realpath(e.path): e.name for e in self._entries.values() if _local(e.path)}

    def as_dict(self) -> dict[str, Any]:
        """The catalog as data ``from_dict`` reads back (sizes filled in)."""
        return {"models": {n: e.as_dict() for n, e in self._entries.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<dict>") -> Catalog:
        """Read ``{"models": {name: {"path": ..., "nbytes": ...}}}``; a missing ``nbytes`` is
        read from the checkpoint's index (relative paths are taken from the current directory,
        or the catalog file's directory when read by ``load``)."""
        if not isinstance(data, Mapping):
            raise CatalogError(f"{source}: the catalog must be a table, got {type(data).__name__}")
        extra = sorted(set(data) - {"models"})
        if extra:
            raise CatalogError(f"{source}: unknown top-level keys {extra} (expected 'models')")
        models = data.get("models")
        if not isinstance(models, Mapping) or not models:
            raise CatalogError(f"{source}: no [models.NAME] entries")
        base = os.path.dirname(source) if os.path.isfile(source) else os.getcwd()
        entries = {}
        for name, spec in models.items():
            entries[name] = _entry(source, base, name, spec)
        return cls(entries, source)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Catalog:
        """Read a catalog file (``.toml`` or ``.json``)."""
        p = os.fspath(path)
        if not p.endswith((".toml", ".json")):
            raise CatalogError(f"{p}: a catalog is a .toml or .json file")
        try:
            with open(p, "rb") as fh:
                raw = fh.read()
        except OSError as exc:
            raise CatalogError(f"cannot read the catalog {p!r}: {exc.strerror}") from None
        if p.endswith(".toml"):
            try:
                import tomllib
            except ImportError:  # Python 3.10
                raise CatalogError(
                    f"{p}: TOML catalogs need Python >= 3.11 (tomllib); write it as JSON"
                ) from None
            try:
                data = tomllib.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
                raise CatalogError(f"{p}: not valid TOML: {exc}") from None
        else:
            try:
                data = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise CatalogError(f"{p}: not valid JSON: {exc}") from None
        return cls.from_dict(data, source=p)

    @classmethod
    def of(cls, value: Catalog | Mapping[str, Any] | str | os.PathLike[str]) -> Catalog:
        """A catalog from a ``Catalog``, its dict form or the path of its file."""
        if isinstance(value, Catalog):
            return value
        if isinstance(value, Mapping):
            return cls.from_dict(value)
        return cls.load(value)


def _local(path: str) -> bool:
    return "://" not in path


def _entry(source: str, base: str, name: object, spec: object) -> ModelEntry:
    where = f"{source}: model {name!r}"
    if not isinstance(name, str) or not _NAME.match(name):
        raise CatalogError(f"{where}: a model name is a non-empty string without '/' or spaces")
    if not isinstance(spec, Mapping):
        raise CatalogError(f"{where}: expected a table with a 'path'")
    extra = sorted(set(spec) - _KEYS)
    if extra:
        raise CatalogError(f"{where}: unknown keys {extra} (known: {sorted(_KEYS)})")
    path = spec.get("path")
    if not isinstance(path, str) or not path:
        raise CatalogError(f"{where}: 'path' must be a non-empty string")
    if _local(path) and not os.path.isabs(path):
        path = os.path.normpath(os.path.join(base, path))
    nbytes = spec.get("nbytes")
    if nbytes is None:
        nbytes = _checkpoint_bytes(where, path)
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes <= 0:
        raise CatalogError(f"{where}: 'nbytes' must be a positive integer, got {nbytes!r}")
    return ModelEntry(name, path, nbytes)


def _checkpoint_bytes(where: str, path: str) -> int:
    """Bytes of the checkpoint's data files, from its index."""
    from fastckpt.format.reader import read_index

    try:
        index = read_index(path)
    except (OSError, FastckptError) as exc:
        raise CatalogError(
            f"{where}: cannot read the checkpoint at {path!r} to size it ({exc}); give 'nbytes'"
        ) from None
    return sum(p.nbytes for p in index.partitions)
