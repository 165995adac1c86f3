from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import fastckpt

SERVE = [sys.executable, "-c", "import sys; from fastckpt.cli import main; sys.exit(main())"]


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    socket: str
    root: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def memfds(self) -> int:
        """memfds the daemon process holds open right now."""
        n = 0
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{self.pid}/fd/{fd}").startswith("/memfd:fastckpt"):
                    n += 1
        return n

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(10)


def _answers(socket_path: str) -> bool:
    from fastckpt.serve.client import Client

    try:
        with Client(socket_path, timeout_s=5) as c:
            c.roots()
        return True
    except OSError:
        return False


def start_daemon(
    socket_path: str, root: str, budget: str, *extra: str, args: list[str] | None = None
) -> Daemon:
    if args is None:
        args = ["--socket", socket_path, "--root", root, "--dram-budget", budget, *extra]
    proc = subprocess.Popen(
        [*SERVE, "serve", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 20
    while not _answers(socket_path):
        if proc.poll() is not None:
            raise RuntimeError(
                f"daemon exited: {proc.stderr.read().decode() if proc.stderr else ''}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("daemon did not start")
        time.sleep(0.02)
    return Daemon(proc, socket_path, root)


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[object]:
    started: list[Daemon] = []

    def make(
        root: str, budget: str = "4MiB", *extra: str, socket_path: str | None = None
    ) -> Daemon:
        d = start_daemon(socket_path or str(tmp_path / "run" / "sock"), root, budget, *extra)
        started.append(d)
        return d

    yield make
    for d in started:
        d.stop()
        if d.proc.stderr:
            d.proc.stderr.close()


def make_state(seed: int, tensors: int = 6, rows: int = 3000) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {f"layer{i}.w": torch.randn(rows + 17 * i, 16, generator=g) for i in range(tensors)}
    sd["ids"] = torch.randint(0, 1 << 15, (513,), dtype=torch.int16, generator=g)
    sd["empty"] = torch.empty(0, 4)
    return sd


def save_ckpt(
    path: Path, seed: int, *, overwrite: bool = False, rows: int = 3000
) -> dict[str, torch.Tensor]:
    sd = make_state(seed, rows=rows)
    fastckpt.save(sd, str(path), partition_bytes=128 << 10, overwrite=overwrite, progress=False)
    return sd


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a
    )


_CTX: list[Any] = []


def mp_context() -> Any:
    """A forkserver that has imported torch and fastckpt once: client processes start in
    milliseconds instead of paying torch's import each (the CI machine has two cores)."""
    if not _CTX:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(
            [
                "torch",
                "fastckpt.loader.api",
                "fastckpt.serve.client",
                __name__.rsplit(".", 1)[0] + "._worker",
            ]
        )
        _CTX.append(ctx)
    return _CTX[0]


class ClientProc:
    """A client process loading ``paths`` through the daemon at ``sock``."""

    def __init__(self, sock: str, paths: list[str], timeout: float = 5.0) -> None:
        from . import _worker

        ctx = mp_context()
        self.recv, send = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(
            target=_worker.child, args=(sock, timeout, paths, send), daemon=True
        )
        self.proc.start()
        send.close()

    def result(self, timeout: float = 60.0) -> list[dict[str, Any]]:
        if not self.recv.poll(timeout):
            self.proc.kill()
            raise TimeoutError("client process did not answer")
        rows: list[dict[str, Any]] = self.recv.recv()
        self.proc.join(10)
        assert self.proc.exitcode == 0
        return rows

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(10)
        self.recv.close()


class InProcessDaemon:
    """A daemon on a thread of the test process, for settings the command line does not take
    (short idle timeouts, few connections). Stopped by the fixture that made it."""

    def __init__(self, root: str, socket_path: str, **settings: Any) -> None:
        import threading

        from fastckpt.serve.daemon import Daemon, ServeConfig

        cfg = ServeConfig(
            socket_path=socket_path,
            roots=[root],
            dram_budget_bytes=settings.pop("dram_budget_bytes", 8 << 20),
            **settings,
        )
        self.socket = socket_path
        self.daemon = Daemon(cfg)
        self.daemon.bind()
        self.thread = threading.Thread(target=self.daemon.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.daemon.stop()
        self.thread.join(30)
        assert not self.thread.is_alive(), "the daemon did not stop"


@pytest.fixture
def inproc_daemon(tmp_path: Path) -> Iterator[Any]:
    started: list[InProcessDaemon] = []

    def make(root: str, **settings: Any) -> InProcessDaemon:
        d = InProcessDaemon(root, str(tmp_path / f"run{len(started)}" / "sock"), **settings)
        started.append(d)
        return d

    yield make
    for d in started:
        d.stop()
