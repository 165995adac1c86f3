"""A scheduler node needs neither torch nor the compiled core; sched never imports migrate."""

from __future__ import annotations

import subprocess
import sys


def test_sched_imports_neither_torch_nor_core_nor_migrate() -> None:
    code = (
        "import sys\n"
        "import fastckpt.sched, fastckpt.sched.sim, fastckpt.sched.wire, fastckpt.sched.cli\n"
        "import fastckpt.sched.calibrate, fastckpt.sched.profile, fastckpt.sched.accuracy\n"
        "import fastckpt.sched.reserve, fastckpt.sched.sim_serve\n"
        "bad = [m for m in ('torch', 'fastckpt._core', 'fastckpt.migrate', 'ray') "
        "if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
