"""The request decoder: valid frames round-trip, everything else is a ProtocolError."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastckpt.serve import protocol
from fastckpt.serve.names import NameError_, check_name, resolve, split

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=40)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


def _frame(kind: int, payload: bytes, version: int = protocol.VERSION) -> bytes:
    return protocol.HEADER.pack(protocol.MAGIC, version, kind, len(payload)) + payload


def _decode(frame: bytes) -> protocol.Message | None:
    try:
        return protocol.decode_request(frame)
    except protocol.ProtocolError:
        return None


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_random_bytes_never_crash_the_decoder(data: bytes) -> None:
    _decode(data)
    _decode(_frame(protocol.GET, data))


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from([*sorted(protocol.KIND_NAMES), 0, 8, 99, 65535]),
    fields=st.dictionaries(st.sampled_from(["root", "name", "identity", "x"]), json_values),
)
def test_structured_garbage_is_accepted_only_when_it_fits_the_schema(
    kind: int, fields: dict[str, Any]
) -> None:
    try:
        payload = json.dumps(fields).encode()
    except ValueError:
        return
    msg = _decode(_frame(kind, payload))
    if msg is None:
        return
    schema = protocol.REQUEST_FIELDS[kind]
    assert set(msg.fields) == set(schema)
    for key, typ in schema.items():
        assert type(msg.fields[key]) is typ


@given(
    root=st.integers(0, 2**40),
    name=st.text(min_size=1, max_size=100).filter(lambda s: "\0" not in s),
    identity=st.text(min_size=1, max_size=64).filter(lambda s: "\0" not in s),
)
def test_valid_requests_round_trip(root: int, name: str, identity: str) -> None:
    fields = {"root": root, "name": name, "identity": identity}
    msg = protocol.decode_request(protocol.encode(protocol.GET, fields))
    assert msg.kind == protocol.GET and msg.fields == fields


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        (b"FCKX" + _frame(protocol.HELLO, b"{}")[4:], "magic"),
        (_frame(protocol.HELLO, b"{}", version=2), "version"),
        (_frame(77, b"{}"), "kind"),
        (_frame(protocol.OK, b"{}"), "not a request"),
        (
            protocol.HEADER.pack(protocol.MAGIC, 1, protocol.HELLO, protocol.MAX_PAYLOAD + 1),
            "limit",
        ),
        (_frame(protocol.HELLO, b"[]"), "object"),
        (_frame(protocol.HELLO, b'{"a":1,"a":2}'), "duplicate"),
        (_frame(protocol.HELLO, b'{"a":NaN}'), "NaN"),
        (_frame(protocol.HELLO, b"\xff\xfe"), "JSON"),
        (_frame(protocol.HELLO, b"[" * 5000 + b"]" * 5000), "JSON"),
        (_frame(protocol.HELLO, b'{"x":1}'), "unexpected keys"),
        (_frame(protocol.GET, b'{"root":0,"name":"a","identity":1}'), "identity"),
        (_frame(protocol.GET, b'{"root":true,"name":"a","identity":"x"}'), "root"),
        (_frame(protocol.GET, b'{"root":0,"name":"","identity":"x"}'), "name"),
        (_frame(protocol.GET, b'{"root":0,"name":"a\\u0000","identity":"x"}'), "name"),
        (_frame(protocol.GET, b'{"root":0,"name":"' + b"a" * 5000 + b'","identity":"x"}'), "name"),
    ],
)
def test_malformed_requests_are_refused_with_a_reason(frame: bytes, why: str) -> None:
    with pytest.raises(protocol.ProtocolError, match=why):
        protocol.decode_request(frame)


def test_reader_refuses_descriptors_on_the_daemon_side() -> None:
    import os

    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        socket.send_fds(a, [protocol.encode(protocol.HELLO)], [r])
        with pytest.raises(protocol.ProtocolError, match="descriptors"):
            protocol.Reader(b, accept_fds=False).read()
        a.close()
        b.close()
        a, b = socket.socketpair()
        protocol.send(a, protocol.FDS, {"first": 0, "count": 1}, [w])
        msg = protocol.Reader(b, accept_fds=True).read()
        assert msg.kind == protocol.FDS and len(msg.fds) == 1
        protocol.close_fds(msg.fds)
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


@pytest.mark.parametrize("name", ["", "/abs", "..", "a/../b", "./a", "a//b", "a/", "a\0b"])
def test_bad_names(name: str) -> None:
    with pytest.raises(NameError_):
        check_name(name)


def test_resolve_refuses_symlinks_leaving_the_root(tmp_path: Any) -> None:
    root = tmp_path / "root"
    (root / "m").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "escape").symlink_to(tmp_path / "outside")
    (root / "inner").symlink_to(root / "m")
    real = str(root.resolve())
    assert resolve(real, "m") == str((root / "m").resolve())
    assert resolve(real, "inner") == str((root / "m").resolve())
    with pytest.raises(NameError_):
        resolve(real, "escape")
    assert split([real], root / "m") == (0, "m")
    assert split([real], tmp_path / "outside") is None
    assert split([real], root) is None
