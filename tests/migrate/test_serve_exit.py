"""``python -m fastckpt.migrate.serve`` stops with status 0 on SIGTERM and SIGINT, also when the
signal comes right after its "listening" line and while daemon threads are inside torch.

It used to abort (status 134, "terminate called without an active exception"), e.g. serving a
bf16 checkpoint with ``--dtype float32``: the lease reaper's daemon thread held the last
reference to the engine and freed the model while the interpreter was finalizing; torch releases
the GIL while freeing a tensor, and a daemon thread that asks for the GIL back during
finalization exits through C++ frames, which aborts. Whether the reaper wins that race depends
on timing, so the test makes the situation certain: a daemon thread keeps creating and freeing
tensors for the whole life of the server (as a connection thread serving a prefill would).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# python -m fastckpt.migrate.serve, with a daemon thread churning tensors beside it
_SERVE_WITH_TORCH_THREAD = """
import runpy, sys, threading
import torch

def churn():
    sys.stdin.readline()  # from when the test says so (not to slow down the load)
    while True:
        batch = [torch.ones(256) for _ in range(64)]
        del batch

threading.Thread(target=churn, daemon=True).start()
sys.argv[0] = "fastckpt.migrate.serve"
runpy.run_module("fastckpt.migrate.serve", run_name="__main__", alter_sys=True)
"""


# SIGINT has the same handler; it runs with the slow tests (each case starts a server process)
@pytest.mark.parametrize(
    "sig",
    [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
    ids=["SIGTERM", "SIGINT"],
)
def test_server_exits_cleanly_on_a_signal(llama_f32: Path, sig: signal.Signals) -> None:
    argv = ["--model", str(llama_f32), "--dtype", "float32", "--threads", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVE_WITH_TORCH_THREAD, *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening "), line
        proc.stdin.write("churn\n")
        proc.stdin.flush()
        time.sleep(0.2)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "terminate called" not in err
