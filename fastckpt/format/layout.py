"""Where tensors go in a checkpoint: partitions by device and size cap, aligned offsets. Pure.

``plan_layout`` places tensors (sizes and devices only) into partitions (FORMAT.md section 4);
``device_for`` and ``normalize_device_map`` resolve a user's device map (tensor-name prefixes on
dot boundaries, the longest one winning). No I/O, no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fastckpt.errors import DeviceError
from fastckpt.format import spec
from fastckpt.rules.devices import check_device_map, device_for


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class Layout:
    """Where each stored tensor goes.

    ``placements[i]`` is ``(partition, offset)`` of the i-th input tensor; ``order`` lists input
    indices in load order (partition, then offset); ``partitions`` holds each partition's
    ``(device, nbytes)`` with ``nbytes`` padded to a multiple of ``spec.PAGE``.
    """

    placements: tuple[tuple[int, int], ...]
    order: tuple[int, ...]
    partitions: tuple[tuple[str | None, int], ...]


def plan_layout(
    sizes: Sequence[int],
    devices: Sequence[str | None],
    *,
    partition_bytes: int,
    alignment: int,
) -> Layout:
    """Place tensors into partitions. Pure; no I/O.

    Tensors are grouped by device (groups in order of first appearance; within a group, input
    order), each group into partitions of its own. A partition is closed when the next non-empty
    tensor would end past ``partition_bytes``; a tensor larger than the cap gets a partition to
    itself. Empty tensors never open a partition.
    """
    if len(sizes) != len(devices):
        raise ValueError("sizes and devices differ in length")
    groups: dict[str | None, list[int]] = {}
    for i, dev in enumerate(devices):
        groups.setdefault(dev, []).append(i)
    placements: list[tuple[int, int]] = [(0, 0)] * len(sizes)
    order: list[int] = []
    partitions: list[tuple[str | None, int]] = []
    for dev, members in groups.items():
        part = len(partitions)
        cursor = 0
        end = 0
        for i in members:
            n = sizes[i]
            off = _round_up(cursor, alignment)
            if n > 0 and cursor > 0 and off + n > partition_bytes:
                partitions.append((dev, _round_up(end, spec.PAGE)))
                part += 1
                off = cursor = end = 0
            placements[i] = (part, off)
            order.append(i)
            cursor = off + n
            end = max(end, cursor)
        partitions.append((dev, _round_up(end, spec.PAGE)))
    if not partitions:
        partitions.append((None, 0))
    return Layout(tuple(placements), tuple(order), tuple(partitions))


def _device_hint(key: str, value: object) -> str:
    """A partition's device as a writer records it (FORMAT.md section 4: any non-empty string);
    an int is a CUDA ordinal (as in accelerate)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DeviceError(
            f"device_map[{key!r}] = {value!r}: expected a device string such as 'cuda:0'"
        )
    if isinstance(value, int):
        if value < 0:
            raise DeviceError(f"device_map[{key!r}] = {value}: a device ordinal is >= 0")
        return f"cuda:{value}"
    text = value.strip()
    if not text:
        raise DeviceError(f"device_map[{key!r}] is an empty device string")
    return text


def normalize_device_map(device_map: Mapping[str, Any] | None) -> dict[str, str] | None:
    """Validate a device map (the shape every device map has, ``check_device_map``); values are
    kept as the device strings the writer records, integers meaning CUDA ordinals."""
    if device_map is None:
        return None
    return check_device_map(device_map, _device_hint)


__all__ = ["Layout", "device_for", "normalize_device_map", "plan_layout"]
