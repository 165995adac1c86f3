"""The load benchmark harness (``fastckpt bench``, ``benchmarks/bench_load.py``).

It measures every loader the same way (see ``docs/benchmarks.md``): a fresh subprocess per
measurement, timed from just before the first load call until every tensor is usable on the
target (CUDA synchronised, or every host page touched), checked bitwise against
``safetensors.torch.load_file``, in the scenarios cold / warm / tmpfs, with the hardware ceilings
measured in the same run.

Modules: ``common`` (page-cache control, logging), ``generate`` (LLaMA-like test checkpoints),
``loaders`` (what each loader does, run inside the child), ``worker`` (the child process),
``ceilings`` (disk, page cache and host-to-device ceilings), ``scenarios`` (the cache states
cold / warm / tmpfs), ``runner`` (orchestration of the loader comparison), ``report`` (table,
JSON, markdown, PNG) and ``cli``. ``harness`` runs the other benchmark scenarios
(``scenario_engine``, ``scenario_load_model`` for ``load_model`` and ``lora``,
``scenario_convert_memory``, ``scenario_gpu_sweep``) with the same worker, machine description
and report files; its docstring says how to add one.

Importing this package imports neither torch nor the C++ core.
"""

from __future__ import annotations

__all__: list[str] = []
