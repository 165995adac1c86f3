"""Downloads in flight: one ``Flight`` per remote checkpoint being downloaded in this process,
shared by the loads that read it (single flight across threads), and the ``StreamView`` that
the executor reads it through (``sources.Stream``: range gates, reads asked for first, waits
that Ctrl-C interrupts and that raise the download's own error).

A flight's files are closed, and its staging copy published or removed (``on_finish``), once
the download finished and no load uses them. At interpreter exit, downloads that are only
finishing (every range fetched or being fetched) are waited for, so that a process that loaded
a checkpoint and exits at once still publishes its SSD-tier copy; others are cancelled.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastckpt import io_engine
from fastckpt.errors import FormatError
from fastckpt.format.fsdir import OpenFile, check_regular
from fastckpt.format.index import Index
from fastckpt.format.reader import OpenCheckpoint
from fastckpt.remote.download import Download

EXIT_WAIT_S = 120.0  # longest wait at exit for downloads that are finishing (publishing)


@dataclass
class RemoteOpened:
    """What ``open_remote`` hands ``Loader.open_source`` (which makes an ``Opened`` of it)."""

    index: Index
    files: tuple[OpenFile, ...]
    ident: tuple[str, str]
    closers: list[Callable[[], None]]
    stream: Any = None  # a ``StreamView`` while bytes arrive; None for an SSD-tier entry
    ssd_key: str | None = None
    notes: list[str] = field(default_factory=list)


def open_file(fd: int, url: str) -> OpenFile:
    return check_regular(os.dup(fd), url, error=FormatError, what="downloaded file")


class Flight:
    """One download of one remote checkpoint and the local files it lands in, shared by the
    loads (in this process) that read it. The files are closed, and a staging copy published
    or removed, once the download finished and no load uses them."""

    def __init__(
        self,
        url: str,
        ck: OpenCheckpoint,
        fds: dict[str, int],
        objects: dict[str, list[Any]],
        key: str,
        slot: tuple[str, str],
    ) -> None:
        self.url = url
        self.slot = slot  # (SSD tier directory or "", URL): its place among the flights
        self.ck = ck
        self.fds = fds
        self.objects = objects
        self.key = key
        self.gates: dict[int, io_engine.RangeGate] = {}
        self.target_of: dict[int, int] = {}
        self.file_gates: dict[str, io_engine.RangeGate] = {}  # every landed file, by name
        self.download: Download | None = None
        self.write_through = False
        self.users = 0
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.after: list[Callable[[BaseException | None], None]] = []

    @property
    def failed(self) -> bool:
        return self.download is not None and self.download.error is not None

    def join(self) -> RemoteOpened:
        with self.lock:
            self.users += 1
        try:
            index = self.ck.index
            files = tuple(open_file(self.fds[p.file], p.path) for p in index.partitions)
        except BaseException:
            self.leave(interrupted=False)
            raise
        closers: list[Callable[[], None]] = [lambda: self.leave(interrupted=False)]
        closers.extend(f.close for f in files)
        return RemoteOpened(
            index,
            files,
            (self.url, self.key[:24]),
            closers,
            stream=StreamView(self),
        )

    def leave(self, *, interrupted: bool) -> None:
        with self.lock:
            self.users -= 1
            last = self.users == 0
        dl = self.download
        stop = interrupted or not self.write_through
        if last and dl is not None and not dl.finished.is_set() and stop:
            dl.cancel("every load of this download was closed or interrupted")
        if last:
            self._maybe_close()

    def finished(self, error: BaseException | None) -> None:
        for fn in self.after:
            with contextlib.suppress(Exception):
                fn(error)
        with _FLIGHTS_LOCK:
            if _FLIGHTS.get(self.slot) is self and (error is not None or self.write_through):
                del _FLIGHTS[self.slot]  # later loads find the SSD tier's copy, or start anew
        self._maybe_close()

    def _maybe_close(self) -> None:
        with self.lock:
            done = self.download is None or self.download.finished.is_set()
            if self.users > 0 or not done or not self.fds:
                return
            fds, self.fds = self.fds, {}
        with _FLIGHTS_LOCK:
            if _FLIGHTS.get(self.slot) is self:
                del _FLIGHTS[self.slot]
        self.ck.close()
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)


class StreamView:
    """``sources.Stream`` over a flight: gates per partition, reads asked for first, waits that
    Ctrl-C interrupts and that raise the download's own error."""

    def __init__(self, flight: Flight) -> None:
        self._flight = flight

    def gate(self, partition: int) -> io_engine.RangeGate | None:
        dl = self._flight.download
        if dl is not None and dl.done:
            return None
        return self._flight.gates.get(partition)

    def want(self, partition: int, lo: int, hi: int) -> None:
        dl = self._flight.download
        t = self._flight.target_of.get(partition)
        if dl is not None and t is not None:
            dl.want(t, lo, hi)

    def wait(self, partition: int, lo: int, hi: int) -> None:
        gate = self.gate(partition)
        if gate is None:
            return
        try:
            while not gate.wait(lo, hi, 0.2):
                pass
        except OSError as exc:
            err = self.error()
            if err is None:
                raise
            raise err from exc

    def error(self) -> BaseException | None:
        dl = self._flight.download
        return None if dl is None else dl.error

    @property
    def download(self) -> Download | None:
        return self._flight.download

    @property
    def key(self) -> str:
        """The SSD-tier key the download is published under when it is written through."""
        return self._flight.key

    @property
    def writes_through(self) -> bool:
        return self._flight.write_through

    def read_file(self, name: str) -> bytes:
        """The whole of landed file ``name`` (a carried file: ``config.json``...), once it has
        arrived. KeyError for a file the checkpoint does not use."""
        gate = self._flight.file_gates[name]
        fd = self._flight.fds.get(name)
        size = os.fstat(fd).st_size if fd is not None else 0
        try:
            while not gate.wait(0, size, 0.2):
                pass
        except OSError as exc:
            err = self.error()
            raise (err or exc) from exc
        fd = self._flight.fds.get(name)
        if fd is None:
            raise RuntimeError("internal error: the download's files were closed while in use")
        return os.pread(fd, size, 0) if size else b""

    def names(self) -> list[str]:
        """The files of the checkpoint (relative names)."""
        return sorted(self._flight.file_gates)

    def interrupt(self) -> None:
        self._flight.leave(interrupted=True)


_FLIGHTS: dict[tuple[str, str], Flight] = {}
_FLIGHTS_LOCK = threading.Lock()


def register(flight: Flight) -> None:
    with _FLIGHTS_LOCK:
        _FLIGHTS[flight.slot] = flight


def find(slot: tuple[str, str]) -> Flight | None:
    with _FLIGHTS_LOCK:
        return _FLIGHTS.get(slot)


def active_flights() -> list[Flight]:
    with _FLIGHTS_LOCK:
        return list(_FLIGHTS.values())


def _finish_at_exit() -> None:
    """Let finishing write-through downloads publish before the interpreter exits (their worker
    threads are daemons); cancel the rest (nobody will read them)."""
    deadline = time.monotonic() + EXIT_WAIT_S
    for flight in active_flights():
        dl = flight.download
        if dl is None or dl.finished.is_set():
            continue
        if flight.write_through and dl.finishing:
            dl.finished.wait(max(0.0, deadline - time.monotonic()))
        else:
            dl.cancel("the process is exiting")  # its workers are daemons: not waited for


atexit.register(_finish_at_exit)

__all__ = ["Flight", "RemoteOpened", "StreamView", "active_flights", "open_file", "register"]
