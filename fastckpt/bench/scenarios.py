"""Where the checkpoint's bytes are when a measurement starts.

- ``cold``: no page of any file of the checkpoint (every form) is in the page cache: each file is
  fsynced and dropped with ``POSIX_FADV_DONTNEED`` before every measurement, and the fraction
  still resident is recorded (it should be ~0).
- ``warm``: the loader's files are in the page cache (read once when they are not).
- ``tmpfs``: the files live in ``/dev/shm`` (memory-speed storage; the pipeline's own limit). The
  copy is made once and removed at the end; the scenario is skipped, with a note, when the
  tmpfs or the memory has no room for it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterable, Sequence
from typing import Any

from fastckpt.bench.common import (
    MEMORY_FILESYSTEMS,
    drop_from_page_cache,
    log,
    meminfo,
    mount_of,
    read_through,
    resident_fraction,
)
from fastckpt.bench.generate import CheckpointSet
from fastckpt.rules.units import MiB, format_bytes

NAMES = ("cold", "warm", "tmpfs")


def parse_scenarios(text: str) -> list[str]:
    out: list[str] = []
    for raw in text.split(","):
        key = raw.strip().lower()
        if not key:
            continue
        if key not in NAMES:
            raise ValueError(f"unknown cache state {raw.strip()!r}; known: {', '.join(NAMES)}")
        if key not in out:
            out.append(key)
    if not out:
        raise ValueError("--states names no cache state")
    return out


class Scenario:
    name = "?"

    def __init__(self) -> None:
        self.notes: list[str] = []

    def setup(self, ckpt: CheckpointSet, sources: Iterable[str]) -> CheckpointSet | None:
        """The checkpoint as this scenario serves it, or None (skipped; see ``notes``)."""
        return ckpt

    def serves(self, source: str) -> bool:
        """Whether loaders of checkpoint form ``source`` can run in this scenario."""
        return True

    def before_each(self, ckpt: CheckpointSet, files: Sequence[str]) -> dict[str, Any]:
        return {}

    def teardown(self) -> None:
        return None


class Cold(Scenario):
    name = "cold"

    def setup(self, ckpt: CheckpointSet, sources: Iterable[str]) -> CheckpointSet | None:
        fs = mount_of(ckpt.safetensors_files[0]).fstype
        if fs in MEMORY_FILESYSTEMS:
            self.notes.append(f"cold: the checkpoint is on {fs}; cold cannot differ from warm")
        return ckpt

    def before_each(self, ckpt: CheckpointSet, files: Sequence[str]) -> dict[str, Any]:
        drop_from_page_cache(ckpt.all_files())
        return {"resident_before": resident_fraction(files)}


class Warm(Scenario):
    name = "warm"

    def before_each(self, ckpt: CheckpointSet, files: Sequence[str]) -> dict[str, Any]:
        frac = resident_fraction(files)
        if frac < 0.999:
            read_through(files)
            frac = resident_fraction(files)
        return {"resident_before": frac}


class Tmpfs(Scenario):
    name = "tmpfs"

    def __init__(self, base: str = "/dev/shm", *, host_copy_bytes: int = 0) -> None:
        super().__init__()
        self.base = base
        self.host_copy_bytes = host_copy_bytes  # memory the loads themselves need (CPU target)
        self.root: str | None = None
        self.copied: set[str] = set()

    def serves(self, source: str) -> bool:
        return source in self.copied

    def setup(self, ckpt: CheckpointSet, sources: Iterable[str]) -> CheckpointSet | None:
        sources = sorted(set(sources))
        if not os.path.isdir(self.base):
            self.notes.append(f"tmpfs skipped: {self.base} does not exist")
            return None
        fs = mount_of(self.base).fstype
        if fs not in MEMORY_FILESYSTEMS:
            self.notes.append(f"tmpfs skipped: {self.base} is {fs}, not a memory filesystem")
            return None
        free = shutil.disk_usage(self.base).free
        avail = meminfo().get("MemAvailable", free)
        room = min(free, avail - self.host_copy_bytes - 512 * MiB)
        # When not every form fits, drop the least useful first: the torch .bin (one loader),
        # then the fastckpt form (one loader); the safetensors form serves all the others.
        wanted: list[str] = [s for s in ("safetensors", "fastckpt", "torch") if s in sources]
        while True:
            plan: list[tuple[str, str]] = []  # (source file, path relative to the copy's root)
            for src in wanted:
                plan += _copy_plan(ckpt, src)
            needed = sum(os.path.getsize(p) for p, _ in plan)
            if needed * 1.05 <= room or len(wanted) <= 1:
                break
            self.notes.append(f"tmpfs: no room for the {wanted[-1]} form; its loader is skipped")
            wanted.pop()
        if needed * 1.05 > room:
            self.notes.append(
                f"tmpfs skipped: the copy needs {format_bytes(needed)}, {self.base} has "
                f"{format_bytes(free)} free and {format_bytes(avail)} of memory is available"
            )
            return None
        self.copied = set(wanted)
        self.root = os.path.join(self.base, f"fastckpt-bench-{os.getpid()}")
        shutil.rmtree(self.root, ignore_errors=True)
        log(f"tmpfs: copying {format_bytes(needed)} to {self.root}")
        try:
            for src, rel in plan:
                dst = os.path.join(self.root, rel)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.copyfile(src, dst)
        except BaseException:
            self.teardown()
            raise
        return _relocated(ckpt, self.root, wanted)

    def teardown(self) -> None:
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None


def _copy_plan(ckpt: CheckpointSet, source: str) -> list[tuple[str, str]]:
    if source == "safetensors":
        plan = [
            (f, os.path.join("safetensors", os.path.basename(f))) for f in ckpt.safetensors_files
        ]
        if os.path.isdir(ckpt.safetensors_path):
            for name in sorted(os.listdir(ckpt.safetensors_path)):
                full = os.path.join(ckpt.safetensors_path, name)
                if name.endswith(".json") and os.path.isfile(full):
                    plan.append((full, os.path.join("safetensors", name)))
        return plan
    if source == "torch":
        return [(f, os.path.join("torch", os.path.basename(f))) for f in ckpt.files_for("torch")]
    if source == "fastckpt":
        return [(f, os.path.join("fastckpt", os.path.basename(f))) for f in ckpt.fastckpt_files()]
    raise ValueError(f"unknown checkpoint form {source!r}")


def _relocated(ckpt: CheckpointSet, root: str, sources: Sequence[str]) -> CheckpointSet:
    st_dir = os.path.join(root, "safetensors")
    files = tuple(os.path.join(st_dir, os.path.basename(f)) for f in ckpt.safetensors_files)
    if os.path.isdir(ckpt.safetensors_path):
        st_path = st_dir
    else:
        st_path = os.path.join(st_dir, os.path.basename(ckpt.safetensors_path))
    torch_file = None
    if "torch" in sources and ckpt.torch_file:
        torch_file = os.path.join(root, "torch", os.path.basename(ckpt.torch_file))
    fck = os.path.join(root, "fastckpt") if "fastckpt" in sources and ckpt.fastckpt_dir else None
    return dataclasses.replace(
        ckpt,
        root=root,
        safetensors_path=st_path,
        safetensors_files=files,
        torch_file=torch_file,
        fastckpt_dir=fck,
        owned=(),
    )


def make(name: str, *, tmpfs_base: str = "/dev/shm", host_copy_bytes: int = 0) -> Scenario:
    if name == "cold":
        return Cold()
    if name == "warm":
        return Warm()
    if name == "tmpfs":
        return Tmpfs(tmpfs_base, host_copy_bytes=host_copy_bytes)
    raise ValueError(f"unknown scenario {name!r}")
