"""The daemon among hostile peers: slow, idle, garbage, oversize and disconnecting ones, bounded
in number and time, beside a well-behaved client that must keep being served within its timeout;
and every request kind fuzzed through hypothesis against a live daemon.

The daemon runs on a thread of this process with a 1 s request deadline, so the whole file takes
seconds. Future changes to the daemon run these."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from hostile_peers import Frames, hostile_peers, trickle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastckpt.loader.api import load_via_server
from fastckpt.serve import protocol
from fastckpt.serve.client import Client

from .conftest import same, save_ckpt

DEADLINE_S = 1.0


def _connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    return s


def test_a_trickling_peer_is_closed_at_its_request_deadline(
    tmp_path: Path, inproc_daemon: Any
) -> None:
    """One byte every 0.2 s would take minutes to complete this frame; the deadline is per
    request, so the daemon hangs up after about DEADLINE_S, not after the frame."""
    root = tmp_path / "models"
    root.mkdir()
    d = inproc_daemon(str(root), idle_timeout_s=DEADLINE_S)
    frame = protocol.HEADER.pack(protocol.MAGIC, protocol.VERSION, protocol.HELLO, 2000)
    sent = trickle(lambda: _connect(d.socket), frame + b" " * 2000)  # 12 s of trickle at most
    assert 0 <= sent < 60, f"the daemon still listened after {sent} trickled bytes"


def _frames() -> Frames:
    hello = protocol.HEADER.pack(protocol.MAGIC, protocol.VERSION, protocol.HELLO, 500)
    get = protocol.HEADER.pack(protocol.MAGIC, protocol.VERSION, protocol.GET, 1 << 31)
    partial = protocol.encode(protocol.GET, {"root": 0, "name": "a", "identity": "0" * 32})
    return Frames(slow=hello + b" " * 500, oversize=get + b"{" * 65536, partial=partial)


def test_a_well_behaved_client_is_served_among_hostile_peers(
    tmp_path: Path, inproc_daemon: Any
) -> None:
    root = tmp_path / "models"
    sd = save_ckpt(root / "a", seed=100)
    d = inproc_daemon(str(root), idle_timeout_s=DEADLINE_S, max_connections=24)
    with hostile_peers(lambda: _connect(d.socket), _frames(), deadline_s=DEADLINE_S, seed=1):
        for _ in range(8):
            got, st = load_via_server(root / "a", stats=True, server=d.socket, timeout_s=2.0)
            assert st.path_taken == "daemon" and same(got, sd)
            del got
            time.sleep(0.1)
    deadline = time.monotonic() + 10
    while True:
        with Client(d.socket, timeout_s=5) as c:
            s = c.stats()
        if s["open_connections"] <= 1 and s["pinned_items"] == 0:
            break
        assert time.monotonic() < deadline, s
        time.sleep(0.1)
    assert s["protocol_errors"] > 0 and s["used_bytes"] <= s["capacity_bytes"]
    assert d.thread.is_alive()


# ------------------------------------------------------------------ every request kind, fuzzed

_values = st.one_of(
    st.integers(-(1 << 70), 1 << 70),
    st.text(max_size=50),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
_names = st.one_of(
    st.sampled_from(["a", "a/", "./a", "../a", "/a", "a/../a", "a\x00", "", "b", "a/partition"]),
    st.text(max_size=40),
)


def _fields(kind: int) -> st.SearchStrategy[dict[str, Any]]:
    schema = protocol.REQUEST_FIELDS[kind]
    typed = {
        k: (st.integers(0, 3) if t is int else st.one_of(_names, st.text(max_size=64)))
        for k, t in schema.items()
    }
    well_formed = st.fixed_dictionaries(typed)
    mutated = st.builds(
        lambda base, drop, extra: {
            **{k: v for k, v in base.items() if k not in drop},
            **extra,
        },
        well_formed,
        st.sets(st.sampled_from(sorted(schema) or ["-"])),
        st.dictionaries(st.sampled_from([*schema, "x", "root", "name"]), _values, max_size=2),
    )
    return st.one_of(well_formed, mutated)


requests = st.sampled_from(sorted(protocol.REQUEST_FIELDS)).flatmap(
    lambda kind: st.tuples(st.just(kind), _fields(kind), st.integers(0, 2))
)


def test_every_request_kind_fuzzed_against_a_live_daemon(
    tmp_path: Path, inproc_daemon: Any
) -> None:
    """Well-formed and mutated requests of every kind, several on one connection, then the
    connection dropped at once or after a reply: the daemon answers or hangs up, never dies,
    keeps its budget, and holds no pin once the connections are gone."""
    root = tmp_path / "models"
    sd = save_ckpt(root / "a", seed=101)
    save_ckpt(root / "b", seed=102)
    d = inproc_daemon(str(root), idle_timeout_s=DEADLINE_S, dram_budget_bytes=3 << 20)

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(requests, min_size=1, max_size=4))
    def run(batch: list[tuple[int, dict[str, Any], int]]) -> None:
        s = _connect(d.socket)
        reader = protocol.Reader(s, accept_fds=True)
        try:
            for kind, fields, wait in batch:
                try:
                    s.sendall(protocol.encode(kind, fields))
                except (OSError, protocol.ProtocolError):
                    return
                if wait == 0:
                    continue  # pipelined: the next request goes out before the answer
                while True:
                    try:
                        msg = reader.read()
                    except (OSError, protocol.ProtocolError):
                        return  # the daemon hung up on a malformed request
                    protocol.close_fds(msg.fds)
                    if msg.kind in (protocol.OK, protocol.ERROR):
                        break
        finally:
            s.close()
        assert d.thread.is_alive()

    run()
    deadline = time.monotonic() + 10
    while True:
        with Client(d.socket, timeout_s=5) as c:
            s = c.stats()
        if s["pinned_items"] == 0 and s["open_connections"] <= 1:
            break
        assert time.monotonic() < deadline, s
        time.sleep(0.05)
    assert s["used_bytes"] <= s["capacity_bytes"]
    got = load_via_server(root / "a", server=d.socket, timeout_s=5)
    assert got is not None and same(got, sd)
    assert os.path.exists(d.socket)
