"""The migration host among hostile peers: slow, idle, garbage, oversize and disconnecting ones,
bounded in number and time, beside a well-behaved driver that must keep being served within its
timeout; and every message kind fuzzed through hypothesis, in-process and on a live socket.

The server has a 1 s request deadline and no model (``MemTarget``), so the file takes seconds.
Future changes to the transport or the host run these."""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from typing import Any

import pytest
from hostile_peers import Frames, hostile_peers, hung_up, trickle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from migrate_helpers import MemTarget

from fastckpt.migrate import (
    RemoteTarget,
    SamplingParams,
    SocketServer,
    SocketTransport,
    StopCriteria,
    TargetHost,
    TokenState,
)
from fastckpt.migrate.transport import FRAME, encode_frame, recv_frame

DEADLINE_S = 1.0
SECRET = b"hostile-peers-test-secret-0123456789"
OPS = ["prefill", "commit", "abort", "cancel", "status", "result", "stats", "ping"]


@pytest.fixture(autouse=True)
def _no_configured_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FASTCKPT_MIGRATE_SECRET_FILE", raising=False)


def _state(rid: str, n: int = 3) -> TokenState:
    return TokenState(
        request_id=rid,
        model_fingerprint="m",
        prompt_ids=tuple(range(1, n + 1)),
        generated_ids=(),
        sampling=SamplingParams(),
        stop=StopCriteria(max_new_tokens=4),
    )


def _server(secret: bytes | None, **kw: Any) -> SocketServer:
    host = TargetHost(lambda rid: MemTarget(), lease_s=30.0)
    return SocketServer(
        host.handle, secret=secret, idle_timeout_s=DEADLINE_S, max_connections=24, **kw
    ).start()


def _connect(server: SocketServer) -> socket.socket:
    s = socket.create_connection((server.host, server.port), timeout=5)
    return s


def test_a_trickling_peer_is_dropped_at_its_request_deadline() -> None:
    server = _server(None)
    try:

        def connect() -> socket.socket:
            s = _connect(server)
            recv_frame(s)  # the greeting
            return s

        sent = trickle(connect, encode_frame({"op": "ping", "pad": "x" * 2000}))
        assert 0 <= sent < 60, f"still listening after {sent} trickled bytes"
    finally:
        server.shutdown()


def _frames() -> Frames:
    commit = encode_frame({"op": "commit", "request_id": "d"}, _state("d").to_bytes())
    return Frames(
        slow=encode_frame({"op": "ping", "pad": "y" * 300}),
        oversize=FRAME.pack(1 << 30, 1 << 30) + b"{" * 65536,
        partial=commit,
    )


@pytest.mark.parametrize("secret", [None, SECRET], ids=["no-secret", "hmac"])
def test_a_well_behaved_driver_is_served_among_hostile_peers(secret: bytes | None) -> None:
    server = _server(secret)
    peers = hostile_peers(lambda: _connect(server), _frames(), deadline_s=DEADLINE_S, seed=5)
    with peers, SocketTransport(server.host, server.port, timeout_s=2.0, secret=secret) as tr:
        for i in range(12):
            rid = f"good-{i}"
            t = RemoteTarget(tr, rid)
            assert t.prefill(_state(rid)) == 3
            t.commit(_state(rid))
            assert t.status()["status"] == "committed"
            assert t.result(timeout_s=1)["finished"] is True
            time.sleep(0.05)
    deadline = time.monotonic() + 10
    while (s := server.stats())["open_connections"] > 0 or s["threads"] > 0:
        assert time.monotonic() < deadline, s
        time.sleep(0.05)
    assert s["dropped"] > 0 and s["accepted"] > 12
    server.shutdown()


# ------------------------------------------------------------------ every message kind, fuzzed

_anything = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 70), 1 << 70)
    | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
_rids = st.one_of(st.sampled_from(["r", "s", ""]), st.text(max_size=10), _anything)
_payloads = st.one_of(
    st.just(b""),
    st.binary(max_size=200),
    st.sampled_from(["r", "s"]).map(lambda rid: _state(rid).to_bytes()),
    st.tuples(st.sampled_from(["r", "s"]), st.integers(0, 40), st.integers(0, 255)).map(
        lambda t: _flip(_state(t[0]).to_bytes(), t[1], t[2])
    ),
)


def _flip(data: bytes, at: int, value: int) -> bytes:
    raw = bytearray(data)
    raw[at % len(raw)] = value
    return bytes(raw)


headers = st.builds(
    lambda op, rid, extra, keep: {
        **({"op": op} if keep & 1 else {}),
        **({"request_id": rid} if keep & 2 else {}),
        **extra,
    },
    st.one_of(st.sampled_from(OPS), _anything),
    _rids,
    st.dictionaries(st.sampled_from(["timeout_s", "x", "op"]), _anything, max_size=2),
    st.integers(0, 3),
)


def test_every_message_kind_fuzzed_against_the_host() -> None:
    """Any header and payload: the host answers ``ok`` true or a failure reply naming an error,
    never raises, and its stats stay consistent."""
    host = TargetHost(lambda rid: MemTarget(), lease_s=30.0)

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(headers, _payloads)
    def run(header: dict[str, Any], payload: bytes) -> None:
        reply, out = host.handle(header, payload)
        assert isinstance(reply.get("ok"), bool) and out == b""
        if not reply["ok"]:
            assert isinstance(reply["error"], str) and isinstance(reply["message"], str)
        stats = host.stats()
        assert all(v >= 0 for v in stats.values())

    run()


def test_every_message_kind_fuzzed_against_a_live_server() -> None:
    """Frames of every kind, several on one signed connection or raw on an unsigned one: the
    server answers or hangs up, never dies, and a driver is served afterwards."""
    server = _server(SECRET)
    plain = _server(None)
    try:

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.lists(st.tuples(headers, _payloads), min_size=1, max_size=4), st.booleans())
        def run(batch: list[tuple[dict[str, Any], bytes]], signed: bool) -> None:
            if signed:
                with SocketTransport(server.host, server.port, timeout_s=5, secret=SECRET) as tr:
                    for header, payload in batch:
                        with contextlib.suppress(ValueError):  # NaN is refused by encode
                            reply, _ = tr.request(header, payload)
                            assert isinstance(reply.get("ok"), bool)
                return
            s = _connect(plain)
            try:
                recv_frame(s)
                for header, payload in batch:
                    try:
                        s.sendall(encode_frame(header, payload))
                    except (ValueError, OSError):
                        return
                    s.settimeout(5)
                    try:
                        reply, _ = recv_frame(s)
                    except OSError:
                        return
                    assert isinstance(reply.get("ok"), bool)
            finally:
                s.close()

        run()
        for srv, secret in ((server, SECRET), (plain, None)):
            with SocketTransport(srv.host, srv.port, timeout_s=5, secret=secret) as tr:
                assert RemoteTarget(tr, "after").prefill(_state("after")) == 3
    finally:
        server.shutdown()
        plain.shutdown()


def test_a_frame_header_that_lies_about_its_length_is_dropped() -> None:
    server = _server(None)
    try:
        s = _connect(server)
        recv_frame(s)
        s.sendall(struct.pack("<II", 10, 0) + b"{}")
        s.shutdown(socket.SHUT_WR)
        assert hung_up(s, 5)
        s.close()
        with SocketTransport(server.host, server.port, timeout_s=5, secret=None) as tr:
            assert tr.request({"op": "ping"})[0]["ok"] is True
    finally:
        server.shutdown()
