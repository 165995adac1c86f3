"""The load benchmark harness (``fastckpt bench``, ``benchmarks/bench_load.py``).

It measures every loader the same way (see ``docs/benchmarks.md``): a fresh subprocess per
measurement, timed from just before the first load call until every tensor is usable on the
target (CUDA synchronised, or every host page touched), checked bitwise against
``safetensors.torch.load_file``, in the scenarios cold / warm / tmpfs, with the hardware ceilings
measured in the same run.

Modules: ``common`` (sizes, page-cache control, logging), ``generate`` (LLaMA-like test
checkpoints), ``loaders`` (what each loader does, run inside the child), ``worker`` (the child
process), ``ceilings`` (disk, page cache and host-to-device ceilings), ``scenarios``, ``runner``
(orchestration), ``report`` (table, JSON, markdown, PNG) and ``cli``.

Importing this package imports neither torch nor the C++ core.
"""

from __future__ import annotations

__all__: list[str] = []
