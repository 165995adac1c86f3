"""The migration transport and host against what the issue found: descriptor exhaustion, thread
objects kept forever, a committed target that fails silently, a token state nested too deep,
and nobody checking who sends prefill/commit/cancel."""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from hostile_peers import hung_up
from migrate_helpers import MemTarget

from fastckpt.migrate import (
    RemoteTarget,
    SamplingParams,
    SocketServer,
    SocketTransport,
    StopCriteria,
    TargetHost,
    TokenState,
    TokenStateError,
    TransportError,
)
from fastckpt.migrate.state import HEADER, MAGIC
from fastckpt.migrate.transport import encode_frame, recv_frame

SECRET = b"0123456789abcdef0123456789abcdef"


@pytest.fixture(autouse=True)
def _no_configured_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FASTCKPT_MIGRATE_SECRET_FILE", raising=False)


def _state(rid: str = "r", n: int = 3, fp: str = "m") -> TokenState:
    return TokenState(
        request_id=rid,
        model_fingerprint=fp,
        prompt_ids=tuple(range(1, n + 1)),
        generated_ids=(),
        sampling=SamplingParams(),
        stop=StopCriteria(max_new_tokens=4),
    )


def _hung_up(s: socket.socket) -> bool:
    """The server closed ``s`` without answering (a reset counts: our bytes were unread)."""
    try:
        return s.recv(65536) == b""
    except ConnectionResetError:
        return True


def _host() -> TargetHost:
    return TargetHost(lambda rid: MemTarget(), lease_s=30.0)


# ------------------------------------------------------------------ token state


def test_a_checksummed_token_state_of_nested_arrays_is_a_token_state_error() -> None:
    body = b'{"prompt_ids": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    fixed = HEADER.pack(MAGIC, 1, 0, len(body), 0)[:16]
    data = fixed + struct.pack("<I", zlib.crc32(fixed + body)) + body
    with pytest.raises(TokenStateError, match="nested"):
        TokenState.from_bytes(data)
    # and through a host: a failure reply, not a dead connection thread
    reply, _ = _host().handle({"op": "prefill", "request_id": "r"}, data)
    assert reply["ok"] is False and reply["error"] == "TokenStateError"


# ------------------------------------------------------------------ descriptors and threads

_EMFILE_SERVER = """
import resource, sys, threading
from fastckpt.migrate.transport import SocketServer
resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))
server = SocketServer(lambda h, p: ({"ok": True, "echo": h}, p)).start()
print(server.port, flush=True)
sys.stdin.read()
server.shutdown()
"""


def test_idle_peers_exhausting_descriptors_do_not_stop_the_accept_loop() -> None:
    """A server allowed 48 descriptors, 80 idle peers: accept() fails with EMFILE. Once they
    leave, a well-behaved client must be served (before: the accept loop had exited)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _EMFILE_SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    idle: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        for _ in range(80):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(1.0)  # the server meets EMFILE on its accepts
        for s in idle:
            s.close()
        idle.clear()
        deadline = time.monotonic() + 20
        while True:
            try:
                with SocketTransport("127.0.0.1", port, timeout_s=3) as tr:
                    assert tr.request({"op": "ping"})[0]["echo"] == {"op": "ping"}
                break
            except TransportError:
                assert time.monotonic() < deadline, "the server stopped accepting"
                time.sleep(0.2)
        assert proc.poll() is None
    finally:
        for s in idle:
            s.close()
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(30)
        if proc.stdout is not None:
            proc.stdout.close()


def _dead_threads() -> int:
    objs = gc.get_objects()
    return sum(issubclass(type(o), threading.Thread) and not o.is_alive() for o in objs)


def test_connection_threads_are_reaped() -> None:
    server = SocketServer(_host().handle).start()
    try:
        gc.collect()
        before = _dead_threads()
        for _ in range(60):
            with SocketTransport(server.host, server.port, timeout_s=5) as tr:
                tr.request({"op": "ping"})
        deadline = time.monotonic() + 10
        while True:
            gc.collect()
            if _dead_threads() - before < 5:
                break
            assert time.monotonic() < deadline, f"{_dead_threads() - before} dead threads kept"
            time.sleep(0.05)
    finally:
        server.shutdown()


def test_connections_past_the_bound_are_closed_and_silent_ones_dropped() -> None:
    """At most ``max_connections`` peers are served at once: one more is closed at accept, before
    any greeting. Peers that say nothing after the greeting are dropped at their request
    deadline, and a driver is served afterwards (before: no bound and no deadline, every
    connection was kept, with its thread, for as long as its peer liked)."""
    server = SocketServer(_host().handle, secret=None, max_connections=3, idle_timeout_s=1.0)
    server.start()
    held: list[socket.socket] = []
    try:
        for _ in range(3):
            s = socket.create_connection((server.host, server.port), timeout=5)
            recv_frame(s)  # greeted: this one is served
            held.append(s)
        extra = socket.create_connection((server.host, server.port), timeout=5)
        assert hung_up(extra, 10), "a connection past the bound was served"
        extra.close()
        assert server.stats()["refused_full"] == 1
        for s in held:  # silent since their greeting
            assert hung_up(s, 10), "a silent peer was kept past its request deadline"
        with SocketTransport(server.host, server.port, timeout_s=5, secret=None) as tr:
            assert tr.request({"op": "ping"})[0]["ok"] is True
        assert server.stats()["dropped"] >= 3
    finally:
        for s in held:
            s.close()
        server.shutdown()


# ------------------------------------------------------------------ a committed target failing


class _FailingModel:
    """The tiny Llama, whose forward raises from its ``fail_at``-th call on (a decode error:
    out of memory, a device lost)."""

    def __init__(self, inner: Any, fail_at: int) -> None:
        self.inner = inner
        self.calls = 0
        self.fail_at = fail_at

        @functools.wraps(inner.forward)  # same signature: the engine reads its keywords
        def forward(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.calls >= self.fail_at:
                raise RuntimeError("device lost (injected)")
            return inner.forward(*args, **kwargs)

        self.forward = forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def parameters(self) -> Any:
        return self.inner.parameters()


def test_a_decode_error_on_a_committed_target_is_a_failed_outcome(llama_f32: Path) -> None:
    import fastckpt
    from fastckpt.migrate import ReferenceEngine

    model = _FailingModel(fastckpt.load_model(llama_f32), fail_at=4)  # prefill, a few steps
    engine = ReferenceEngine(model, fingerprint="m")
    made: dict[str, Any] = {}

    def make(rid: str) -> Any:
        made[rid] = engine.target(rid)
        return made[rid]

    clock = [0.0]
    host = TargetHost(make, lease_s=5.0, clock=lambda: clock[0])
    server = SocketServer(host.handle).start()
    try:
        with SocketTransport(server.host, server.port, timeout_s=30) as tr:
            t = RemoteTarget(tr, "r")
            state = _state(n=8).replace(stop=StopCriteria(max_new_tokens=20))
            t.commit(state)
            out = t.result(timeout_s=20)
            assert out["finished"] is True and out["finish_reason"] == "error"
            assert "device lost" in out["error"] and 0 < len(out["tokens"]) < 20
            assert t.status()["status"] == "failed"
            assert made["r"].seq.cache is None  # the KV cache is freed at once
            clock[0] = 1.0
            host.expire_due()  # first seen ended
            clock[0] = 10.0
            host.expire_due()
            assert host.stats()["committed"] == 0  # reaped a lease later
            assert t.status()["status"] == "failed"
    finally:
        server.shutdown()
        host.close()


# ------------------------------------------------------------------ authentication


def test_with_a_secret_only_its_holders_can_prefill_commit_or_cancel() -> None:
    made: dict[str, MemTarget] = {}

    def make(rid: str) -> MemTarget:
        made[rid] = MemTarget()
        return made[rid]

    server = SocketServer(TargetHost(make).handle, secret=SECRET).start()
    try:
        # the holder of the secret works
        with SocketTransport(server.host, server.port, timeout_s=5, secret=SECRET) as tr:
            assert RemoteTarget(tr, "ok").prefill(_state("ok")) == 3
        # no secret, a wrong one: refused at the handshake, nothing reaches the host
        with pytest.raises(TransportError, match="requires a shared secret"):
            SocketTransport(server.host, server.port, timeout_s=5, secret=None)
        with pytest.raises(TransportError, match="did not accept"):
            SocketTransport(server.host, server.port, timeout_s=5, secret=b"x" * 32)
        # a raw peer sending a request without a tag, then one with a made-up tag
        for tail in (b"", b"\0" * 32):
            s = socket.create_connection((server.host, server.port), timeout=5)
            recv_frame(s)  # the greeting
            try:
                s.sendall(encode_frame({"op": "commit", "request_id": "x"}, _state("x").to_bytes()))
                s.sendall(tail)
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the server already hung up
            assert _hung_up(s)
            s.close()
        assert "x" not in made and server.stats()["auth_failures"] >= 1
    finally:
        server.shutdown()


def _recording_proxy(target: tuple[str, int], recorded: list[bytes]) -> tuple[int, Any]:
    """A TCP proxy on loopback to ``target`` that records what the client sends (someone on the
    wire); returns its port and a function that stops it."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()

    def pump(src: socket.socket, dst: socket.socket, record: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if record:
                    recorded.append(data)
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def accept() -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            upstream = socket.create_connection(target, timeout=5)
            for a, b, rec in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=pump, args=(a, b, rec), daemon=True).start()
        listener.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()

    def close() -> None:
        stop.set()
        thread.join(5)

    return listener.getsockname()[1], close


def test_recorded_frames_replayed_on_a_new_connection_are_refused() -> None:
    made: dict[str, MemTarget] = {}

    def make(rid: str) -> MemTarget:
        made[rid] = MemTarget()
        return made[rid]

    server = SocketServer(TargetHost(make).handle, secret=SECRET).start()
    recorded: list[bytes] = []
    port, close_proxy = _recording_proxy((server.host, server.port), recorded)
    try:
        with SocketTransport("127.0.0.1", port, timeout_s=5, secret=SECRET) as tr:
            RemoteTarget(tr, "a").commit(_state("a"))
        assert recorded and made["a"].committed
        del made["a"]
        s = socket.create_connection((server.host, server.port), timeout=5)
        recv_frame(s)
        with contextlib.suppress(OSError):
            s.sendall(b"".join(recorded))  # the handshake is bound to the old nonces: fails
            s.shutdown(socket.SHUT_WR)
        assert _hung_up(s)
        s.close()
        assert "a" not in made
    finally:
        close_proxy()
        server.shutdown()


def test_a_client_with_a_secret_refuses_a_server_without_one() -> None:
    server = SocketServer(_host().handle, secret=None).start()
    try:
        with pytest.raises(TransportError, match="does not authenticate"):
            SocketTransport(server.host, server.port, timeout_s=5, secret=SECRET)
    finally:
        server.shutdown()


def test_the_configured_secret_file_is_used_by_both_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "secret"
    path.write_bytes(SECRET)
    os.chmod(path, 0o644)
    monkeypatch.setenv("FASTCKPT_MIGRATE_SECRET_FILE", str(path))
    with pytest.raises(TransportError, match="readable or writable by others"):
        SocketServer(_host().handle)
    os.chmod(path, 0o600)
    server = SocketServer(_host().handle).start()
    try:
        assert server.stats()["accepted"] == 0
        with SocketTransport(server.host, server.port, timeout_s=5) as tr:
            assert tr.request({"op": "ping"})[0]["ok"] is True
        with pytest.raises(TransportError, match="requires a shared secret"):
            SocketTransport(server.host, server.port, timeout_s=5, secret=None)
    finally:
        server.shutdown()


def test_tcp_without_a_secret_is_refused_off_loopback() -> None:
    with pytest.raises(TransportError, match="unauthenticated"):
        SocketServer(_host().handle, "0.0.0.0", 0, secret=None)
    SocketServer(_host().handle, "0.0.0.0", 0, secret=None, insecure=True).shutdown()


# ------------------------------------------------------------------ Unix socket, peer credentials


def test_a_unix_socket_server_serves_its_own_user(tmp_path: Path) -> None:
    sock = str(tmp_path / "run" / "migrate.sock")
    server = SocketServer(_host().handle, unix=sock, secret=None).start()
    try:
        assert os.stat(os.path.dirname(sock)).st_mode & 0o777 == 0o700
        with SocketTransport.unix(sock, timeout_s=5, secret=None) as tr:
            assert RemoteTarget(tr, "u").prefill(_state("u")) == 3
    finally:
        server.shutdown()
    assert not os.path.exists(sock)


_AS_NOBODY = """
import json, socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
s.connect(sys.argv[1])
body = json.dumps({"op": "cancel", "request_id": "u"}).encode()
try:
    s.sendall(struct.pack("<II", len(body), 0) + body)
except OSError:
    pass
data = b""
while True:
    try:
        chunk = s.recv(65536)
    except OSError:
        break
    if not chunk:
        break
    data += chunk
print(json.dumps({"reply": data.decode("latin-1")}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")
def test_a_unix_socket_server_refuses_other_users_by_their_credentials() -> None:
    import pwd

    nobody = pwd.getpwnam("nobody")
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("no system python3 that another user can run")
    base = tempfile.mkdtemp(prefix="fastckpt-migrate-")
    os.chmod(base, 0o711)
    run = os.path.join(base, "run")
    os.mkdir(run, 0o711)
    sock = os.path.join(run, "sock")
    made: dict[str, MemTarget] = {}

    def make(rid: str) -> MemTarget:
        made[rid] = MemTarget()
        return made[rid]

    # reachable by everyone (mode 0666 with an allow list); only uid 4242 is allowed
    server = SocketServer(TargetHost(make).handle, unix=sock, secret=None, allow_uids={4242})
    server.start()

    def drop() -> None:
        os.setgroups([])
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)

    try:
        out = subprocess.run(
            [python, "-I", "-S", "-c", _AS_NOBODY, sock],
            preexec_fn=drop,
            capture_output=True,
            text=True,
            timeout=30,
            cwd="/",
            env={"PATH": "/usr/bin:/bin"},
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["reply"] == ""  # not even a greeting
        assert server.stats()["refused_peers"] == 1 and not made
    finally:
        server.shutdown()
        shutil.rmtree(base, ignore_errors=True)
