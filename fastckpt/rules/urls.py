"""Checkpoint URLs: which path strings name an object store or HTTP server, and their parts.

``s3://bucket/key`` (an object or a prefix that holds a checkpoint's files; ``?versionId=...``
pins a version of a single object), ``https://host/path`` and ``http://host/path`` (a file, or a
folder whose files are found by name). Every entry point asks ``is_url`` first; everything else
is a local path. Pure: no I/O, imports nothing of the package but errors.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from dataclasses import dataclass

SCHEMES = ("s3", "https", "http")
_URL = re.compile(r"^(s3|https?)://", re.IGNORECASE)
# S3 bucket names: 3-63 of lower-case letters, digits, dots and hyphens (AWS rules; the legacy
# upper-case names some S3-compatible stores allow are accepted too)
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.\-_]{1,61}[A-Za-z0-9]$")


def is_url(path: object) -> bool:
    """True for a ``str`` (or ``os.PathLike`` of one) starting with ``s3://``, ``https://`` or
    ``http://``."""
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    return isinstance(path, str) and _URL.match(path) is not None


@dataclass(frozen=True)
class Url:
    """A parsed checkpoint URL. ``bucket`` is the S3 bucket (empty for HTTP), ``key`` the object
    key or path without a leading or trailing slash, ``version`` an S3 version id pinned by
    ``?versionId=``; ``base`` is scheme and authority (``s3://bucket``, ``https://host:port``)."""

    scheme: str
    bucket: str
    host: str
    key: str
    version: str = ""

    @property
    def base(self) -> str:
        return f"s3://{self.bucket}" if self.scheme == "s3" else f"{self.scheme}://{self.host}"

    def child(self, name: str) -> str:
        """The URL of ``name`` (``a/b`` relative) beneath this one."""
        return f"{self.base}/{self.key}/{name}" if self.key else f"{self.base}/{name}"

    def __str__(self) -> str:
        out = f"{self.base}/{self.key}"
        return f"{out}?versionId={self.version}" if self.version else out


def parse_url(url: str | os.PathLike[str]) -> Url:
    """Parse ``url``; ValueError (naming the URL and the rule) when it cannot name a
    checkpoint."""
    raw = os.fspath(url)
    if not is_url(raw):
        raise ValueError(f"{raw!r} is not an s3://, https:// or http:// URL")
    parts = urllib.parse.urlsplit(raw)
    scheme = parts.scheme.lower()
    key = urllib.parse.unquote(parts.path).strip("/")
    if "\0" in key or any(seg in (".", "..") for seg in key.split("/")):
        raise ValueError(f"{raw!r}: a key may not hold '.' or '..' segments or NUL bytes")
    if parts.fragment:
        raise ValueError(f"{raw!r}: a checkpoint URL has no #fragment")
    if scheme == "s3":
        bucket = parts.netloc
        if not _BUCKET.match(bucket):
            raise ValueError(f"{raw!r}: {bucket!r} is not a valid S3 bucket name")
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
        unknown = set(query) - {"versionId"}
        if unknown:
            raise ValueError(f"{raw!r}: unknown query parameter(s) {', '.join(sorted(unknown))}")
        version = query.get("versionId", [""])[-1]
        return Url("s3", bucket, "", key, version)
    if not parts.netloc:
        raise ValueError(f"{raw!r}: no host")
    host = parts.netloc
    if parts.query:  # a presigned URL: the query belongs to the one object it names
        return Url(scheme, "", host, key + "?" + parts.query)
    return Url(scheme, "", host, key)


__all__ = ["SCHEMES", "Url", "is_url", "parse_url"]
