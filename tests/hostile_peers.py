"""Hostile peers for the servers' test suites (the cache daemon, the migration host): slow,
idle, garbage, oversize and disconnecting clients, bounded in number and time, run on threads
beside a well-behaved client. Each server's suite says how to connect and what its frames look
like; the behaviours are the same for every server."""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

Connect = Callable[[], socket.socket]


def hung_up(s: socket.socket, within_s: float) -> bool:
    """Whether the server closes ``s`` within ``within_s`` (reading and dropping anything)."""
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        s.settimeout(max(0.01, end - time.monotonic()))
        try:
            if s.recv(65536) == b"":
                return True
        except TimeoutError:
            return False
        except OSError:
            return True
    return False


def trickle(connect: Connect, frame: bytes, *, at_most: int = 60, gap_s: float = 0.2) -> int:
    """Send ``frame`` one byte every ``gap_s`` (at most ``at_most`` bytes); returns how many
    bytes went out before the server hung up, or -1 if it never did."""
    s = connect()
    try:
        for sent, byte in enumerate(frame[:at_most]):
            try:
                s.sendall(bytes([byte]))
            except OSError:
                return sent
            if hung_up(s, gap_s):
                return sent + 1
        return -1
    finally:
        s.close()


@dataclass(frozen=True)
class Frames:
    """What the hostile peers send: ``slow`` (a valid frame, sent one byte every 0.1 s),
    ``oversize`` (a header announcing far more than the server accepts, then filler),
    ``partial`` (a valid request, of which disconnecting peers send a prefix)."""

    slow: bytes
    oversize: bytes
    partial: bytes


@dataclass(frozen=True)
class _Peer:
    connect: Connect
    stop: threading.Event
    frames: Frames
    rng: random.Random
    deadline_s: float


def _slow(p: _Peer) -> None:
    while not p.stop.is_set():
        with contextlib.suppress(OSError), p.connect() as s:
            for byte in p.frames.slow:
                if p.stop.is_set():
                    return
                s.sendall(bytes([byte]))
                time.sleep(0.1)


def _idle(p: _Peer) -> None:
    while not p.stop.is_set():
        with contextlib.suppress(OSError), p.connect() as s:
            hung_up(s, 3 * p.deadline_s)


def _garbage(p: _Peer) -> None:
    while not p.stop.is_set():
        with contextlib.suppress(OSError), p.connect() as s:
            s.sendall(p.rng.randbytes(p.rng.randint(1, 400)))
            hung_up(s, 0.5)


def _oversize(p: _Peer) -> None:
    while not p.stop.is_set():
        with contextlib.suppress(OSError), p.connect() as s:
            s.sendall(p.frames.oversize)
            hung_up(s, 0.5)


def _disconnecting(p: _Peer) -> None:
    while not p.stop.is_set():
        with contextlib.suppress(OSError):
            s = p.connect()
            s.sendall(p.frames.partial[: p.rng.randint(1, len(p.frames.partial))])
            time.sleep(p.rng.uniform(0, 0.05))
            s.close()


@contextlib.contextmanager
def hostile_peers(
    connect: Connect,
    frames: Frames,
    *,
    deadline_s: float,
    slow: int = 3,
    idle: int = 4,
    garbage: int = 2,
    oversize: int = 2,
    disconnecting: int = 2,
    seed: int = 0,
) -> Iterator[None]:
    """Within the block, that many peers of each kind are at the server (each a thread that
    reconnects until the block ends); on leaving, they stop and are joined, and none may be
    left running. Idle peers wait three request deadlines for the server to hang up."""
    stop = threading.Event()
    kinds: list[tuple[Callable[[_Peer], None], int]] = [
        (_slow, slow),
        (_idle, idle),
        (_garbage, garbage),
        (_oversize, oversize),
        (_disconnecting, disconnecting),
    ]
    peers = [
        threading.Thread(
            target=fn,
            args=(_Peer(connect, stop, frames, random.Random(seed + i), deadline_s),),
            daemon=True,
        )
        for i, (fn, n) in enumerate(kinds)
        for _ in range(n)
    ]
    for t in peers:
        t.start()
    try:
        time.sleep(0.3)  # the peers are at it
        yield
    finally:
        stop.set()
        for t in peers:
            t.join(10)
    assert not any(t.is_alive() for t in peers), "a hostile peer thread did not stop"
