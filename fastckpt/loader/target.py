"""Where a load goes: the caller's device argument made canonical, bare ``"cuda"`` being the
calling thread's current CUDA device (``torch.cuda.current_device()``), not device 0."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from fastckpt.rules.devices import canonical_device, check_cuda_visible, check_device_map

if TYPE_CHECKING:  # pragma: no cover
    from fastckpt.loader.session import Loader


def _current_cuda() -> int:
    import torch

    if not torch.cuda.is_available():
        return 0
    return int(torch.cuda.current_device())


def resolve_target(device: Any) -> Any:
    """A canonical device (``cpu``/``cuda:N``) or device map; bare ``"cuda"`` (or a
    ``torch.device("cuda")``) is the current CUDA device of the calling thread."""
    if isinstance(device, Mapping):
        return check_device_map(device, lambda _k, v: resolve_target(v))
    return canonical_device(device, current_cuda=_current_cuda)


def check_single_device(loader: Loader, device: Any, verb: str) -> str:
    """One canonical device for ``open``/``iter_tensors`` (no device map), available in this
    process (unless ``loader`` simulates devices)."""
    from fastckpt.errors import DeviceError

    if isinstance(device, Mapping):
        raise DeviceError(f"cannot {verb} a device map: pass one device")
    dev = resolve_target(device)
    if dev.startswith("cuda") and not loader.simulated_devices:
        import torch

        if not torch.cuda.is_available():
            raise DeviceError(f"cannot {verb} {dev}: CUDA is not available in this process")
        if int(dev.split(":", 1)[1]) >= torch.cuda.device_count():
            raise DeviceError(
                f"cannot {verb} {dev}: this process sees {torch.cuda.device_count()} CUDA device(s)"
            )
    return str(dev)


def check_devices(devices: Iterable[str]) -> None:
    """Raise a clear error unless every CUDA device of ``devices`` is visible to torch."""
    if not any(d.startswith("cuda") for d in devices):
        return
    import torch

    note = f" (torch {torch.__version__}, built with CUDA {torch.version.cuda})"
    check_cuda_visible(devices, torch.cuda, note=note)
