"""The engine-agnostic parts of fastckpt.migrate (and the vLLM adapter's module) import without
torch, transformers or vLLM, and migrate never imports the scheduler."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
import fastckpt.migrate as m
from fastckpt.migrate import costmodel, driver, fingerprint, protocol, remote, sampling, serve
from fastckpt.migrate import state, transport, vllm, vllm_params, vllm_sides
m.RemoteTarget, m.SocketTransport, m.RecomputeCostModel, m.checkpoint_fingerprint
m.VllmEngine
bad = [
    n
    for n in ("torch", "transformers", "vllm", "fastckpt.sched", "fastckpt._core")
    if n in sys.modules
]
assert not bad, bad
"""


def test_migrate_core_imports_without_torch() -> None:
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_no_module_of_migrate_names_the_scheduler() -> None:
    from pathlib import Path

    import fastckpt.migrate

    root = Path(fastckpt.migrate.__file__).parent
    for path in root.glob("*.py"):
        assert "fastckpt.sched" not in path.read_text(), path
