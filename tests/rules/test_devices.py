"""The device rule: canonical strings, prefix maps and the visibility check (no torch)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from fastckpt.errors import DeviceError
from fastckpt.rules.devices import (
    canonical_device,
    canonical_device_map,
    check_cuda_visible,
    device_for,
    visible_device,
)


@dataclass
class FakeDevice:
    """Stands for a torch.device: the rule reads only its str()."""

    type: str
    index: int | None = None

    def __str__(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"


@dataclass
class FakeCuda:
    available: bool
    count: int = 0
    current: int = 0

    def is_available(self) -> bool:
        return self.available

    def device_count(self) -> int:
        return self.count

    def current_device(self) -> int:
        return self.current


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("cpu", "cpu"),
        (" CPU ", "cpu"),
        ("cpu:0", "cpu"),
        ("cuda", "cuda:0"),
        ("cuda:3", "cuda:3"),
        ("CUDA:03", "cuda:3"),
        (2, "cuda:2"),
        (FakeDevice("cuda", 1), "cuda:1"),
        (FakeDevice("cpu"), "cpu"),
    ],
)
def test_canonical_spellings(value: object, expected: str) -> None:
    assert canonical_device(value) == expected


def test_bare_cuda_is_the_current_device() -> None:
    assert canonical_device("cuda", current_cuda=lambda: 5) == "cuda:5"
    assert canonical_device(FakeDevice("cuda"), current_cuda=lambda: 2) == "cuda:2"


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (None, "not a device"),
        (True, "not a device"),
        (-1, "negative"),
        (1.5, "float"),
        ("tpu:0", "unsupported device"),
        ("cuda:x", "unsupported device"),
        ("meta", "into memory"),
        ("disk", "into memory"),
        ("", "unsupported device"),
    ],
)
def test_bad_devices(value: object, match: str) -> None:
    with pytest.raises(DeviceError, match=match):
        canonical_device(value)


def test_device_map_is_canonicalised_and_rejects_none() -> None:
    assert canonical_device_map({"": "cuda", "a.b": 1, "c": "CPU"}) == {
        "": "cuda:0",
        "a.b": "cuda:1",
        "c": "cpu",
    }
    with pytest.raises(DeviceError, match="None is not a device"):
        canonical_device_map({"a": None, "": "cpu"})
    with pytest.raises(DeviceError, match="not a string"):
        canonical_device_map({3: "cpu"})
    with pytest.raises(DeviceError, match="must map"):
        canonical_device_map(["a"])  # type: ignore[arg-type]


def test_longest_dotted_prefix_wins() -> None:
    dmap = {"": "cpu", "model": "cuda:0", "model.layers.1": "cuda:1", "model.layers.10": "cuda:2"}
    assert device_for("model.layers.1.mlp.w", dmap) == "cuda:1"
    assert device_for("model.layers.1", dmap) == "cuda:1"
    assert device_for("model.layers.10.w", dmap) == "cuda:2"
    assert device_for("model.layers.11.w", dmap) == "cuda:0"
    assert device_for("modelx.w", dmap) == "cpu"  # a prefix is a whole dotted component
    assert device_for("lm_head.weight", {"model": "cuda:0"}) is None
    assert device_for("x", None) is None
    assert device_for("x", {}) is None


def test_visibility() -> None:
    check_cuda_visible(["cpu"], FakeCuda(False))  # no CUDA asked for: nothing to check
    with pytest.raises(DeviceError, match=r"CUDA is not available in this process \(x\)"):
        check_cuda_visible(["cpu", "cuda:0"], FakeCuda(False), note=" (x)")
    with pytest.raises(DeviceError, match="sees 2 CUDA device"):
        check_cuda_visible(["cuda:1", "cuda:2"], FakeCuda(True, count=2))
    check_cuda_visible(["cuda:1"], FakeCuda(True, count=2))
    assert visible_device("cuda", FakeCuda(True, count=4, current=3)) == "cuda:3"
    with pytest.raises(DeviceError, match="not available"):
        visible_device("cuda", FakeCuda(False))
    assert visible_device("cpu", FakeCuda(False)) == "cpu"
