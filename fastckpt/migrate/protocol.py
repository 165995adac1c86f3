"""What an engine implements to take part in a migration: one source and one target per request.

Both are ``typing.Protocol`` classes: an engine needs no fastckpt base class, only these methods.
``fastckpt.migrate.reference`` implements both over a transformers causal LM and is the worked
example.

Source side (the engine that is decoding the request now)::

    snapshot()  -> TokenState   the state at the latest step boundary; decoding goes on
    freeze()    -> TokenState   stop at the next step boundary and return that state
    unfreeze()                  roll back: decode on as if no migration had been tried
    release()                   the target committed: free the request, never emit for it again

Target side (the engine that will continue it)::

    prefill(state) -> int       prefill the tokens of ``state`` it has not seen yet (the first
                                call reserves room, checks the model fingerprint); returns how
                                many tokens its cache now covers
    commit(state)               ``state`` is the frozen final state: prefill what is left, take
                                over the request and emit its undelivered tokens and the rest.
                                Idempotent: the same state again is a no-op; another state after
                                a commit is an error.
    abort() -> bool             free what it reserved; True when it aborted (or held nothing),
                                False when it had already committed (then nothing changes).
                                Idempotent.

A target that hears nothing from its source for longer than its lease frees what it reserved on
its own (the source is lost); later calls raise ``LeaseExpiredError``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from fastckpt.migrate.state import TokenState


@runtime_checkable
class MigrationSource(Protocol):
    def snapshot(self) -> TokenState: ...

    def freeze(self) -> TokenState: ...

    def unfreeze(self) -> None: ...

    def release(self) -> None: ...


@runtime_checkable
class MigrationTarget(Protocol):
    def prefill(self, state: TokenState) -> int: ...

    def commit(self, state: TokenState) -> None: ...

    def abort(self) -> bool: ...


__all__ = ["MigrationSource", "MigrationTarget"]
