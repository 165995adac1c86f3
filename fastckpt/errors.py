"""Public exceptions. One failure, one error class; every error names where it happened.

``FormatError`` (a ``ValueError``) and its subclasses describe a checkpoint that is not valid.
I/O failures stay ``OSError`` with ``errno`` and ``filename`` set; a load that cannot run on the
requested device raises ``DeviceError``.
"""

from __future__ import annotations


class FastckptError(Exception):
    """Base class of every exception fastckpt raises on its own account."""


class FormatError(FastckptError, ValueError):
    """A checkpoint (index or partition) is malformed.

    Attributes name the file, the tensor (where one applies) and the byte offset (where one
    applies), so a caller can report exactly what is wrong without parsing the message.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        tensor: str | None = None,
        offset: int | None = None,
    ) -> None:
        self.path = path
        self.tensor = tensor
        self.offset = offset
        self.message = message
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.path is not None:
            where.append(f"file {self.path!r}")
        if self.tensor is not None:
            where.append(f"tensor {self.tensor!r}")
        if self.offset is not None:
            where.append(f"offset {self.offset}")
        return f"{self.message} ({', '.join(where)})" if where else self.message

    def __reduce__(self):  # keep pickling (multiprocessing) working with keyword-only args
        return (
            _rebuild_format_error,
            (type(self), self.message, self.path, self.tensor, self.offset),
        )


def _rebuild_format_error(
    cls: type[FormatError], message: str, path: str | None, tensor: str | None, offset: int | None
) -> FormatError:
    return cls(message, path=path, tensor=tensor, offset=offset)


class TruncatedError(FormatError):
    """A file is shorter than the index or header says it must be."""


class BadMagicError(FormatError):
    """The file does not start with the expected magic bytes: it is not this format."""


class UnsupportedVersionError(FormatError):
    """The checkpoint's major version is one this reader does not understand."""


class CorruptIndexError(FormatError):
    """The index could not be decoded, or a field has the wrong type or an invalid value."""


class LimitError(FormatError):
    """A size or count exceeds a limit (absurd sizes are refused before any allocation)."""


class OutOfBoundsError(FormatError):
    """A tensor's byte range lies outside its partition's data section."""


class OverlapError(FormatError):
    """Two tensors' byte ranges overlap."""


class UnsafePathError(FormatError):
    """A file name in the index would escape the checkpoint directory."""


class SymlinkLoopError(FormatError):
    """A file of the checkpoint is a symbolic link that loops (or nests too deeply)."""


class InvalidNameError(FormatError):
    """A tensor or alias name breaks the format's name rule (empty, not UTF-8)."""


class CorruptDataError(FormatError):
    """Tensor bytes break a rule of the format (a ``bool`` byte other than 0 or 1)."""


class MissingPartitionError(FormatError):
    """A partition file named by the index does not exist."""


class DtypeError(FormatError):
    """A dtype is unknown, unsupported by the installed torch, or inconsistent with nbytes/shape."""


class ChecksumError(FormatError):
    """A chunk's checksum does not match the index: the data is corrupted."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        tensor: str | None = None,
        offset: int | None = None,
        partition: int | None = None,
        expected: int | None = None,
        actual: int | None = None,
    ) -> None:
        self.partition = partition
        self.expected = expected
        self.actual = actual
        super().__init__(message, path=path, tensor=tensor, offset=offset)

    def __reduce__(self):
        return (
            _rebuild_checksum_error,
            (
                self.message,
                self.path,
                self.tensor,
                self.offset,
                self.partition,
                self.expected,
                self.actual,
            ),
        )


def _rebuild_checksum_error(
    message: str,
    path: str | None,
    tensor: str | None,
    offset: int | None,
    partition: int | None,
    expected: int | None,
    actual: int | None,
) -> ChecksumError:
    return ChecksumError(
        message,
        path=path,
        tensor=tensor,
        offset=offset,
        partition=partition,
        expected=expected,
        actual=actual,
    )


class SourceError(FormatError):
    """A conversion source is not something fastckpt can read (unknown layout, pickled objects)."""


class CacheWarning(RuntimeWarning):
    """Something the library keeps for later loads (an SSD-tier copy, a stored read-mode
    profile) could not be used or written; it is dropped and rebuilt, or the load reads the
    source instead. The load itself goes on."""


class DestinationExistsError(FastckptError, FileExistsError):
    """A conversion's destination exists and replacing it was not asked for."""


class DeviceError(FastckptError, ValueError):
    """The requested device or device map cannot be used (unknown, unavailable, unsupported)."""


class RemoteError(FastckptError, OSError):
    """An object store or HTTP server could not deliver a checkpoint's bytes (after the retries
    the settings allow). ``url`` names the object; ``errno`` says what kind of failure it was
    (``ETIMEDOUT``, ``ECONNRESET``, ``EIO``...)."""

    def __init__(self, err: int, message: str, url: str) -> None:
        super().__init__(err, message, url)
        self.url = url

    def __reduce__(self):
        return (type(self), (self.errno, self.strerror, self.url))


class RemoteAuthError(RemoteError, PermissionError):
    """The store refused the request's credentials (missing, expired, wrong, or not allowed on
    the bucket); the message names the bucket and where credentials are read from."""


class ObjectChangedError(RemoteError):
    """An object was replaced while it was being read (its ETag, version or size changed): no
    bytes of two generations are ever mixed; loads start again once from the new generation."""


class RemoteExtraMissing(FastckptError, ImportError):
    """Loading from ``s3://`` or ``https://`` needs the optional dependencies of
    the ``remote`` extra (``fastckpt-loader[remote]``)."""


__all__ = [
    "BadMagicError",
    "CacheWarning",
    "ChecksumError",
    "CorruptDataError",
    "CorruptIndexError",
    "DestinationExistsError",
    "DeviceError",
    "DtypeError",
    "FastckptError",
    "FormatError",
    "InvalidNameError",
    "LimitError",
    "MissingPartitionError",
    "ObjectChangedError",
    "OutOfBoundsError",
    "OverlapError",
    "RemoteAuthError",
    "RemoteError",
    "RemoteExtraMissing",
    "SourceError",
    "SymlinkLoopError",
    "TruncatedError",
    "UnsafePathError",
    "UnsupportedVersionError",
]
