"""Short-lived reservations of model starts, so that routers deciding at the same time do not all
send their starts to the same server.

Routers rank servers on reported state, which is up to one reporting period old. During a burst
every router (one per proxy, and each routing task inside one) sees the same idle server as the
fastest place for its start, and all of them send their starts there; the loads then queue behind
each other while other servers stay idle. A reservation closes that window: a router that places
a start records it (server, model, tier, bytes) in a shared ``ReservationBook`` before routing,
and every router adds the reservations it finds to the servers' load queues
(``apply_reservations``) before ranking. A reservation lives ``ttl_s`` seconds, long enough for
the server's own report to show the load, and is ignored as soon as the report does.

The book is a compare-and-set register: ``claim`` succeeds only against the version the claimant
ranked on, so two routers that ranked on the same state cannot both claim; the loser re-ranks on
the winner's reservation. Pure Python; fastckpt.sched.ray_serve holds one in a named Ray actor
shared by every router of a deployment.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from fastckpt.sched.model import SchedError, Server, TierQueue

DEFAULT_TTL_S = 3.0


@dataclass(frozen=True)
class Reservation:
    """A start of ``model`` placed on ``server``, loading ``nbytes`` from ``tier``."""

    server: str
    model: str
    tier: str
    nbytes: int
    expires: float
    owner: str = ""

    def as_dict(self) -> dict[str, object]:
        return {
            "server": self.server,
            "model": self.model,
            "tier": self.tier,
            "nbytes": self.nbytes,
            "expires": self.expires,
            "owner": self.owner,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Reservation:
        try:
            return cls(
                str(data["server"]),
                str(data["model"]),
                str(data["tier"]),
                int(data["nbytes"]),  # type: ignore[call-overload]
                float(data["expires"]),  # type: ignore[arg-type]
                str(data.get("owner", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SchedError(f"malformed reservation {data!r}: {exc}") from None


@dataclass(frozen=True)
class Claim:
    """What ``claim`` answers: whether it was taken, the book's version and live reservations."""

    ok: bool
    version: int
    reservations: tuple[Reservation, ...]
    reason: str = ""


class ReservationBook:
    """Reservations of model starts with a version for compare-and-set (see the module doc).

    Args:
        ttl_s: how long a reservation lives.
        clock: seconds (default ``time.time``: the book may be shared by processes, and the
            expiry is the book's own clock, so only the book's process reads it).
    """

    def __init__(self, ttl_s: float = DEFAULT_TTL_S, clock: Callable[[], float] = time.time):
        if not ttl_s > 0:
            raise SchedError(f"reservation ttl_s must be > 0, got {ttl_s!r}")
        self.ttl_s = float(ttl_s)
        self._clock = clock
        self._items: dict[tuple[str, str], Reservation] = {}
        self.version = 0
        self.claims = 0
        self.conflicts = 0

    def _sweep(self) -> None:
        now = self._clock()
        dead = [k for k, r in self._items.items() if r.expires <= now]
        for k in dead:
            del self._items[k]
        if dead:
            self.version += 1

    def live(self) -> tuple[Reservation, ...]:
        """Reservations not yet expired, by (server, model)."""
        self._sweep()
        return tuple(self._items[k] for k in sorted(self._items))

    def snapshot(self) -> Claim:
        """The current version and live reservations (``ok`` is True)."""
        return Claim(True, self.version, self.live())

    def claim(
        self, server: str, model: str, tier: str, nbytes: int, *, version: int, owner: str = ""
    ) -> Claim:
        """Reserve a start of ``model`` on ``server`` if the book is still at ``version`` and no
        live reservation of ``model`` exists; otherwise answer the current state (``ok`` False)."""
        if nbytes < 0:
            raise SchedError(f"reservation of {model!r}: nbytes must be >= 0")
        self._sweep()
        if version != self.version:
            self.conflicts += 1
            return Claim(False, self.version, self.live(), "the book changed since the ranking")
        taken = [r for r in self._items.values() if r.model == model]
        if taken:
            self.conflicts += 1
            return Claim(False, self.version, self.live(), f"{model} is starting on {taken[0]}")
        self._items[(server, model)] = Reservation(
            server, model, tier, int(nbytes), self._clock() + self.ttl_s, owner
        )
        self.version += 1
        self.claims += 1
        return Claim(True, self.version, self.live())

    def release(self, server: str, model: str) -> bool:
        """Drop the reservation of ``model`` on ``server`` (its start is visible or went
        elsewhere); returns whether there was one."""
        if self._items.pop((server, model), None) is None:
            return False
        self.version += 1
        return True


def starting(reservations: Iterable[Reservation], model: str) -> list[str]:
    """Servers where a start of ``model`` is reserved (sorted)."""
    return sorted({r.server for r in reservations if r.model == model})


def apply_reservations(
    servers: Sequence[Server],
    reservations: Iterable[Reservation],
    visible: Mapping[str, Iterable[str]] | None = None,
) -> list[Server]:
    """``servers`` with each reservation added to its server's queue of its tier (one more load
    of its bytes), except reservations the server's own report already shows (``visible``:
    server -> models it reports loading, queued or resident) and those naming an unknown server
    or tier."""
    seen = {k: set(v) for k, v in (visible or {}).items()}
    extra: dict[str, dict[str, TierQueue]] = {}
    names = {s.name: s for s in servers}
    for r in reservations:
        srv = names.get(r.server)
        if srv is None or r.model in seen.get(r.server, ()):
            continue
        if r.tier not in {t.name for t in srv.tiers}:
            continue
        q = extra.setdefault(r.server, {}).get(r.tier, TierQueue())
        extra[r.server][r.tier] = TierQueue(q.loads + 1, q.nbytes + r.nbytes)
    out = []
    for s in servers:
        add = extra.get(s.name)
        if not add:
            out.append(s)
            continue
        queues = dict(s.queues)
        for tier, q in add.items():
            old = queues.get(tier, TierQueue())
            queues[tier] = TierQueue(old.loads + q.loads, old.nbytes + q.nbytes)
        out.append(replace(s, queues=queues))
    return out
