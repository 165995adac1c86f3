"""Start a ``fastckpt serve`` daemon in a child process and wait until it answers (benchmarks,
tests and examples that need a node's daemon of their own)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

from fastckpt.serve.client import Client


def start_daemon(
    socket_path: str,
    root: str,
    dram_budget: str,
    extra: Sequence[str] = (),
    *,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 60.0,
) -> subprocess.Popen[bytes]:
    """``fastckpt serve --socket socket_path --root root --dram-budget dram_budget *extra``,
    returned once it answers on its socket (the socket's folder is made, private). Raises
    ``RuntimeError`` with the daemon's last error output if it exits or does not answer within
    ``timeout_s`` (it is killed then)."""
    os.makedirs(os.path.dirname(socket_path) or ".", mode=0o700, exist_ok=True)
    cmd = [sys.executable, "-m", "fastckpt.cli", "serve", "--socket", socket_path, "--root", root,
           "--dram-budget", dram_budget, *extra]  # fmt: skip
    # its error output goes to a file: a pipe nobody reads once it runs could fill and block it
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=errors, env=None if env is None else dict(env)
        )
        _wait_until_it_answers(proc, socket_path, timeout_s, errors)
    return proc


def _wait_until_it_answers(
    proc: subprocess.Popen[bytes], socket_path: str, timeout_s: float, errors: Any
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with Client(socket_path, timeout_s=5) as c:
                c.roots()
            break
        except OSError:
            if proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            proc.kill()
            proc.wait()
            errors.seek(0)
            err = errors.read().decode(errors="replace")
            raise RuntimeError(f"fastckpt serve did not start: {err[-2000:]}") from None


def stop_daemon(proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> int:
    """SIGTERM, then SIGKILL after ``timeout_s``; the exit status."""
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            return proc.wait(timeout_s)
        proc.kill()
    return proc.wait(timeout_s)
