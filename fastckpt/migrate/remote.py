"""A target in another process: the host that serves targets, and the driver's proxy to one.

``TargetHost`` turns transport messages into calls on the targets of one engine (one target per
request id, created on the first ``prefill``) and enforces the lease: a target that has not
committed and hears nothing about its request for ``lease_s`` seconds is expired (freed); later
calls for that request raise ``LeaseExpiredError``. ``RemoteTarget`` implements
``MigrationTarget`` over any ``Transport``, so the driver does not know the target is remote.

Messages (header ``op``; a token state travels as the payload)::

    prefill  {request_id} + state   -> {covered}
    commit   {request_id} + state   -> {}
    abort    {request_id}           -> {aborted}
    cancel   {request_id}           -> {}                  (stop a committed generation)
    status   {request_id}           -> {status, covered}   (unknown/prefilling/committed/
                                                            finished/failed/aborted/expired)
    result   {request_id, timeout_s}-> {tokens: [[index, id], ...], finished, finish_reason}
                                       (+ error: why, when the generation failed)
    stats    {}                     -> {reserved, committed, expired}
    ping     {}                     -> {}

Finished targets are dropped a lease after they finish (their status stays ``finished``). A
committed target whose generation fails (a decode error) finishes with ``finish_reason``
``error``, status ``failed`` and the reason in ``error``; it frees its KV cache at once and is
dropped a lease later, like a finished one. ``result`` waits at most ``MAX_RESULT_WAIT_S``.

Every reply has ``ok``; a failure reply carries ``error`` (the exception class name) and
``message``, which ``RemoteTarget`` raises again as the same fastckpt class where it knows it.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from fastckpt.migrate import errors as _errors
from fastckpt.migrate.errors import LeaseExpiredError, RemoteError, TargetStateError
from fastckpt.migrate.protocol import MigrationTarget
from fastckpt.migrate.state import TokenState
from fastckpt.migrate.transport import Message, Transport

DEFAULT_LEASE_S = 30.0
MAX_RESULT_WAIT_S = 600.0
DONE = ("finished", "failed")  # statuses of a generation that ended


class HostedTarget(MigrationTarget, Protocol):
    """A ``MigrationTarget`` that a ``TargetHost`` can also expire and query."""

    @property
    def committed(self) -> bool: ...

    @property
    def covered(self) -> int: ...

    def expire(self) -> None: ...

    def status(self) -> str: ...

    def result(self, timeout_s: float | None) -> dict[str, Any]: ...


class TargetHost:
    """Serves the targets of one engine; ``handle`` is a transport handler."""

    MAX_RECORDS = 100_000

    def __init__(
        self,
        make_target: Callable[[str], HostedTarget],
        *,
        lease_s: float = DEFAULT_LEASE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if lease_s <= 0:
            raise ValueError(f"lease_s must be > 0, got {lease_s}")
        self._make = make_target
        self.lease_s = lease_s
        self._clock = clock
        self._lock = threading.Lock()
        self._targets: dict[str, HostedTarget] = {}
        self._seen: dict[str, float] = {}
        # ids of expired requests and (with their final status) of dropped ended ones, oldest
        # first, at most MAX_RECORDS each
        self._expired: OrderedDict[str, None] = OrderedDict()
        self._finished: OrderedDict[str, str] = OrderedDict()
        self._done_since: dict[str, float] = {}  # when the reaper first saw a target finished
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None

    # --- lease -------------------------------------------------------------------------------

    def start_reaper(self, period_s: float | None = None) -> TargetHost:
        period = period_s if period_s is not None else min(self.lease_s / 4, 1.0)

        def loop() -> None:
            while not self._stop.wait(period):
                self.expire_due()

        self._reaper = threading.Thread(target=loop, name="migrate-lease-reaper", daemon=True)
        self._reaper.start()
        return self

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the reaper and every hosted target: uncommitted ones are aborted, committed ones
        cancelled (where the target can be), and their decode threads waited for, so that a
        server process exits with no generation still running on a thread."""
        self._stop.set()
        with self._lock:
            targets = list(self._targets.values())
        for t in targets:
            if t.committed:
                cancel = getattr(t, "cancel", None)
                if cancel is not None:
                    cancel()
            else:
                t.abort()
            t.result(timeout_s)

    def expire_due(self) -> list[str]:
        """Expire every uncommitted target silent for longer than the lease; returns their ids.

        A target whose generation finished is dropped once it has been finished, and silent, for
        a lease (its status stays ``finished``; its tokens can no longer be fetched)."""
        now = self._clock()
        with self._lock:
            silent = [rid for rid in self._targets if now - self._seen[rid] > self.lease_s]
            due = [rid for rid in silent if not self._targets[rid].committed]
            done = []
            for rid, t in self._targets.items():
                if t.committed and (status := t.status()) in DONE:
                    since = self._done_since.setdefault(rid, now)
                    if now - since > self.lease_s and rid in silent:
                        done.append((rid, status))
            victims = [(rid, self._targets.pop(rid)) for rid in due]
            for rid in due:
                self._seen.pop(rid, None)
                self._expired[rid] = None
            for rid, status in done:
                self._targets.pop(rid)
                self._seen.pop(rid, None)
                self._done_since.pop(rid, None)
                self._finished[rid] = status
            for record in (self._expired, self._finished):
                while len(record) > self.MAX_RECORDS:
                    record.popitem(last=False)
        for _, t in victims:
            t.expire()
        return due

    # --- operations --------------------------------------------------------------------------

    def _get(self, rid: str, *, create: bool) -> HostedTarget | None:
        with self._lock:
            if rid in self._expired:
                raise LeaseExpiredError(
                    f"request {rid!r}: no word from the source for more than {self.lease_s} s; "
                    "the target freed it"
                )
            t = self._targets.get(rid)
            if t is None and create:
                t = self._make(rid)
                self._targets[rid] = t
            if t is not None:
                self._seen[rid] = self._clock()
            return t

    def _state(self, header: dict[str, Any], payload: bytes) -> tuple[HostedTarget, TokenState]:
        state = TokenState.from_bytes(payload)
        if state.request_id != header.get("request_id"):
            raise TargetStateError(
                f"message for request {header.get('request_id')!r} carries the state of "
                f"{state.request_id!r}"
            )
        t = self._get(state.request_id, create=True)
        assert t is not None
        return t, state

    def stats(self) -> dict[str, int]:
        with self._lock:
            committed = sum(1 for t in self._targets.values() if t.committed)
            return {
                "reserved": len(self._targets) - committed,
                "committed": committed,
                "expired": len(self._expired),
            }

    def handle(self, header: dict[str, Any], payload: bytes) -> Message:
        try:
            return {"ok": True, **self._dispatch(header, payload)}, b""
        except Exception as e:
            return {"ok": False, "error": type(e).__name__, "message": str(e)}, b""

    def _dispatch(self, header: dict[str, Any], payload: bytes) -> dict[str, Any]:
        op = header.get("op")
        rid = header.get("request_id")
        if op == "ping":
            return {}
        if op == "stats":
            return dict(self.stats())
        if op in ("prefill", "commit"):
            t, state = self._state(header, payload)
            if op == "prefill":
                return {"covered": t.prefill(state)}
            t.commit(state)
            return {}
        if not isinstance(rid, str):
            raise TargetStateError(f"op {op!r} needs a request_id string")
        if op == "abort":
            try:
                held = self._get(rid, create=False)
            except LeaseExpiredError:
                return {"aborted": True}  # already freed
            if held is None:
                return {"aborted": True}
            aborted = held.abort()
            if aborted:
                with self._lock:
                    self._targets.pop(rid, None)
                    self._seen.pop(rid, None)
            return {"aborted": aborted}
        if op == "status":
            with self._lock:
                if rid in self._expired:
                    return {"status": "expired", "covered": 0}
                if rid in self._finished:
                    return {"status": self._finished[rid], "covered": 0}
                known = self._targets.get(rid)
            if known is None:
                return {"status": "unknown", "covered": 0}
            return {"status": known.status(), "covered": known.covered}
        if op == "cancel":
            found = self._get(rid, create=False)
            cancel = getattr(found, "cancel", None)
            if cancel is None:
                raise TargetStateError(f"no target for request {rid!r} that can be cancelled")
            cancel()
            return {}
        if op == "result":
            found = self._get(rid, create=False)
            if found is None:
                if rid in self._finished:
                    raise TargetStateError(
                        f"request {rid!r} finished and its tokens were dropped after the lease"
                    )
                raise TargetStateError(f"no target for request {rid!r}")
            return found.result(_wait_s(header.get("timeout_s")))
        raise TargetStateError(f"unknown op {op!r}")


def _wait_s(raw: Any) -> float:
    """A ``result`` wait from the wire: a number in [0, MAX_RESULT_WAIT_S] (None: the most)."""
    if raw is None:
        return MAX_RESULT_WAIT_S
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not raw >= 0:
        raise TargetStateError(f"timeout_s must be a non-negative number, got {raw!r}")
    return min(float(raw), MAX_RESULT_WAIT_S)


_KNOWN = {
    name: getattr(_errors, name)
    for name in (
        "LeaseExpiredError",
        "ModelMismatchError",
        "TargetStateError",
        "TokenStateChecksumError",
        "TokenStateError",
        "TokenStateVersionError",
    )
}


def _raise_remote(reply: dict[str, Any]) -> None:
    kind = str(reply.get("error", "Error"))
    message = str(reply.get("message", ""))
    cls = _KNOWN.get(kind)
    if cls is not None:
        raise cls(message)
    raise RemoteError(kind, message)


class RemoteTarget:
    """``MigrationTarget`` for request ``request_id`` on a ``TargetHost`` behind ``transport``."""

    def __init__(self, transport: Transport, request_id: str) -> None:
        self.transport = transport
        self.request_id = request_id

    def _call(self, op: str, payload: bytes = b"", **extra: Any) -> dict[str, Any]:
        reply, _ = self.transport.request(
            {"op": op, "request_id": self.request_id, **extra}, payload
        )
        if not reply.get("ok"):
            _raise_remote(reply)
        return reply

    def _check(self, state: TokenState) -> bytes:
        if state.request_id != self.request_id:
            raise TargetStateError(
                f"target for {self.request_id!r} was handed the state of {state.request_id!r}"
            )
        return state.to_bytes()

    def prefill(self, state: TokenState) -> int:
        return int(self._call("prefill", self._check(state))["covered"])

    def commit(self, state: TokenState) -> None:
        self._call("commit", self._check(state))

    def abort(self) -> bool:
        return bool(self._call("abort")["aborted"])

    def status(self) -> dict[str, Any]:
        r = self._call("status")
        return {"status": r["status"], "covered": r["covered"]}

    def cancel(self) -> None:
        """Stop the committed generation on the target (the client went away)."""
        self._call("cancel")

    def result(self, timeout_s: float | None = None) -> dict[str, Any]:
        """Tokens so far, whether the generation ended and why; ``error`` too when it failed
        on the target (``finish_reason`` ``error``)."""
        r = self._call("result", timeout_s=timeout_s)
        keys = ("tokens", "finished", "finish_reason", *(("error",) if "error" in r else ()))
        return {k: r[k] for k in keys}


__all__ = ["DEFAULT_LEASE_S", "HostedTarget", "RemoteTarget", "TargetHost"]
