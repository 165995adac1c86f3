"""The DRAM tier's side of a load: look the checkpoint up, or fill the tier with it once.

A fill is single flight (concurrent loads of one checkpoint share one read). For a CPU-only item
the partitions' own page cache is held, locked in memory (``fastckpt.tiers.held``); otherwise, or
when locking fails, the partitions are read into memfd blocks from the Loader's pool through the
one executor. An item meant for a GPU is pinned after the fill, in the background, so that later
hits copy from pinned memory; a hit never pins.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

from fastckpt.config import Config
from fastckpt.format.fsdir import OpenFile
from fastckpt.format.index import Index
from fastckpt.loader import policy
from fastckpt.loader.executor import Executor
from fastckpt.loader.plan import LoadPlan, plan_partitions
from fastckpt.loader.policy import Decision, LoadDecision
from fastckpt.loader.sources import Sources
from fastckpt.loader.tiering import SingleFlight
from fastckpt.tiers.dram import DramItem, DramTier


class Unkept(DramItem):
    """A DRAM item the tier could not keep; owned by one load (discarded after it)."""

    def __init__(self, item: DramItem) -> None:
        super().__init__(item.blocks, item.nbytes)


def lookup(
    tier: DramTier,
    ident: Hashable,
    index: Index,
    plan: LoadPlan,
    gpu_devices: frozenset[str],
    *,
    verify: bool,
    maps_files: bool,
    may_fill: bool,
    held: list[tuple[Any, Hashable]],
) -> tuple[DramItem | None, bool]:
    """(the item to serve from, pinned for this load and recorded in ``held``; or None, and
    whether this load may fill the tier). Without ``maps_files`` (``private_copy=True``) an item
    holding the files' page cache is not used for CPU buffers."""
    if tier.capacity_bytes == 0 or verify:
        return None, False
    if all(b.nbytes == 0 or b.device in gpu_devices for b in plan.buffers):
        return None, False  # nothing left to read
    item = tier.get(ident)
    if (
        item is not None
        and item.held
        and not maps_files
        and any(b.device == "cpu" and b.nbytes for b in plan.buffers)
    ):
        return None, False
    if item is not None and tier.pin(ident):
        held.append((tier, ident))
        return item, False
    total = sum(p.nbytes for p in index.partitions)
    return None, may_fill and total <= tier.capacity_bytes


def fill(
    tier: DramTier,
    flights: SingleFlight,
    ident: Hashable,
    index: Index,
    files: Sequence[OpenFile],
    *,
    engine: Callable[[], Any],
    residency: Callable[[int], float],
    profile: policy.ReadProfile | None,
    settings: policy.Settings,
    cfg: Config,
    pinned: bool,
    open_partition: Callable[..., Any],
    background: Callable[[Callable[[], Any]], Any] | None = None,
    notes: list[str] | None = None,
) -> tuple[DramItem | None, bool]:
    """Read the whole checkpoint into a DRAM-tier item, once for concurrent callers. Returns
    (item pinned for the caller, or None; whether this call did the reading). The leader gets
    its item even when the tier could not keep it (an ``Unkept``, discarded after the load).

    Without ``pinned`` (no GPU target) the item holds the partitions' own page cache, locked in
    memory; when locking fails, for GPU targets, or when loads must not map files
    (``cpu_map_cached`` off), the partitions are read into memfd blocks. With ``pinned`` the
    blocks are pinned by ``background`` after the fill (never on a later hit)."""

    def work() -> DramItem:
        if not pinned and cfg.cpu_map_cached and tier.page_locker is not None:
            item = hold(tier, index, files, open_partition)
            if item is not None:
                return item
            if notes is not None:
                notes.append(
                    "dram-tier: could not lock the page cache "
                    f"({tier.last_lock_error}); copied into memory"
                )
        sizes = {i: p.nbytes for i, p in enumerate(index.partitions)}
        item = tier.new_item(sizes)
        try:
            read_blocks(
                index,
                item.blocks,
                files,
                engine=engine,
                residency=residency,
                profile=profile,
                settings=settings,
                cfg=cfg,
                open_partition=open_partition,
            )
        except BaseException:
            tier.discard(item)
            raise
        return item

    def lead() -> tuple[DramItem, bool]:
        item = work()
        kept = tier.put(ident, item, item.nbytes, pin=True)
        if pinned and background is not None:
            background(lambda: pin_item(item))
        return item, kept

    (item, kept), led = flights.run(("dram", ident), lead)
    if led:
        return (item if kept else Unkept(item)), True
    got = tier.get(ident)
    if got is not None and tier.pin(ident):
        return got, False
    return None, False


def pin_item(item: DramItem) -> int:
    """Pin every block of ``item`` (memfd blocks; held page cache is never pinned); returns
    bytes pinned. Runs in the background after a fill or a prefetch."""
    done = 0
    for block in item.blocks.values():
        if block.closed:
            continue
        done += block.pin_range(0, block.nbytes)
    return done


def hold(
    tier: DramTier, index: Index, files: Sequence[OpenFile], open_partition: Callable[..., Any]
) -> DramItem | None:
    """A DRAM item keeping the partitions' page cache, through duplicates of the validated
    descriptors (size checked again); None when locking failed."""
    fds: dict[int, tuple[int, int]] = {}
    try:
        for i, part in enumerate(index.partitions):
            fds[i] = (open_partition(index, i, files[i], direct=None), part.nbytes)
    except BaseException:
        for fd, _ in fds.values():
            os.close(fd)
        raise
    return tier.hold_files(fds)


def read_blocks(
    index: Index,
    blocks: Mapping[int, Any],
    files: Sequence[OpenFile],
    *,
    engine: Callable[[], Any],
    residency: Callable[[int], float],
    profile: policy.ReadProfile | None,
    settings: policy.Settings,
    cfg: Config,
    open_partition: Callable[..., Any],
) -> None:
    """Read whole partitions into host blocks (file offset = block offset) through the executor,
    each partition in the mode the policy gives a fill (buffered when cached, else the cold
    mode)."""
    plan = plan_partitions(index, sorted(blocks), chunk_bytes=cfg.chunk_bytes)
    decisions = tuple(
        Decision(
            b.index,
            "cpu",
            b.partition,
            policy.fill_mode(residency(b.partition), profile, settings)
            if b.nbytes
            else policy.Source.EMPTY,
        )
        for b in plan.buffers
    )
    sources = Sources(
        engine=engine,
        files=files,
        open_partition=open_partition,
        cpu_dest={b.index: blocks[b.partition].buffer for b in plan.buffers if b.nbytes},
    )
    Executor(index, plan, LoadDecision(decisions), sources, cfg=cfg).run()
