"""Hardware ceilings, measured in the same run as the loaders (see ``docs/benchmarks.md``).

- ``disk_direct``: sequential O_DIRECT read of the checkpoint's safetensors shards with a deep
  queue: fio (io_uring, else libaio, else psync) when installed; else fastckpt's own engine with
  O_DIRECT; else a pool of Python threads issuing aligned O_DIRECT ``preadv`` calls.
- ``disk_buffered``: one thread reading the same files sequentially through the page cache,
  starting cold (the ceiling of any buffered loader).
- ``pagecache_to_host``: the files warm, copied into host memory (pinned when the target is a
  GPU) by several threads; the best thread count is the ceiling (worker process).
- ``pinned_to_gpu``: pinned host memory to the GPU in 64 MB chunks on 4 streams (worker process).
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from fastckpt.bench.common import (
    chunk_tasks,
    drop_from_page_cache,
    log,
    parallel_pread,
)
from fastckpt.rules.units import MiB

DIRECT_ALIGN = 4096


@dataclass(frozen=True)
class CeilingSample:
    name: str  # disk_direct | disk_buffered | pagecache_to_host | pinned_to_gpu
    repeat: int
    nbytes: int
    seconds: float
    method: str
    note: str = ""

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["gbps"] = self.gbps
        return out


def find_fio() -> str | None:
    return shutil.which("fio")


def fio_version(fio: str | None) -> str | None:
    if not fio:
        return None
    try:
        proc = subprocess.run([fio, "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def _fio_escape(path: str) -> str:
    return path.replace("\\", "\\\\").replace(":", "\\:")


def fio_read(fio: str, files: Sequence[str], *, iodepth: int = 32) -> tuple[int, float, str]:
    """Sequential O_DIRECT read of ``files`` with fio; ``(bytes, seconds, method)``."""
    last_error = ""
    for engine in ("io_uring", "libaio", "psync"):
        cmd = [fio, "--output-format=json"]
        for i, path in enumerate(files):
            size = os.path.getsize(path)
            bs = MiB if size >= MiB else DIRECT_ALIGN
            size = size // bs * bs
            if size == 0:
                continue
            cmd += [
                f"--name=f{i}",
                f"--filename={_fio_escape(path)}",
                "--rw=read",
                f"--bs={bs}",
                "--direct=1",
                f"--ioengine={engine}",
                f"--iodepth={iodepth if engine != 'psync' else 1}",
                f"--size={size}",
                "--invalidate=1",
                "--stonewall",
            ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.SubprocessError) as exc:
            last_error = str(exc)
            continue
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            last_error = f"fio {engine}: {lines[-1] if lines else f'exit {proc.returncode}'}"
            continue
        text = proc.stdout[proc.stdout.find("{") :]
        try:
            jobs = json.loads(text)["jobs"]
        except (ValueError, KeyError) as exc:
            last_error = f"cannot parse fio output: {exc}"
            continue
        nbytes = 0
        seconds = 0.0
        for job in jobs:
            if job.get("error"):
                break
            rd = job["read"]
            nbytes += int(rd["io_bytes"])
            seconds += int(rd["io_bytes"]) / float(rd["bw_bytes"]) if rd["bw_bytes"] else 0.0
        else:
            if nbytes:
                return nbytes, seconds, f"fio {engine} O_DIRECT qd{iodepth} bs=1M"
        last_error = f"fio {engine}: job error"
    raise RuntimeError(f"fio could not read the files: {last_error}")


def engine_read(files: Sequence[str], *, depth: int = 32) -> tuple[int, float, str]:
    """Sequential O_DIRECT read through fastckpt's engine (``fastckpt.io_engine``)."""
    from fastckpt import io_engine

    chunk = 4 * MiB
    buf = io_engine.AlignedBuffer(chunk * depth)
    nbytes = 0
    with io_engine.Engine("auto") as engine:
        handles = [io_engine.File(path, direct=True) for path in files]
        try:
            for h in handles:
                if not h.direct:
                    raise RuntimeError(f"no O_DIRECT for {h.path}: {h.direct_note}")
            t0 = time.perf_counter()
            for h in handles:
                ops = [
                    (h, off, min(chunk, h.size - off), buf, (k % depth) * chunk, k)
                    for k, off in enumerate(range(0, h.size, chunk))
                ]
                engine.read(ops)
                nbytes += h.size
            seconds = time.perf_counter() - t0
            name = engine.name
        finally:
            for h in handles:
                h.close()
    return nbytes, seconds, f"fastckpt engine ({name}) O_DIRECT 4 MiB, qd{depth}"


def python_direct_read(
    files: Sequence[str], *, threads: int = 8, chunk_bytes: int = 4 * MiB
) -> tuple[int, float, str]:
    """Sequential O_DIRECT read by a pool of threads, each with one aligned buffer."""
    tasks = [
        (path, off, -(-n // DIRECT_ALIGN) * DIRECT_ALIGN)
        for path, off, n in chunk_tasks(files, chunk_bytes)
    ]
    bufs = [mmap.mmap(-1, chunk_bytes) for _ in range(threads)]  # page aligned, as O_DIRECT needs
    views = [memoryview(b) for b in bufs]
    try:
        nbytes, seconds = parallel_pread(
            tasks, threads, lambda k, i, n: views[k][:n], flags=getattr(os, "O_DIRECT", 0)
        )
    finally:
        for v in views:
            v.release()
        for b in bufs:
            b.close()
    return nbytes, seconds, f"python O_DIRECT preadv {threads} threads x {chunk_bytes >> 20} MiB"


def buffered_read(files: Sequence[str], *, chunk_bytes: int = 16 * MiB) -> tuple[int, float, str]:
    """One thread, sequential, through the page cache."""
    buf = bytearray(chunk_bytes)
    view = memoryview(buf)
    nbytes = 0
    t0 = time.perf_counter()
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while True:
                n = os.readv(fd, [view])
                if n <= 0:
                    break
                nbytes += n
        finally:
            os.close(fd)
    return nbytes, time.perf_counter() - t0, "buffered sequential read, 1 thread, 16 MiB"


def disk_ceilings(
    files: Sequence[str], repeat: int, *, fio: str | None, direct_ok: bool = True
) -> list[CeilingSample]:
    """The two disk ceilings on ``files``, each from a cold page cache."""
    out: list[CeilingSample] = []
    if direct_ok:
        drop_from_page_cache(files)
        attempts: list[tuple[str, Any]] = []
        if fio:
            attempts.append(("fio", lambda: fio_read(fio, files)))
        attempts.append(("engine", lambda: engine_read(files)))
        attempts.append(("python", lambda: python_direct_read(files)))
        notes: list[str] = []
        for label, attempt in attempts:
            try:
                nbytes, seconds, method = attempt()
            except Exception as exc:
                notes.append(f"{label}: {type(exc).__name__}: {exc}")
                continue
            out.append(
                CeilingSample("disk_direct", repeat, nbytes, seconds, method, "; ".join(notes))
            )
            break
        else:
            log(f"ceilings: no O_DIRECT read worked: {'; '.join(notes)}")
    drop_from_page_cache(files)
    nbytes, seconds, method = buffered_read(files)
    out.append(CeilingSample("disk_buffered", repeat, nbytes, seconds, method))
    return out


def from_worker(result: dict[str, Any], repeat: int) -> list[CeilingSample]:
    """Samples from a ``worker ceilings`` result."""
    out: list[CeilingSample] = []
    host = result.get("host") or []
    if host:
        best = max(host, key=lambda h: h["nbytes"] / h["seconds"] if h["seconds"] else 0.0)
        target = "pinned" if best.get("pinned") else "pageable"
        tried = ", ".join(
            f"{h['threads']}t {h['nbytes'] / h['seconds'] / 1e9:.1f} GB/s"
            for h in host
            if h["seconds"]
        )
        out.append(
            CeilingSample(
                "pagecache_to_host",
                repeat,
                int(best["nbytes"]),
                float(best["seconds"]),
                f"page cache -> {target} host, {best['threads']} threads",
                tried,
            )
        )
    h2d = result.get("h2d")
    if h2d:
        out.append(
            CeilingSample(
                "pinned_to_gpu",
                repeat,
                int(h2d["nbytes"]),
                float(h2d["seconds"]),
                f"pinned -> GPU, {h2d['chunk_bytes'] // MiB} MiB chunks "
                f"on {h2d['streams']} streams",
            )
        )
    return out
