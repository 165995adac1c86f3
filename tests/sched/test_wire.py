"""Server state as plain JSON-able data (Ray Serve routing stats), without Ray."""

from __future__ import annotations

import json

import pytest

from fastckpt.sched import Instance, SchedError, TierQueue, TierSpeed, make_server
from fastckpt.sched.wire import server_from_dict, server_to_dict


def test_roundtrip_through_json() -> None:
    srv = make_server(
        "s1",
        [TierSpeed("dram", 2e10, 0.05), TierSpeed("remote", 1e9, 0.5)],
        gpus=4,
        holds={"dram": ["m1", "m2"]},
        queues={"dram": TierQueue(2, 10**10)},
        running=[Instance("i1", "m3", 2, 700)],
        everywhere=["remote"],
    )
    data = json.loads(json.dumps(server_to_dict(srv)))
    assert server_from_dict("s1", data) == srv
    assert data["free_gpus"] == 2


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([], "must be a mapping"),
        ({"gpus": 1}, "malformed state"),
        ({"gpus": 1, "tiers": [{"name": "dram"}]}, "malformed state"),
        ({"gpus": 1, "tiers": [{"name": "dram", "bandwidth_bps": 0}]}, "bandwidth_bps must be > 0"),
        ({"gpus": 1, "tiers": [], "holds": {"ssd": ["m"]}}, "unknown tiers"),
    ],
)
def test_malformed_state_names_the_server(data, match) -> None:
    with pytest.raises(SchedError, match=match) as exc:
        server_from_dict("replica-7", data)
    assert "replica-7" in str(exc.value) or "tier" in str(exc.value)


def test_serial_roundtrips_and_must_be_a_bool() -> None:
    srv = make_server("s", [TierSpeed("dram", 1e9)], gpus=1, serial=True)
    data = json.loads(json.dumps(server_to_dict(srv)))
    assert data["serial"] is True and server_from_dict("s", data) == srv
    assert server_from_dict("s", {**data, "extra": [1]}) == srv  # producers may add fields
    with pytest.raises(SchedError, match="serial must be true or false"):
        server_from_dict("s", {**data, "serial": "yes"})
