"""Transport framing, the target host (lease, dispatch) and the remote proxy, without a model."""

from __future__ import annotations

import socket
import struct
from typing import Any

import pytest
from migrate_helpers import MemTarget

from fastckpt.migrate import (
    LeaseExpiredError,
    ModelMismatchError,
    RemoteError,
    RemoteTarget,
    SamplingParams,
    SocketServer,
    SocketTransport,
    StopCriteria,
    TargetHost,
    TargetStateError,
    TokenState,
    TransportError,
)
from fastckpt.migrate.transport import MAX_HEADER_BYTES, encode_frame, recv_frame


def _state(rid: str = "r", n: int = 3, fp: str = "m") -> TokenState:
    return TokenState(
        request_id=rid,
        model_fingerprint=fp,
        prompt_ids=tuple(range(1, n + 1)),
        generated_ids=(),
        sampling=SamplingParams(),
        stop=StopCriteria(max_new_tokens=4),
    )


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def host_and_clock() -> tuple[TargetHost, Clock, dict[str, MemTarget]]:
    made: dict[str, MemTarget] = {}
    clock = Clock()

    def make(rid: str) -> MemTarget:
        made[rid] = MemTarget()
        return made[rid]

    return TargetHost(make, lease_s=5.0, clock=clock), clock, made


class Direct:
    """A Transport that calls a handler in-process (the seam an engine's own RPC would use)."""

    def __init__(self, handler: Any) -> None:
        self.handler = handler

    def request(self, header: dict[str, Any], payload: bytes = b"") -> tuple[dict[str, Any], bytes]:
        return self.handler(header, payload)

    def close(self) -> None:
        pass


def test_lease_expires_silent_uncommitted_targets(host_and_clock: Any) -> None:
    host, clock, made = host_and_clock
    a, b = RemoteTarget(Direct(host.handle), "a"), RemoteTarget(Direct(host.handle), "b")
    assert a.prefill(_state("a")) == 3 and b.prefill(_state("b")) == 3
    b.commit(_state("b"))
    clock.now = 4.0
    a.prefill(_state("a", 5))  # renews the lease
    clock.now = 8.9
    assert host.expire_due() == []
    clock.now = 9.1
    assert host.expire_due() == ["a"]  # the committed one stays
    assert made["a"].freed and not made["b"].freed
    assert a.status() == {"status": "expired", "covered": 0}
    assert host.stats() == {"reserved": 0, "committed": 1, "expired": 1}
    with pytest.raises(LeaseExpiredError):
        a.prefill(_state("a", 6))
    with pytest.raises(LeaseExpiredError):
        a.commit(_state("a", 6))
    assert a.abort() is True  # nothing held any more: abort is a no-op


def test_finished_targets_are_dropped_a_lease_after_they_finish(host_and_clock: Any) -> None:
    host, clock, made = host_and_clock
    t = RemoteTarget(Direct(host.handle), "f")
    t.commit(_state("f"))
    clock.now = 100.0  # long after the commit: still running, so kept
    host.expire_due()
    assert t.status()["status"] == "committed"
    made["f"]._status = "finished"
    clock.now = 200.0
    host.expire_due()  # first seen finished now
    assert t.result()["finished"]
    clock.now = 204.0
    host.expire_due()
    assert host.stats()["committed"] == 1
    clock.now = 210.0
    host.expire_due()
    assert host.stats()["committed"] == 0
    assert t.status() == {"status": "finished", "covered": 0}
    with pytest.raises(TargetStateError, match="dropped after the lease"):
        t.result()


def test_dispatch_and_error_mapping(host_and_clock: Any) -> None:
    host, _, made = host_and_clock
    t = RemoteTarget(Direct(host.handle), "r")
    assert t.status()["status"] == "unknown"
    assert t.abort() is True  # nothing reserved
    with pytest.raises(ModelMismatchError):
        t.prefill(_state(fp="other"))
    with pytest.raises(RemoteError, match="ZeroDivisionError: engine blew up") as e:
        t.prefill(_state().replace(prompt_ids=(0, 1)))
    assert e.value.kind == "ZeroDivisionError"
    t.prefill(_state())
    t.commit(_state())
    t.commit(_state())  # idempotent
    with pytest.raises(TargetStateError):
        t.commit(_state(n=4))
    assert t.abort() is False and not made["r"].freed
    assert t.result()["tokens"] == [[0, 5]]
    with pytest.raises(TargetStateError, match="handed the state"):
        t.prefill(_state("other"))
    reply, _ = host.handle({"op": "prefill", "request_id": "r"}, _state("other").to_bytes())
    assert reply["ok"] is False and "carries the state of 'other'" in reply["message"]
    reply, _ = host.handle({"op": "nope", "request_id": "r"}, b"")
    assert reply == {"ok": False, "error": "TargetStateError", "message": "unknown op 'nope'"}
    reply, _ = host.handle({"op": "prefill", "request_id": "r"}, b"garbage")
    assert reply["ok"] is False and reply["error"] == "TokenStateError"


def test_socket_round_trip(host_and_clock: Any) -> None:
    host, _, _ = host_and_clock
    server = SocketServer(host.handle).start()
    try:
        with SocketTransport(server.host, server.port, timeout_s=10) as tr:
            t = RemoteTarget(tr, "s")
            assert tr.request({"op": "ping"}) == ({"ok": True}, b"")
            assert t.prefill(_state("s", 40)) == 40
            with pytest.raises(ModelMismatchError):
                t.prefill(_state("s", 41, fp="x"))
            t.commit(_state("s", 40))
        with pytest.raises(TransportError, match="closed"):
            tr.request({"op": "ping"})
    finally:
        server.shutdown()
    with pytest.raises(TransportError, match="cannot connect"):
        SocketTransport(server.host, server.port, timeout_s=2)


def test_frames() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(encode_frame({"op": "x", "n": [1, 2]}, b"\x00\x01payload"))
        assert recv_frame(b) == ({"op": "x", "n": [1, 2]}, b"\x00\x01payload")
        a.sendall(struct.pack("<II", MAX_HEADER_BYTES + 1, 0))
        with pytest.raises(TransportError, match="exceeds"):
            recv_frame(b)
    a, b = socket.socketpair()
    with a, b:
        a.sendall(struct.pack("<II", 2, 0) + b"[]")
        with pytest.raises(TransportError, match="JSON object"):
            recv_frame(b)
        a.sendall(struct.pack("<II", 10, 0) + b"{}")
        a.close()
        with pytest.raises(TransportError, match="closed after 2 of 10"):
            recv_frame(b)


def test_a_malformed_frame_drops_only_that_connection(host_and_clock: Any) -> None:
    host, _, _ = host_and_clock
    server = SocketServer(host.handle).start()
    try:
        bad = socket.create_connection((server.host, server.port))
        assert recv_frame(bad)[0]["fastckpt_migrate"] == 1  # the greeting
        bad.sendall(struct.pack("<II", 3, 0) + b"{{{")
        assert bad.recv(1) == b""  # the server hung up
        bad.close()
        with SocketTransport(server.host, server.port, timeout_s=10) as tr:
            assert tr.request({"op": "stats"})[0]["ok"] is True
    finally:
        server.shutdown()


def test_lease_must_be_positive() -> None:
    with pytest.raises(ValueError, match="lease_s"):
        TargetHost(lambda rid: MemTarget(), lease_s=0)
