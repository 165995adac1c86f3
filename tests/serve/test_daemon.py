"""The daemon as a subprocess on a temporary socket: correctness, budgets, faults, security."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import fastckpt
from fastckpt.loader.api import load_via_server
from fastckpt.serve import protocol
from fastckpt.serve.client import Client

from .conftest import ClientProc, same, save_ckpt, start_daemon


def _expected_digest(path: str) -> str:
    from ._worker import digest

    return digest(fastckpt.load(path))


def _stats(sock: str) -> dict[str, Any]:
    with Client(sock, timeout_s=5) as c:
        return c.stats()


def _wait_idle(sock: str, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        s = _stats(sock)
        # our own stats connection is the only one left, nothing pinned
        if s["pinned_items"] == 0 and s["open_connections"] <= 1:
            return s
        assert time.monotonic() < deadline, f"daemon did not release its references: {s}"
        time.sleep(0.05)


def test_load_is_bitwise_copy_on_write_and_counted(tmp_path: Path, daemon_factory: Any) -> None:
    root = tmp_path / "models"
    sd = save_ckpt(root / "a", seed=1)
    d = daemon_factory(str(root))
    got, st = load_via_server(root / "a", stats=True, server=d.socket)
    assert st.path_taken == "daemon" and same(got, sd)
    got["layer0.w"].mul_(0)  # the caller's copy-on-write pages; the cache is sealed
    again = load_via_server(root / "a", server=d.socket)
    assert same(again, sd)
    subset = load_via_server(root / "a", names_=["layer2.w", "ids"], server=d.socket)
    assert list(subset) == ["layer2.w", "ids"] and torch.equal(subset["ids"], sd["ids"])
    s = _wait_idle(d.socket)
    assert (s["misses"], s["hits"], s["fills"]) == (1, 2, 1)
    assert s["memfds"] == d.memfds() > 0
    assert s["used_bytes"] == s["bytes_in"] <= s["capacity_bytes"]


def test_fastckpt_load_uses_the_configured_daemon(tmp_path: Path, daemon_factory: Any) -> None:
    root = tmp_path / "models"
    sd = save_ckpt(root / "a", seed=2)
    d = daemon_factory(str(root))
    rows = ClientProc(d.socket, [str(root / "a")] * 2).result()
    want = _expected_digest(str(root / "a"))
    assert [r["taken"] for r in rows] == ["daemon", "daemon"]
    assert all(r["digest"] == want and not r["warnings"] for r in rows)
    assert same(fastckpt.load(root / "a"), sd)


def test_sixteen_clients_overlapping_checkpoints_small_budget(
    tmp_path: Path, daemon_factory: Any
) -> None:
    root = tmp_path / "models"
    paths = [str(root / f"m{i}") for i in range(4)]
    for i, p in enumerate(paths):
        save_ckpt(Path(p), seed=10 + i)
    want = {p: _expected_digest(p) for p in paths}
    one = sum(f.stat().st_size for f in Path(paths[0]).iterdir() if f.suffix != ".index")
    budget = int(one * 2.5)  # room for two of the four checkpoints
    d = daemon_factory(str(root), str(budget))
    rng = random.Random(7)
    procs = [ClientProc(d.socket, [rng.choice(paths) for _ in range(4)], 20) for _ in range(16)]
    peak = 0
    while any(p.proc.is_alive() for p in procs):
        s = _stats(d.socket)
        assert s["used_bytes"] <= s["capacity_bytes"]
        peak = max(peak, s["used_bytes"])
        time.sleep(0.02)
    rows = [row for p in procs for row in p.result()]
    assert len(rows) == 64
    assert all(r["digest"] == want[r["path"]] for r in rows)
    assert all(not r["warnings"] for r in rows)
    served = sum(r["taken"] == "daemon" for r in rows)
    s = _wait_idle(d.socket)
    assert served > 0 and s["used_bytes"] <= budget and peak <= budget
    assert s["fills"] == s["misses"] - s["bypasses"]  # one fill per miss that fitted
    assert s["memfds"] == d.memfds()


def test_single_flight_one_fill_for_concurrent_requests(
    tmp_path: Path, daemon_factory: Any
) -> None:
    root = tmp_path / "models"
    save_ckpt(root / "a", seed=3, rows=40000)
    d = daemon_factory(str(root), "64MiB")
    procs = [ClientProc(d.socket, [str(root / "a")], 20) for _ in range(6)]
    outs = [p.result()[0] for p in procs]
    assert all(o["taken"] == "daemon" for o in outs)
    assert len({o["digest"] for o in outs}) == 1
    s = _wait_idle(d.socket)
    assert s["fills"] == 1 and s["hits"] + s["misses"] == 6


def test_republished_checkpoint_is_served_new_never_mixed(
    tmp_path: Path, daemon_factory: Any
) -> None:
    root = tmp_path / "models"
    old = save_ckpt(root / "a", seed=4)
    d = daemon_factory(str(root))
    assert same(load_via_server(root / "a", server=d.socket), old)
    new = save_ckpt(root / "a", seed=5, overwrite=True)
    got, st = load_via_server(root / "a", stats=True, server=d.socket)
    assert st.path_taken == "daemon" and same(got, new)
    s = _wait_idle(d.socket)
    assert s["items"] == 1 and s["fills"] == 2  # the old generation went when the new came
    with Client(d.socket) as c:
        entries = c.ls()["entries"]
    assert len(entries) == 1 and entries[0]["name"] == "a"


def test_checkpoint_larger_than_budget_falls_back_silently(
    tmp_path: Path, daemon_factory: Any
) -> None:
    root = tmp_path / "models"
    sd = save_ckpt(root / "a", seed=6)
    d = daemon_factory(str(root), "64KiB")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_via_server(root / "a", server=d.socket) is None
    assert _stats(d.socket)["bypasses"] == 1
    assert same(fastckpt.load(root / "a"), sd)


def test_paths_outside_roots_and_escaping_names_are_refused(
    tmp_path: Path, daemon_factory: Any
) -> None:
    root = tmp_path / "models"
    save_ckpt(root / "a", seed=7)
    save_ckpt(tmp_path / "secret", seed=8)
    (root / "link").symlink_to(tmp_path / "secret")
    d = daemon_factory(str(root))
    assert load_via_server(tmp_path / "secret", server=d.socket) is None  # not under a root
    with Client(d.socket) as c:
        for name in ("../secret", "/etc", "a/../../secret", "link", "./a", "a//b", "nope"):
            with pytest.raises(Exception) as err:
                c.request(protocol.GET, {"root": 0, "name": name, "identity": "x"})
            assert getattr(err.value, "code", None) in ("bad_name", "not_found"), name
        with pytest.raises(Exception) as err:
            c.request(protocol.GET, {"root": 5, "name": "a", "identity": "x"})
        assert getattr(err.value, "code", None) == "bad_name"
    assert _stats(d.socket)["fills"] == 0


def _raw(sock_path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(sock_path)
    return s


def _closed_without_answer(s: socket.socket) -> bool:
    try:
        return s.recv(65536) == b""
    except ConnectionResetError:  # closed with our bytes unread
        return True


def test_hostile_requests_close_only_their_connection(tmp_path: Path, daemon_factory: Any) -> None:
    root = tmp_path / "models"
    sd = save_ckpt(root / "a", seed=9)
    d = daemon_factory(str(root))
    bystander = Client(d.socket)
    bystander.roots()
    bad_frames = [
        b"GET / HTTP/1.1\r\n\r\n",
        protocol.HEADER.pack(b"FCKS", 1, protocol.GET, 1 << 30),
        protocol.HEADER.pack(b"FCKS", 9, protocol.HELLO, 2) + b"{}",
        protocol.HEADER.pack(b"FCKS", 1, protocol.OK, 2) + b"{}",
        protocol.encode(protocol.GET, {"root": 0, "name": "a"}),
        protocol.encode(protocol.GET, {"root": -1, "name": "a", "identity": "x"}),
        protocol.HEADER.pack(b"FCKS", 1, protocol.HELLO, 9) + b'{"a":NaN}',
        protocol.HEADER.pack(b"FCKS", 1, protocol.HELLO, 3) + b"{}",  # truncated, then closed
    ]
    for frame in bad_frames:
        s = _raw(d.socket)
        s.sendall(frame)
        s.shutdown(socket.SHUT_WR)
        assert _closed_without_answer(s)
        s.close()
    # descriptors sent to the daemon are refused (and closed by it)
    s = _raw(d.socket)
    r, w = os.pipe()
    socket.send_fds(s, [protocol.encode(protocol.HELLO)], [r])
    assert _closed_without_answer(s)
    s.close()
    os.close(r)
    os.close(w)
    assert d.proc.poll() is None
    assert bystander.stats()["protocol_errors"] == len(bad_frames) + 1
    bystander.close()
    assert same(load_via_server(root / "a", server=d.socket), sd)


def test_idle_connection_does_not_block_others(tmp_path: Path, daemon_factory: Any) -> None:
    root = tmp_path / "models"
    sd = save_ckpt(root / "a", seed=11)
    d = daemon_factory(str(root))
    silent = _raw(d.socket)
    silent.sendall(protocol.HEADER.pack(b"FCKS", 1, protocol.HELLO, 10))  # never completes
    assert same(load_via_server(root / "a", server=d.socket), sd)
    silent.close()


def test_no_daemon_falls_back_and_warns_once(tmp_path: Path) -> None:
    root = tmp_path / "models"
    save_ckpt(root / "a", seed=12)
    rows = ClientProc(str(tmp_path / "nowhere" / "sock"), [str(root / "a")] * 3).result()
    want = _expected_digest(str(root / "a"))
    assert all(r["digest"] == want and r["taken"] != "daemon" for r in rows)
    assert [len(r["warnings"]) for r in rows] == [1, 0, 0]
    assert "cache daemon" in rows[0]["warnings"][0]


def test_stalled_then_killed_daemon_mid_load(tmp_path: Path, daemon_factory: Any) -> None:
    root = tmp_path / "models"
    save_ckpt(root / "a", seed=13)
    want = _expected_digest(str(root / "a"))
    d = daemon_factory(str(root))
    os.kill(d.pid, signal.SIGSTOP)  # accepts connections (backlog) but answers nothing
    try:
        t0 = time.monotonic()
        row = ClientProc(d.socket, [str(root / "a")], timeout=1.0).result()[0]
        assert time.monotonic() - t0 < 30
        assert row["digest"] == want and row["taken"] != "daemon" and row["warnings"]
        # a client waiting on the stopped daemon, then the daemon killed under it
        waiting = ClientProc(d.socket, [str(root / "a")], timeout=30.0)
        time.sleep(1.0)
        os.kill(d.pid, signal.SIGKILL)
        row = waiting.result()[0]
        assert row["digest"] == want and row["taken"] != "daemon" and row["warnings"]
    finally:
        if d.proc.poll() is None:
            os.kill(d.pid, signal.SIGKILL)
            os.kill(d.pid, signal.SIGCONT)
        d.proc.wait(10)


def test_daemon_restart_clients_reconnect(tmp_path: Path, daemon_factory: Any) -> None:
    root = tmp_path / "models"
    sd = save_ckpt(root / "a", seed=14)
    d = daemon_factory(str(root))
    assert same(load_via_server(root / "a", server=d.socket), sd)
    os.kill(d.pid, signal.SIGKILL)
    d.proc.wait(10)
    assert os.path.exists(d.socket)  # left behind by the killed daemon
    d2 = daemon_factory(str(root), socket_path=d.socket)  # replaces the stale socket
    got, st = load_via_server(root / "a", stats=True, server=d2.socket)
    assert st.path_taken == "daemon" and same(got, sd)
    assert d2.stop() == 0 and not os.path.exists(d2.socket)


def test_clients_killed_at_random_points_release_everything(
    tmp_path: Path, daemon_factory: Any
) -> None:
    root = tmp_path / "models"
    paths = [str(root / f"m{i}") for i in range(3)]
    for i, p in enumerate(paths):
        save_ckpt(Path(p), seed=20 + i, rows=20000)
    d = daemon_factory(str(root), "16MiB")
    rng = random.Random(3)
    for _ in range(8):
        p = ClientProc(d.socket, [rng.choice(paths) for _ in range(20)])
        time.sleep(rng.uniform(0.05, 0.6))
        p.kill()
        s = _stats(d.socket)
        assert s["used_bytes"] <= s["capacity_bytes"]
    # a raw client killed between its request and the reply
    s = _raw(d.socket)
    roots = json.loads(_request_raw(s, protocol.HELLO, {}))["roots"]
    assert roots == [str(root.resolve())]
    s.sendall(protocol.encode(protocol.GET, {"root": 0, "name": "m0", "identity": "0" * 32}))
    s.close()
    s = _wait_idle(d.socket)
    assert d.proc.poll() is None
    assert s["memfds"] == d.memfds()
    with Client(d.socket) as c:
        entries = c.ls()["entries"]
        assert s["memfds"] == sum(e["partitions"] for e in entries)
        for e in entries:
            c.evict_name(0, e["name"])
    assert d.memfds() == 0 and _stats(d.socket)["used_bytes"] == 0


def _request_raw(s: socket.socket, kind: int, fields: dict[str, Any]) -> str:
    s.sendall(protocol.encode(kind, fields))
    msg = protocol.Reader(s, accept_fds=True).read()
    return json.dumps(msg.fields)


_AS_NOBODY = """
import socket, sys, struct
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("EACCES"); sys.exit(0)
hello = struct.pack("<4sHHI", b"FCKS", 1, 1, 2) + b"{}"
try:
    s.sendall(hello)
except OSError:
    pass  # the daemon may have answered and closed already
data = b""
while True:
    try:
        chunk = s.recv(65536)
    except ConnectionResetError:
        break
    if not chunk:
        break
    data += chunk
print("REPLY", data[12:].decode())
"""


def _as_nobody(sock_path: str) -> str:
    import pwd

    nobody = pwd.getpwnam("nobody")

    def drop() -> None:
        os.setgroups([])
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)

    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("no system python3 that another user can run")
    out = subprocess.run(
        [python, "-I", "-S", "-c", _AS_NOBODY, sock_path],
        preexec_fn=drop,
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")


@needs_root
def test_other_user_cannot_enter_the_default_socket_directory(
    tmp_path: Path, daemon_factory: Any
) -> None:
    root = tmp_path / "models"
    save_ckpt(root / "a", seed=30)
    base = tempfile.mkdtemp(prefix="fastckpt-serve-")
    os.chmod(base, 0o711)
    try:
        d = daemon_factory(str(root), socket_path=os.path.join(base, "run", "sock"))
        assert os.stat(os.path.dirname(d.socket)).st_mode & 0o777 == 0o700
        assert _as_nobody(d.socket) == "EACCES"
    finally:
        d.stop()
        os.rmdir(os.path.join(base, "run"))
        os.rmdir(base)


@needs_root
def test_other_user_is_refused_by_peer_credentials(tmp_path: Path, daemon_factory: Any) -> None:
    root = tmp_path / "models"
    sd = save_ckpt(root / "a", seed=31)
    base = tempfile.mkdtemp(prefix="fastckpt-serve-")
    os.chmod(base, 0o711)
    run = os.path.join(base, "run")
    os.mkdir(run, 0o711)
    try:
        # the socket is reachable by everyone; only uid 4242 is allowed besides the owner
        d = daemon_factory(str(root), "4MiB", "--allow-uid", "4242", socket_path=run + "/sock")
        reply = _as_nobody(d.socket)
        assert reply.startswith("REPLY") and '"denied"' in reply
        assert d.proc.poll() is None
        assert _stats(d.socket)["refused_peers"] == 1
        assert same(load_via_server(root / "a", server=d.socket), sd)
    finally:
        d.stop()
        os.rmdir(run)
        os.rmdir(base)


def test_sigterm_shuts_down_cleanly(tmp_path: Path) -> None:
    root = tmp_path / "models"
    save_ckpt(root / "a", seed=32)
    d = start_daemon(str(tmp_path / "run" / "sock"), str(root), "4MiB")
    assert load_via_server(root / "a", server=d.socket) is not None
    assert d.stop() == 0
    assert not os.path.exists(d.socket)


def test_tied_weights_and_device_maps(tmp_path: Path, daemon_factory: Any) -> None:
    root = tmp_path / "models"
    base = torch.arange(4096, dtype=torch.float32).reshape(64, 64)
    sd = {"emb.weight": base, "head.weight": base, "norm": torch.ones(64, dtype=torch.bfloat16)}
    fastckpt.save(sd, str(root / "tied"), progress=False)
    d = daemon_factory(str(root))
    got = load_via_server(root / "tied", {"": "cpu"}, server=d.socket)
    assert got is not None and same(got, sd)
    assert got["head.weight"] is got["emb.weight"]


@pytest.mark.gpu
def test_gpu_load_copies_from_the_mapping(tmp_path: Path, daemon_factory: Any) -> None:
    root = tmp_path / "models"
    sd = save_ckpt(root / "a", seed=50)
    d = daemon_factory(str(root))
    got, st = load_via_server(root / "a", "cuda:0", stats=True, server=d.socket)
    assert st.path_taken == "daemon"
    assert all(t.device.type == "cuda" for t in got.values())
    assert same({k: v.cpu() for k, v in got.items()}, sd)


def test_daemon_killed_at_random_points_under_load(tmp_path: Path, daemon_factory: Any) -> None:
    root = tmp_path / "models"
    paths = [str(root / f"m{i}") for i in range(3)]
    for i, p in enumerate(paths):
        save_ckpt(Path(p), seed=60 + i, rows=20000)
    want = {p: _expected_digest(p) for p in paths}
    rng = random.Random(11)
    d = daemon_factory(str(root), "8MiB")
    clients = [ClientProc(d.socket, [rng.choice(paths) for _ in range(12)], 3.0) for _ in range(4)]
    for _ in range(2):  # kill -9 while clients load, then restart on the same socket
        time.sleep(rng.uniform(0.2, 1.0))
        os.kill(d.pid, signal.SIGKILL)
        d.proc.wait(10)
        d = daemon_factory(str(root), "8MiB", socket_path=d.socket)
    rows = [row for c in clients for row in c.result(timeout=120)]
    assert len(rows) == 48 and all(r["digest"] == want[r["path"]] for r in rows)
    s = _wait_idle(d.socket)
    assert s["used_bytes"] <= s["capacity_bytes"] and s["memfds"] == d.memfds()


def test_received_memfds_are_sealed_against_every_writer(
    tmp_path: Path, daemon_factory: Any
) -> None:
    import mmap

    from fastckpt.serve import names

    root = tmp_path / "models"
    save_ckpt(root / "a", seed=70)
    d = daemon_factory(str(root))
    index, stamped = names.read_consistent(str((root / "a").resolve()))
    with Client(d.socket) as c:
        reply, fds = c.get(root / "a", names.identity(index, stamped))
    try:
        assert len(fds) == len(reply["sizes"]) == len(index.partitions)
        fd = fds[0]
        with pytest.raises(PermissionError):
            mmap.mmap(fd, reply["sizes"][0], flags=mmap.MAP_SHARED)  # shared + writable
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"x", 0)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
        before = os.pread(fd, 64, 0)
        private = mmap.mmap(fd, reply["sizes"][0], flags=mmap.MAP_PRIVATE)
        private[0:64] = bytes(255 - b for b in before)  # copy-on-write: this mapping only
        assert os.pread(fd, 64, 0) == before and private[0:64] != before
        private.close()
    finally:
        protocol.close_fds(fds)


def _memfd_fds_and_maps() -> tuple[int, int]:
    fds = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds += os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:fastckpt")
        except OSError:
            continue
    with open("/proc/self/maps") as f:
        maps = sum("/memfd:fastckpt" in line for line in f)
    return fds, maps


def test_client_holds_memfds_only_while_its_tensors_live(
    tmp_path: Path, daemon_factory: Any
) -> None:
    import gc

    root = tmp_path / "models"
    sd = save_ckpt(root / "a", seed=80)
    d = daemon_factory(str(root))
    # other tests of this process may hold memfds of their own (a Loader's pool): count ours
    gc.collect()
    fds0, maps0 = _memfd_fds_and_maps()
    got = load_via_server(root / "a", server=d.socket)
    assert same(got, sd)
    fds, maps = _memfd_fds_and_maps()
    # the received descriptors are closed; CPython's mmap keeps one duplicate per mapping
    assert 0 < fds - fds0 <= len(fastckpt.read_index(root / "a").partitions) and maps > maps0
    del got
    gc.collect()
    assert _memfd_fds_and_maps() == (fds0, maps0)
