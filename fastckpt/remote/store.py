"""Object stores as a download needs them: identify objects, list a prefix, read a byte range.

Two kinds, behind one small interface (``Store``):

- ``S3Store``: S3 and S3-compatible stores (MinIO, Ceph...) through boto3. Credentials, region
  and endpoint come from where every AWS tool reads them: ``AWS_ACCESS_KEY_ID`` /
  ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_REGION``, ``AWS_ENDPOINT_URL``, the
  shared config and credentials files (``AWS_PROFILE``), SSO, container and instance roles;
  the ``remote_*`` settings override them (``remote_endpoint``, ``remote_region``,
  ``remote_profile``, ``remote_anonymous``).
- ``HttpStore``: ``https://`` and ``http://`` servers with ranged GETs, through urllib3
  (boto3's own HTTP library). Presigned URLs work: objects are identified with a one-byte GET,
  never a HEAD (a URL signed for GET refuses HEAD).

Why boto3 (docs/remote.md has the figures): on the same objects and ranges it moved bytes as
fast as obstore (Rust's object_store) on this machine, at the same CPU cost, and it is what
reads every standard AWS credential source itself; obstore reads the environment variables but
needs boto3 for the shared files anyway.

Every response is checked against the object's identity: the exact ``Content-Range`` asked for,
the size, the ETag (and version id) recorded when the object was first seen, with ``If-Match``
(and a pinned ``VersionId``) on every request, so bytes of two generations of an object are
never mixed. Errors are sorted for the caller: ``Transient`` (throttling, 5xx, a dropped or
stalled connection, a short body: retried by the download), ``ObjectChangedError``,
``RemoteAuthError`` (naming the bucket and where credentials come from), ``FileNotFoundError``.
The stores retry nothing themselves; ``fastckpt.remote.download`` owns retries and backoff.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from fastckpt.config import Config, aws_environment
from fastckpt.errors import (
    ObjectChangedError,
    RemoteAuthError,
    RemoteError,
    RemoteExtraMissing,
)
from fastckpt.rules.urls import Url

LIST_MAX_OBJECTS = 100_000  # objects under one checkpoint prefix
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_T = TypeVar("_T")

CREDENTIAL_HELP = (
    "credentials are read from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN, the "
    "shared files ~/.aws/credentials and ~/.aws/config (AWS_PROFILE, or the remote_profile "
    "setting), SSO, or the container/instance role; set remote_anonymous for a public bucket"
)


class Transient(Exception):
    """A failure worth retrying (throttling, a server error, a dropped or stalled connection, a
    short response). ``retry_after_s`` is the server's hint, if it gave one."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class ObjectInfo:
    """One object as first seen: ``name`` relative to the checkpoint URL, ``key`` in its store,
    ``url`` for messages, ``size``, ``etag`` (empty when the server sends none; a weak ETag is
    kept for comparison but never sent in ``If-Match``), ``version`` (S3 version id, or empty),
    ``modified`` (HTTP ``Last-Modified`` when there is no ETag)."""

    name: str
    key: str
    url: str
    size: int
    etag: str = ""
    version: str = ""
    modified: str = ""

    def identity(self) -> list[Any]:
        return [self.name, self.key, self.size, self.etag, self.version, self.modified]


class RangeBody(Protocol):
    """The body of one ranged GET: ``readinto`` fills a buffer (0 at the end), ``close``."""

    def readinto(self, buf: memoryview) -> int: ...

    def close(self) -> None: ...


class Store(Protocol):
    """What a download needs of a store (``S3Store``, ``HttpStore``)."""

    name: str
    listable: bool

    def head(self, key: str, name: str, version: str = "") -> ObjectInfo: ...

    def list(self, prefix: str) -> list[ObjectInfo]: ...

    def get(self, info: ObjectInfo, lo: int, hi: int) -> RangeBody: ...


def check_content_range(info: ObjectInfo, header: str | None, lo: int, hi: int) -> None:
    """The response to ``Range: bytes=lo-(hi-1)`` must say exactly that range of an object of
    ``info.size`` bytes; anything else is another generation or a broken response."""
    m = _CONTENT_RANGE.match((header or "").strip())
    if m is None:
        raise Transient(f"response without a valid Content-Range ({header!r})")
    a, b, total = int(m.group(1)), int(m.group(2)), m.group(3)
    if total != "*" and int(total) != info.size:
        raise ObjectChangedError(
            errno.ESTALE,
            f"the object is now {total} bytes, it was {info.size} when the load began",
            info.url,
        )
    if (a, b + 1) != (lo, hi):
        raise Transient(f"asked for bytes {lo}-{hi - 1}, the response holds {a}-{b}")


def _changed(info: ObjectInfo, what: str) -> ObjectChangedError:
    return ObjectChangedError(
        errno.ESTALE, f"the object was replaced while it was read ({what})", info.url
    )


# --------------------------------------------------------------------------------------------- S3


class _S3Body:
    def __init__(self, body: Any, errors: tuple[type[BaseException], ...]) -> None:
        self._body = body
        self._errors = errors

    def readinto(self, buf: memoryview) -> int:
        try:
            return int(self._body.readinto(buf))
        except self._errors as exc:
            raise Transient(f"connection failed mid-body: {type(exc).__name__}: {exc}") from None

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a broken connection
            self._body.close()


class S3Store:
    """An S3 bucket through boto3 (see the module docstring for where settings come from)."""

    listable = True

    def __init__(self, bucket: str, cfg: Config) -> None:
        try:
            import boto3
            import botocore.config
            import botocore.exceptions as bexc
            from botocore import UNSIGNED
        except ImportError as exc:
            raise RemoteExtraMissing(
                "loading from s3:// needs boto3, fastckpt's 'remote' extra "
                "(fastckpt-loader[remote]); in the fastckpt clone: "
                f'pip install ".[remote]" ({exc})'
            ) from None
        self.bucket = bucket
        self.name = f"s3://{bucket}"
        self._bexc = bexc
        options: dict[str, Any] = {
            "connect_timeout": cfg.remote_timeout_s,
            "read_timeout": cfg.remote_timeout_s,
            "retries": {"total_max_attempts": 1},  # fastckpt.remote.download retries
            "max_pool_connections": cfg.remote_concurrency + 4,
        }
        if cfg.remote_anonymous:
            options["signature_version"] = UNSIGNED
        # botocore validates a whole-object checksum only after the last byte of a body, when
        # its bytes were already handed on; S3 sends none for ranged GETs anyway. fastckpt
        # checks what it can itself: CRC32C per chunk, Content-Range, size, ETag, version.
        if "response_checksum_validation" in botocore.config.Config.OPTION_DEFAULTS:
            options["response_checksum_validation"] = "when_required"
        try:
            session = boto3.session.Session(
                profile_name=cfg.remote_profile or None, region_name=cfg.remote_region or None
            )
            self._client = session.client(
                "s3",
                endpoint_url=cfg.remote_endpoint or None,
                config=botocore.config.Config(**options),
            )
        except bexc.ProfileNotFound as exc:
            raise RemoteAuthError(
                errno.EACCES, f"{exc}; {CREDENTIAL_HELP}", f"s3://{bucket}"
            ) from None
        self._transient: tuple[type[BaseException], ...] = (
            bexc.EndpointConnectionError,
            bexc.ConnectionClosedError,
            bexc.ReadTimeoutError,
            bexc.ConnectTimeoutError,
            bexc.ResponseStreamingError,
            bexc.IncompleteReadError,
            bexc.HTTPClientError,
            ConnectionError,
            TimeoutError,
        )
        try:
            from urllib3.exceptions import HTTPError as Urllib3Error

            self._transient = (*self._transient, Urllib3Error)
        except ImportError:  # pragma: no cover - urllib3 comes with botocore
            pass

    def _call(self, url: str, fn: Callable[[], _T]) -> _T:
        bexc = self._bexc
        try:
            return fn()
        except bexc.NoCredentialsError:
            raise RemoteAuthError(
                errno.EACCES,
                f"no AWS credentials found for bucket {self.bucket!r}; {CREDENTIAL_HELP}",
                url,
            ) from None
        except (bexc.PartialCredentialsError, bexc.CredentialRetrievalError) as exc:
            raise RemoteAuthError(
                errno.EACCES,
                f"the AWS credentials for bucket {self.bucket!r} are incomplete ({exc}); "
                f"{CREDENTIAL_HELP}",
                url,
            ) from None
        except bexc.ClientError as exc:
            raise self._client_error(exc, url) from None
        except self._transient as exc:
            raise Transient(f"{type(exc).__name__}: {exc}") from None

    def _client_error(self, exc: Any, url: str) -> BaseException:
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        message = str(err.get("Message", "")) or code
        if code in ("NoSuchKey", "NotFound", "404") or (status == 404 and code != "NoSuchBucket"):
            return FileNotFoundError(errno.ENOENT, "no such object", url)
        if code == "NoSuchBucket":
            return FileNotFoundError(errno.ENOENT, f"no such bucket {self.bucket!r}", url)
        if code in ("PreconditionFailed", "412") or status == 412:
            return ObjectChangedError(
                errno.ESTALE, "the object was replaced while it was read (ETag changed)", url
            )
        if code in ("InvalidRange", "416") or status == 416:
            return ObjectChangedError(
                errno.ESTALE, "the object shrank while it was read (range not satisfiable)", url
            )
        if status in (401, 403) or code in (
            "AccessDenied",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "ExpiredToken",
            "InvalidToken",
            "TokenRefreshRequired",
            "AllAccessDisabled",
        ):
            return RemoteAuthError(
                errno.EACCES,
                f"the store refused access to bucket {self.bucket!r} ({code or status}: "
                f"{message}); {CREDENTIAL_HELP}",
                url,
            )
        if status == 429 or status >= 500 or code in ("SlowDown", "RequestTimeout", "Throttling"):
            retry = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
            return Transient(f"{code or status}: {message}", _retry_after(retry.get("retry-after")))
        return RemoteError(errno.EIO, f"the store answered {code or status}: {message}", url)

    def head(self, key: str, name: str, version: str = "") -> ObjectInfo:
        """The object (that version of it, when ``version`` is given)."""
        url = f"s3://{self.bucket}/{key}"
        args = {"Bucket": self.bucket, "Key": key}
        if version:
            args["VersionId"] = version
        r = self._call(url, lambda: self._client.head_object(**args))
        return ObjectInfo(
            name,
            key,
            url,
            int(r["ContentLength"]),
            str(r.get("ETag", "")),
            str(r.get("VersionId", "") or version),
        )

    def list(self, prefix: str) -> list[ObjectInfo]:
        base = prefix.rstrip("/") + "/"
        out: list[ObjectInfo] = []
        token: str | None = None
        while True:
            args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": base}
            if token:
                args["ContinuationToken"] = token
            page: dict[str, Any] = self._call(
                f"s3://{self.bucket}/{base}",
                functools.partial(self._client.list_objects_v2, **args),
            )
            for o in page.get("Contents", ()):
                key = str(o["Key"])
                if key.endswith("/"):
                    continue  # a folder marker
                out.append(
                    ObjectInfo(
                        key[len(base) :],
                        key,
                        f"s3://{self.bucket}/{key}",
                        int(o["Size"]),
                        str(o.get("ETag", "")),
                    )
                )
            if len(out) > LIST_MAX_OBJECTS:
                raise RemoteError(
                    errno.E2BIG,
                    f"more than {LIST_MAX_OBJECTS} objects under the prefix; name the checkpoint "
                    "more precisely",
                    f"s3://{self.bucket}/{base}",
                )
            if not page.get("IsTruncated"):
                return out
            token = page.get("NextContinuationToken")

    def get(self, info: ObjectInfo, lo: int, hi: int) -> RangeBody:
        args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": info.key,
            "Range": f"bytes={lo}-{hi - 1}",
        }
        if info.version:
            args["VersionId"] = info.version
        if info.etag and not info.etag.startswith("W/"):
            args["IfMatch"] = info.etag
        r = self._call(info.url, lambda: self._client.get_object(**args))
        body = r["Body"]
        try:
            check_content_range(info, r.get("ContentRange"), lo, hi)
            if info.etag and str(r.get("ETag", "")) != info.etag:
                raise _changed(info, "ETag")
            if info.version and str(r.get("VersionId", "") or "") not in ("", info.version):
                raise _changed(info, "version id")
        except BaseException:
            body.close()
            raise
        return _S3Body(body, self._transient)


# --------------------------------------------------------------------------------------------- HTTP


class _HttpBody:
    def __init__(self, resp: Any, errors: tuple[type[BaseException], ...]) -> None:
        self._resp = resp
        self._errors = errors

    def readinto(self, buf: memoryview) -> int:
        try:
            return int(self._resp.readinto(buf))
        except self._errors as exc:
            raise Transient(f"connection failed mid-body: {type(exc).__name__}: {exc}") from None

    def close(self) -> None:
        try:
            self._resp.release_conn()
            self._resp.close()
        except Exception:  # pragma: no cover - closing a broken connection
            pass


class HttpStore:
    """An HTTP(S) server that answers ranged GETs (urllib3; no retries of its own)."""

    listable = False

    def __init__(self, base: str, cfg: Config) -> None:
        try:
            import urllib3
        except ImportError as exc:  # pragma: no cover - a dependency of boto3
            raise RemoteExtraMissing(
                f"loading from https:// needs urllib3, fastckpt's 'remote' extra "
                f'(fastckpt-loader[remote]); in the fastckpt clone: pip install ".[remote]" ({exc})'
            ) from None
        self.name = base
        self._pool = urllib3.PoolManager(
            maxsize=cfg.remote_concurrency + 4,
            retries=False,
            timeout=urllib3.Timeout(connect=cfg.remote_timeout_s, read=cfg.remote_timeout_s),
        )
        self._errors: tuple[type[BaseException], ...] = (
            urllib3.exceptions.HTTPError,
            ConnectionError,
            TimeoutError,
        )
        self._ssl_errors: tuple[type[BaseException], ...] = (urllib3.exceptions.SSLError,)
        self._lock = threading.Lock()

    def _request(self, url: str, headers: dict[str, str]) -> Any:
        try:
            return self._pool.request(
                "GET", url, headers=headers, preload_content=False, redirect=True
            )
        except self._ssl_errors as exc:
            if "CERTIFICATE_VERIFY_FAILED" not in str(exc):
                raise Transient(f"{type(exc).__name__}: {exc}") from None
            raise RemoteError(  # permanent: not retried
                errno.EACCES,
                f"the server's TLS certificate was not accepted ({exc}); trust its CA in the "
                "system store or with SSL_CERT_FILE",
                url,
            ) from None
        except self._errors as exc:
            raise Transient(f"{type(exc).__name__}: {exc}") from None

    def _status_error(self, resp: Any, url: str) -> BaseException:
        status = int(resp.status)
        if status == 404 or status == 410:
            return FileNotFoundError(errno.ENOENT, f"no such object (HTTP {status})", url)
        if status in (401, 403):
            return RemoteAuthError(
                errno.EACCES,
                f"the server refused access (HTTP {status}); a presigned URL may have expired",
                url,
            )
        if status == 412:
            return ObjectChangedError(
                errno.ESTALE, "the object was replaced while it was read (ETag changed)", url
            )
        if status == 416:
            return ObjectChangedError(errno.ESTALE, "the object shrank while it was read", url)
        if status == 429 or status >= 500:
            return Transient(f"HTTP {status}", _retry_after(resp.headers.get("Retry-After")))
        return RemoteError(errno.EIO, f"the server answered HTTP {status}", url)

    def head(self, key: str, name: str, version: str = "") -> ObjectInfo:
        """The object at ``key`` (HTTP has no versions: ``version`` is not used)."""
        url = f"{self.name}/{key}"
        resp = self._request(url, {"Range": "bytes=0-0"})
        try:
            if resp.status == 200:  # no ranges (or an empty object): the length is the size
                size = int(resp.headers.get("Content-Length", "-1"))
                if size != 0:
                    raise RemoteError(
                        errno.EOPNOTSUPP, "the server does not answer ranged GETs", url
                    )
            elif resp.status == 206:
                m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
                if m is None or m.group(3) == "*":
                    raise RemoteError(errno.EIO, "the server sent no object size", url)
                size = int(m.group(3))
            else:
                raise self._status_error(resp, url)
            etag = str(resp.headers.get("ETag", ""))
            modified = "" if etag else str(resp.headers.get("Last-Modified", ""))
            return ObjectInfo(name, key, url, size, etag, "", modified)
        finally:
            resp.drain_conn()
            resp.release_conn()

    def list(self, prefix: str) -> list[ObjectInfo]:
        raise NotImplementedError("HTTP servers are not listed; files are found by name")

    def get(self, info: ObjectInfo, lo: int, hi: int) -> RangeBody:
        headers = {"Range": f"bytes={lo}-{hi - 1}"}
        if info.etag and not info.etag.startswith("W/"):
            headers["If-Match"] = info.etag
        elif info.modified:
            headers["If-Unmodified-Since"] = info.modified
        resp = self._request(info.url, headers)
        ok = False
        try:
            if resp.status == 206:
                check_content_range(info, resp.headers.get("Content-Range"), lo, hi)
            elif resp.status == 200:
                if (lo, hi) != (0, info.size):
                    raise RemoteError(
                        errno.EOPNOTSUPP, "the server ignored the Range header", info.url
                    )
            else:
                raise self._status_error(resp, info.url)
            if info.etag and str(resp.headers.get("ETag", info.etag)) != info.etag:
                raise _changed(info, "ETag")
            ok = True
            return _HttpBody(resp, self._errors)
        finally:
            if not ok:
                resp.drain_conn() if resp.status < 300 else None
                resp.release_conn()


def _retry_after(value: Any) -> float | None:
    try:
        return max(0.0, min(float(value), 60.0)) if value is not None else None
    except (TypeError, ValueError):
        return None


_STORES: dict[tuple[Any, ...], Store] = {}
_STORES_LOCK = threading.Lock()


def store_for(url: Url, cfg: Config) -> Store:
    """The store serving ``url`` with ``cfg``'s remote settings (one per bucket or host and
    settings, shared by the process's loads: connection pools are reused)."""
    key = (
        url.scheme,
        url.bucket or url.host,
        cfg.remote_endpoint,
        cfg.remote_region,
        cfg.remote_profile,
        cfg.remote_anonymous,
        cfg.remote_timeout_s,
        cfg.remote_concurrency,
        aws_environment() if url.scheme == "s3" else (),
    )
    with _STORES_LOCK:
        store = _STORES.get(key)
    if store is not None:
        return store
    made: Store = S3Store(url.bucket, cfg) if url.scheme == "s3" else HttpStore(url.base, cfg)
    with _STORES_LOCK:
        return _STORES.setdefault(key, made)


def forget_stores() -> None:
    """Drop the cached stores (a forked child, or after the AWS environment changed)."""
    with _STORES_LOCK:
        _STORES.clear()


os.register_at_fork(after_in_child=forget_stores)

__all__ = [
    "CREDENTIAL_HELP",
    "HttpStore",
    "ObjectInfo",
    "RangeBody",
    "S3Store",
    "Store",
    "Transient",
    "check_content_range",
    "forget_stores",
    "store_for",
]
