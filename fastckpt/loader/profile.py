"""The machine profile: which read mode is fastest on each filesystem, measured once.

Whether O_DIRECT or buffered reads with readahead are faster depends on the storage and changes
between machines (and between runs of one machine), so the loader measures instead of assuming.
The first cold load from a filesystem that has no profile yet runs a short probe on the file it
is about to read: the same byte range read cold three times (O_DIRECT, buffered, and ``mixed``:
buffered over the first half and O_DIRECT over the second, both in flight together), then mapped
and every page touched once (``map``: what a CPU load that maps a cold file costs until its
tensors are usable, as with safetensors), with the page cache dropped before each. The
figures go to a small JSON file under the user's cache directory, keyed by device number and
filesystem type; later loads read that file. A stored file that cannot be used (not JSON, absurd
or negative figures, another filesystem's key) is ignored with a ``CacheWarning`` and measured
again, never an error of the load.

The probe only runs when the file is cold (less than 5% in the page cache): dropping pages a
user already has cached would cost them a re-read, and a warm file cannot measure a cold read.
``FASTCKPT_READ_MODE`` (config ``read_mode``) overrides the profile; ``FASTCKPT_PROBE=0``
disables the probe (then ``auto`` means ``direct``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import threading
import time
import warnings
from typing import Any

from fastckpt import io_engine
from fastckpt.config import Config, profile_dir
from fastckpt.errors import CacheWarning
from fastckpt.loader.hugepages import HugePages
from fastckpt.loader.policy import ReadProfile, mixed_split

PROBE_BYTES = 64 << 20
PROBE_MIN_BYTES = 8 << 20
PROBE_CHUNK_BYTES = 4 << 20
COLD_MAX_RESIDENT = 0.05

_lock = threading.Lock()
_memo: dict[str, ReadProfile] = {}


def fs_key(path: str) -> tuple[str, str]:
    """(key, fs type) of the filesystem holding ``path``: key = ``<major>-<minor>-<fstype>``."""
    st = os.stat(path)
    fs_type = _fs_type(os.path.realpath(path), st.st_dev)
    return f"{os.major(st.st_dev)}-{os.minor(st.st_dev)}-{fs_type}", fs_type


def _fs_type(path: str, dev: int) -> str:
    best, best_type = "", "unknown"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return best_type
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        mount = fields[4].replace("\\040", " ")
        if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
            best, best_type = mount, right.split()[0]
    return best_type


def _profile_file(cfg: Config, key: str) -> str:
    return os.path.join(profile_dir(cfg), f"read-{key}.json")


MAX_GBPS = 10_000.0  # 10 TB/s: beyond any storage; a figure above it is not a measurement
MAX_PROFILE_BYTES = 1 << 16


def load_profile(cfg: Config, key: str) -> ReadProfile | None:
    """The stored profile for filesystem ``key``, or None: missing (silently) or unusable (not a
    small JSON object of finite, non-negative figures for this key; a ``CacheWarning`` says
    which file was ignored, and the caller measures again and overwrites it)."""
    path = _profile_file(cfg, key)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PROFILE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        _ignored(path, f"cannot be read: {exc}")
        return None
    try:
        return _parse_profile(data, key)
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
        _ignored(path, str(exc) or type(exc).__name__)
        return None


def _ignored(path: str, why: str) -> None:
    warnings.warn(
        f"fastckpt: ignoring the stored read-mode profile {path} ({why}); it is measured again",
        CacheWarning,
        stacklevel=4,
    )


def _parse_profile(data: bytes, key: str) -> ReadProfile:
    if len(data) > MAX_PROFILE_BYTES:
        raise ValueError(f"larger than {MAX_PROFILE_BYTES} bytes")
    raw = json.loads(data.decode("utf-8"))
    if not isinstance(raw, dict):
        raise TypeError("not a JSON object")
    if raw.get("key") != key:
        raise ValueError(f"it is the profile of {raw.get('key')!r}, not of {key!r}")

    def gbps(name: str, default: float | None = None) -> float:
        value = raw.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} is not a number")
        value = float(value)
        if not 0.0 <= value <= MAX_GBPS:  # NaN fails too
            raise ValueError(f"{name} = {value} is outside [0, {MAX_GBPS:g}]")
        return value

    probe_bytes = raw.get("probe_bytes")
    if type(probe_bytes) is not int or not 0 <= probe_bytes <= 1 << 50:
        raise ValueError(f"probe_bytes = {probe_bytes!r} is not a byte count")
    measured_at = raw.get("measured_at")
    if isinstance(measured_at, bool) or not isinstance(measured_at, (int, float)):
        raise TypeError("measured_at is not a number")
    if not math.isfinite(measured_at):
        raise ValueError("measured_at is not finite")
    fs_type, source = raw.get("fs_type"), raw.get("source", "probe")
    if not isinstance(fs_type, str) or not isinstance(source, str):
        raise TypeError("fs_type and source must be strings")
    return ReadProfile(
        key=key,
        fs_type=fs_type,
        direct_gbps=gbps("direct_gbps"),
        buffered_gbps=gbps("buffered_gbps"),
        mixed_gbps=gbps("mixed_gbps", 0.0),
        map_gbps=gbps("map_gbps", 0.0),
        probe_bytes=probe_bytes,
        measured_at=float(measured_at),
        source=source,
    )


def store_profile(cfg: Config, profile: ReadProfile) -> str:
    """Write ``profile`` atomically; returns the file's path."""
    path = _profile_file(cfg, profile.key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".read-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(profile.as_dict(), f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def profile_for(path: str, cfg: Config, engine: io_engine.Engine | None) -> ReadProfile | None:
    """The profile of ``path``'s filesystem: memoised, else stored, else probed on ``path`` (when
    allowed, cold and large enough), else None."""
    try:
        key, fs_type = fs_key(path)
    except OSError:
        return None
    with _lock:
        hit = _memo.get(key)
        if hit is not None:
            return hit
        stored = load_profile(cfg, key)
        if stored is not None:
            _memo[key] = stored
            return stored
        if not cfg.probe or engine is None:
            return None
        try:
            measured = probe(path, engine, key=key, fs_type=fs_type, huge_pages=cfg.cpu_huge_pages)
        except OSError:
            return None
        if measured is None:
            return None
        with contextlib.suppress(OSError):  # a read-only cache dir: keep it for this process
            store_profile(cfg, measured)
        _memo[key] = measured
        return measured


def forget() -> None:
    """Drop memoised profiles (tests, after ``fastckpt cache probe``)."""
    with _lock:
        _memo.clear()


def probe(
    path: str,
    engine: io_engine.Engine,
    *,
    key: str | None = None,
    fs_type: str | None = None,
    nbytes: int = PROBE_BYTES,
    force: bool = False,
    huge_pages: str = "auto",
) -> ReadProfile | None:
    """Measure cold O_DIRECT, buffered and mixed reads of the first ``nbytes`` of ``path``.

    Returns None when the file is too small or (unless ``force``) already cached.
    """
    if key is None or fs_type is None:
        key, fs_type = fs_key(path)
    size = os.path.getsize(path)
    n = min(nbytes, size)
    n -= n % 4096
    if n < PROBE_MIN_BYTES:
        return None
    if not force and io_engine.residency(path, sample_windows=64) > COLD_MAX_RESIDENT:
        return None
    figures: dict[str, float] = {}
    with io_engine.File(path, direct=True) as fd_direct, io_engine.File(path, direct=False) as fb:
        split = mixed_split(0, n)
        plans: dict[str, list[tuple[Any, int, int]]] = {
            "direct": [(fd_direct, 0, n)],
            "buffered": [(fb, 0, n)],
            "mixed": [(fb, 0, split), (fd_direct, split, n)],
        }
        for mode in ("direct", "buffered", "mixed"):
            io_engine.drop_page_cache(path)
            # fresh memory each time, as a load reads into: its first-touch cost counts, as it
            # does for the mapping measured below
            buf = io_engine.AlignedBuffer(n, huge_pages=HugePages(huge_pages).advise(n))
            reads: list[io_engine.ReadOp] = []
            for f, lo, hi in plans[mode]:
                for off in range(lo, hi, PROBE_CHUNK_BYTES):
                    ln = min(PROBE_CHUNK_BYTES, hi - off)
                    reads.append((f, off, ln, buf, off, len(reads)))
            t0 = time.perf_counter()
            engine.read(reads)
            figures[mode] = n / (time.perf_counter() - t0) / 1e9
            del buf
        if not fd_direct.direct:
            figures["direct"] = 0.0  # the filesystem refused O_DIRECT: those were buffered reads
            figures["mixed"] = 0.0
    io_engine.drop_page_cache(path)
    figures["map"] = _probe_map(path, n)
    io_engine.drop_page_cache(path)
    return ReadProfile(
        key=key,
        fs_type=fs_type,
        direct_gbps=round(figures["direct"], 3),
        buffered_gbps=round(figures["buffered"], 3),
        mixed_gbps=round(figures["mixed"], 3),
        map_gbps=round(figures["map"], 3),
        probe_bytes=n,
        measured_at=time.time(),
        source="probe",
    )


def _probe_map(path: str, n: int) -> float:
    """GB/s of mapping the first ``n`` bytes of a cold ``path`` privately and touching every
    page once (page faults with the kernel's readahead)."""
    import mmap

    import numpy as np

    with open(path, "rb") as f:
        t0 = time.perf_counter()
        mm = mmap.mmap(f.fileno(), n, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
        try:
            pages = np.frombuffer(mm, dtype=np.uint8)[::4096]
            int(pages.sum())  # one read per page: every page faulted in
            elapsed = time.perf_counter() - t0
            del pages
        finally:
            mm.close()
    return n / elapsed / 1e9
