"""Load benchmark: fastckpt against safetensors, torch.load and the installed peers.

A thin shell over ``fastckpt.bench.cli`` (the same as ``fastckpt bench``); see
``benchmarks/README.md`` and ``docs/benchmarks.md``. Example::

    python benchmarks/bench_load.py --size 2GB --device cpu --repeats 5 --out bench_out
"""

from __future__ import annotations

import sys

from fastckpt.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
