"""Errors of live migration. Every one is a ``fastckpt.errors.FastckptError``.

The token-state errors are also ``ValueError`` (bad input); transport failures are also
``ConnectionError`` so callers that already handle socket errors keep working.
"""

from __future__ import annotations

from fastckpt.errors import FastckptError


class MigrationError(FastckptError):
    """Base class of every error raised by ``fastckpt.migrate``."""


class TokenStateError(MigrationError, ValueError):
    """Serialised token state that cannot be decoded, or a field with an invalid value."""


class TokenStateChecksumError(TokenStateError):
    """The token state's body does not match its checksum: the bytes were corrupted."""


class TokenStateVersionError(TokenStateError):
    """The token state was written by a format version this reader does not understand."""


class ModelMismatchError(MigrationError, ValueError):
    """A token state was made for another model (its fingerprint differs from the target's)."""


class SourceStateError(MigrationError):
    """A source was asked for something its current state forbids (decode while frozen, ...)."""


class TargetStateError(MigrationError):
    """A target was asked for something its current state forbids (commit after abort, ...)."""


class LeaseExpiredError(TargetStateError):
    """The target freed a migration whose source went silent for longer than the lease."""


class RemoteError(MigrationError):
    """The far side of a transport reported a failure; ``kind`` names its exception class."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        self.message = message
        super().__init__(f"{kind}: {message}")

    def __reduce__(self):  # keep pickling working with two positional arguments
        return (type(self), (self.kind, self.message))


class TransportError(MigrationError, ConnectionError):
    """A message could not be sent or received (peer gone, timeout, malformed frame)."""


__all__ = [
    "LeaseExpiredError",
    "MigrationError",
    "ModelMismatchError",
    "RemoteError",
    "SourceStateError",
    "TargetStateError",
    "TokenStateChecksumError",
    "TokenStateError",
    "TokenStateVersionError",
    "TransportError",
]
