"""A local multi-node Ray cluster on one machine, started and stopped by its caller.

Each node is a ``ray start --block`` process (the first with ``--head``) in a session of its
own, with its own CPUs, custom resources and environment (so each node's replicas see their own
``FASTCKPT_*`` cache directories and budgets), its address on 127.0.0.1, every port Ray would
otherwise fix chosen free, and a temporary directory of its own (so that ``ray.init()`` elsewhere
on the machine does not find it, and nothing of another cluster is touched). ``stop()`` ends
exactly these process groups (SIGTERM, then SIGKILL after a bound) and removes the directory;
it never runs ``ray stop``, which would end every Ray cluster of the machine.

    with LocalCluster([NodeSpec("a", 1, {"node_a": 1}), NodeSpec("b", 1, {"node_b": 1})]) as c:
        c.connect()            # ray.init(address=...) in this process, once every node is up
        ...

Ray's servers listen on every interface (Ray binds its gRPC servers that way); nodes advertise
and use 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

LOOPBACK = "127.0.0.1"
#: Every node: token authentication (``ray start --head`` turns it on and writes the token to
#: ``~/.ray/auth_token`` when there is none; a connecting driver finds it there), no usage
#: reporting.
RAY_ENV = {"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}


class ClusterError(RuntimeError):
    """A node did not start (the message has the end of its log) or the cluster never formed."""


@dataclass(frozen=True)
class NodeSpec:
    """One node: its name, CPUs, custom resources and extra environment."""

    name: str
    num_cpus: float = 1
    resources: Mapping[str, float] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    object_store_bytes: int = 100 * 1024 * 1024


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@dataclass
class _Node:
    spec: NodeSpec
    proc: subprocess.Popen[bytes]
    log: str


class LocalCluster:
    """Nodes started by ``start()`` (or ``with``), ended by ``stop()`` (see the module doc).

    Args:
        nodes: the head first.
        start_timeout_s: bound on each node's start and on the cluster forming.
        stop_timeout_s: how long ``stop`` waits after SIGTERM before SIGKILL.
    """

    def __init__(
        self,
        nodes: Sequence[NodeSpec],
        *,
        start_timeout_s: float = 180.0,
        stop_timeout_s: float = 15.0,
    ) -> None:
        if not nodes:
            raise ValueError("a cluster needs at least one node")
        self.specs = list(nodes)
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.temp_dir = ""
        self.port = 0
        self.nodes: list[_Node] = []
        self._connected = False

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start every node, each once the previous one is up; on any failure stop them all."""
        self.temp_dir = tempfile.mkdtemp(prefix="fckray-", dir="/tmp")  # short socket paths
        self.port = free_port()
        try:
            for i, spec in enumerate(self.specs):
                self._start_node(spec, head=i == 0)
        except BaseException:
            self.stop()
            raise

    def _command(self, spec: NodeSpec, head: bool) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--block",
            f"--node-ip-address={LOOPBACK}",
            f"--num-cpus={spec.num_cpus:g}",
            "--num-gpus=0",
            f"--resources={json.dumps(dict(spec.resources))}",
            f"--object-store-memory={spec.object_store_bytes}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            "--min-worker-port=0",
            "--max-worker-port=0",
            "--disable-usage-stats",
        ]
        if head:
            cmd += [
                "--head",
                f"--port={self.port}",
                f"--temp-dir={self.temp_dir}",
                "--include-dashboard=false",
                f"--ray-client-server-port={free_port()}",
            ]
        else:
            cmd += [f"--address={self.address}"]
        return cmd

    def _start_node(self, spec: NodeSpec, *, head: bool) -> None:
        log = os.path.join(self.temp_dir, f"node-{spec.name}.log")
        env = {**os.environ, **spec.env, **RAY_ENV}
        env.pop("RAY_ADDRESS", None)
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                self._command(spec, head),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # its own process group: stop() ends exactly it
            )
        self.nodes.append(_Node(spec, proc, log))
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            text = _read(log)
            if "Ray runtime started" in text:
                return
            if proc.poll() is not None:
                raise ClusterError(
                    f"node {spec.name} exited with {proc.returncode}:\n{text[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"node {spec.name} did not start in {self.start_timeout_s:.0f} s:\n"
                    f"{text[-3000:]}"
                )
            time.sleep(0.2)

    def connect(self, **init: Any) -> None:
        """``ray.init`` this process into the cluster and wait until every node is alive."""
        import ray

        if os.environ.get("RAY_ADDRESS"):
            raise ClusterError("RAY_ADDRESS is set: it would take precedence over this cluster")
        # "auto" with this cluster's temporary directory finds exactly this cluster (its head
        # wrote its address there) and, unlike an explicit address, picks up the token that
        # authenticates with it.
        ray.init(address="auto", _temp_dir=self.temp_dir, **init)
        if ray.get_runtime_context().gcs_address.rsplit(":", 1)[-1] != str(self.port):
            raise ClusterError(
                f"connected to {ray.get_runtime_context().gcs_address}, not {self.address}"
            )
        self._connected = True
        deadline = time.monotonic() + self.start_timeout_s
        while sum(1 for n in ray.nodes() if n.get("Alive")) < len(self.specs):
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"only {sum(1 for n in ray.nodes() if n.get('Alive'))} of "
                    f"{len(self.specs)} nodes joined in {self.start_timeout_s:.0f} s"
                )
            time.sleep(0.2)

    def stop(self) -> None:
        """Disconnect, end every node's process group (SIGTERM, SIGKILL after the bound), and
        remove the temporary directory. Safe to call twice."""
        if self._connected:
            import ray

            with contextlib.suppress(Exception):
                from ray import serve

                serve.shutdown()
            with contextlib.suppress(Exception):
                ray.shutdown()
            self._connected = False
        for node in reversed(self.nodes):
            _signal_group(node.proc, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        for node in reversed(self.nodes):
            left = max(0.1, deadline - time.monotonic())
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(left)
            _signal_group(node.proc, signal.SIGKILL)  # whatever of the group is still there
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(10)
        self.nodes = []
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = ""

    def logs(self, tail: int = 2000) -> str:
        """The end of each node's ``ray start`` log (for error messages)."""
        return "\n".join(f"--- {n.spec.name}\n{_read(n.log)[-tail:]}" for n in self.nodes)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)  # the group leader's pid is the group id (own session)


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""
