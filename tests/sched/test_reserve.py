"""Reservations of model starts: compare-and-set claims, expiry, and their effect on estimates."""

from __future__ import annotations

import pytest

from fastckpt.sched import Estimator, ModelSpec, SchedError, TierQueue, TierSpeed, make_server
from fastckpt.sched.reserve import Reservation, ReservationBook, apply_reservations, starting

GB = 10**9


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_two_claims_ranked_on_the_same_version_cannot_both_win() -> None:
    book = ReservationBook(ttl_s=2.0, clock=Clock())
    v = book.snapshot().version
    first = book.claim("r1", "a", "ssd", GB, version=v)
    second = book.claim("r1", "b", "ssd", GB, version=v)  # ranked before "a" was reserved
    assert first.ok and not second.ok
    assert "changed" in second.reason and second.version == first.version
    assert [r.model for r in second.reservations] == ["a"]
    third = book.claim("r2", "b", "ssd", GB, version=second.version)  # re-ranked: wins
    assert third.ok and book.claims == 2 and book.conflicts == 1


def test_a_model_is_reserved_once_and_reservations_expire() -> None:
    clock = Clock()
    book = ReservationBook(ttl_s=2.0, clock=clock)
    assert book.claim("r1", "a", "dram", GB, version=0).ok
    again = book.claim("r2", "a", "dram", GB, version=book.version)
    assert not again.ok and "a is starting" in again.reason
    assert starting(book.live(), "a") == ["r1"]
    clock.t += 2.0
    assert book.live() == () and book.claim("r2", "a", "dram", GB, version=book.version).ok
    assert book.release("r2", "a") and not book.release("r2", "a")
    with pytest.raises(SchedError):
        ReservationBook(ttl_s=0)


def test_reservations_queue_on_their_server_unless_its_report_shows_them() -> None:
    tiers = [TierSpeed("ssd", GB, 0.1), TierSpeed("remote", GB / 10, 0.5)]
    servers = [
        make_server(n, tiers, gpus=1, holds={"ssd": ["a", "b"]}, everywhere=["remote"], serial=True)
        for n in ("r1", "r2")
    ]
    res = [
        Reservation("r1", "a", "ssd", 2 * GB, 1e9),
        Reservation("r1", "c", "remote", GB, 1e9),
        Reservation("gone", "a", "ssd", GB, 1e9),  # a server no longer there: ignored
    ]
    out = apply_reservations(servers, res)
    assert out[0].queues == {"ssd": TierQueue(1, 2 * GB), "remote": TierQueue(1, GB)}
    assert out[1] == servers[1]
    # the start of b goes to r2 now: r1 first loads a (2.1 s) and c (10.5 s)
    assert Estimator().pick(out, ModelSpec("b", GB, gpus=0)).server == "r2"
    assert Estimator().pick(servers, ModelSpec("b", GB, gpus=0)).server == "r1"
    shown = apply_reservations(servers, res, visible={"r1": ["a", "c"]})
    assert shown == servers


def test_reservation_dicts_roundtrip() -> None:
    r = Reservation("r1", "a", "ssd", 5, 12.5, "proxy-1")
    assert Reservation.from_dict(r.as_dict()) == r
    with pytest.raises(SchedError, match="malformed reservation"):
        Reservation.from_dict({"server": "r1"})
