"""A stored read-mode profile that cannot be used (absurd numbers, deep nesting, not JSON, not a
file) is ignored with a warning and measured again; it never makes a load fail."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch

import fastckpt
from fastckpt import io_engine
from fastckpt.config import get_config
from fastckpt.errors import CacheWarning
from fastckpt.loader import profile

GOOD = {
    "key": "",
    "fs_type": "ext4",
    "direct_gbps": 1.0,
    "buffered_gbps": 2.0,
    "mixed_gbps": 1.5,
    "probe_bytes": 8 << 20,
    "measured_at": 1.0,
    "source": "probe",
}


def _absurd(key: str) -> str:
    return json.dumps({**GOOD, "key": key}).replace(
        '"probe_bytes": 8388608', '"probe_bytes": 1e400'
    )


def _deep(key: str) -> str:
    return json.dumps({**GOOD, "key": key})[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"


def _negative(key: str) -> str:
    return json.dumps({**GOOD, "key": key, "buffered_gbps": -3.0})


def _not_json(key: str) -> str:
    return "\xff\xfe{"


@pytest.mark.parametrize("bad", [_absurd, _deep, _negative, _not_json])
def test_an_unusable_profile_is_ignored_with_a_warning_and_probed_again(
    tmp_path: Path, bad: object
) -> None:
    profile.forget()
    sd = {"w": torch.randn(3 << 20)}  # 12 MiB: large enough to probe
    path = tmp_path / "ck"
    fastckpt.save(sd, path, metadata=None)
    part = fastckpt.read_index(path).partitions[0].path
    key, _ = profile.fs_key(part)
    pdir = tmp_path / "profile"
    pdir.mkdir()
    stored = pdir / f"read-{key}.json"
    stored.write_text(bad(key))  # type: ignore[operator]
    io_engine.drop_page_cache(part)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with fastckpt.Loader(profile_dir=str(pdir)) as loader:
            loaded = loader.load(path)
    assert torch.equal(loaded["w"], sd["w"])
    said = [w for w in caught if issubclass(w.category, CacheWarning)]
    assert len(said) == 1 and str(stored) in str(said[0].message)
    again = profile.load_profile(get_config(profile_dir=str(pdir)), key)
    assert again is not None and again.source == "probe"
    assert all(math.isfinite(v) and v >= 0 for v in (again.direct_gbps, again.buffered_gbps))
    profile.forget()


def test_a_profile_that_is_a_directory_is_ignored(tmp_path: Path) -> None:
    profile.forget()
    target = tmp_path / "f.bin"
    target.write_bytes(b"x" * 4096)
    key, _ = profile.fs_key(str(target))
    cfg = get_config(profile_dir=str(tmp_path / "p"))
    (tmp_path / "p" / f"read-{key}.json").mkdir(parents=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert profile.load_profile(cfg, key) is None
    assert any(issubclass(w.category, CacheWarning) for w in caught)
    assert profile.load_profile(get_config(profile_dir=str(tmp_path / "none")), key) is None
