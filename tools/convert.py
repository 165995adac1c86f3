#!/usr/bin/env python3
"""Convert a checkpoint to the fastckpt format: ``python tools/convert.py SRC DST [options]``.

A thin shell over ``fastckpt.cli.convert_main`` (the ``fastckpt-convert`` console script); run
with ``--help`` for the options.
"""

from __future__ import annotations

import sys

from fastckpt.cli import convert_main

if __name__ == "__main__":
    sys.exit(convert_main())
