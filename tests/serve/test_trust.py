"""Who a client trusts: a daemon of another user, a socket directory others can write, and a
daemon of the client's own uid that serves wrong bytes (``verify=True`` checks what arrives)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import fastckpt
from fastckpt.loader.api import load_via_server
from fastckpt.serve.client import ServerUnavailableWarning

from . import _forger
from .conftest import same, save_ckpt

FORGER = str(Path(__file__).with_name("_forger.py"))
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")


def _sizes(path: Path) -> list[int]:
    return [p.nbytes for p in fastckpt.read_index(path).partitions]


@pytest.fixture
def shared_dir() -> Iterator[str]:
    """A sticky, world-writable directory (like /tmp) that another user can reach."""
    base = tempfile.mkdtemp(prefix="fastckpt-trust-")
    os.chmod(base, 0o711)
    shared = os.path.join(base, "shared")
    os.mkdir(shared)
    os.chmod(shared, 0o1777)
    try:
        yield shared
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _as_nobody(args: list[str]) -> subprocess.Popen[str]:
    import pwd

    nobody = pwd.getpwnam("nobody")

    def drop() -> None:
        os.setgroups([])
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)

    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("no system python3 that another user can run")
    return subprocess.Popen(
        [python, "-I", "-S", *args],
        preexec_fn=drop,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
    )


@needs_root
def test_a_daemon_of_another_user_is_not_trusted(tmp_path: Path, shared_dir: str) -> None:
    """Another local user binds the socket path first and serves sealed memfds of its own
    bytes; a root client loading with verify=True must not take them."""
    root = tmp_path / "models"
    sd = save_ckpt(root / "a", seed=90)
    sock = os.path.join(shared_dir, "fastckpt.sock")
    forger = _as_nobody(
        [FORGER, sock, str(root.resolve()), json.dumps(_sizes(root / "a")), "forge"]
    )
    try:
        assert forger.stdout is not None and forger.stdout.readline().strip() == "ready"
        assert os.stat(sock).st_uid != 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = load_via_server(root / "a", verify=True, server=sock, timeout_s=5)
            loaded, st = fastckpt.Loader(server=sock, server_timeout_s=5).load(
                root / "a", verify=True, stats=True
            )
        assert got is None  # the client read the files itself
        assert same(loaded, sd) and st.path_taken != "daemon"
        assert any(
            issubclass(w.category, ServerUnavailableWarning) and "uid" in str(w.message)
            for w in caught
        )
        # trusting that uid on purpose (FASTCKPT_SERVER_UID) uses it; verify=True still checks
        nobody = os.stat(sock).st_uid
        with fastckpt.Loader(server=sock, server_timeout_s=5, server_uid=nobody) as trusting:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                checked, st = trusting.load(root / "a", verify=True, stats=True)
            assert same(checked, sd) and any("failed verification" in n for n in st.notes)
            taken = trusting.load(root / "a", stats=True)[1].path_taken
            assert taken == "daemon"  # the configured trust is honoured
    finally:
        forger.kill()
        forger.wait(10)
        for f in (forger.stdout, forger.stderr):
            if f is not None:
                f.close()


def test_verify_checks_the_bytes_a_same_user_daemon_sends(tmp_path: Path) -> None:
    """A daemon of the client's own uid that claims ``verified`` and sends wrong bytes: a
    verify=True load checks the received bytes against the index's checksums, reads the files
    instead and warns."""
    root = tmp_path / "models"
    sd = save_ckpt(root / "a", seed=91)
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    sock = str(run / "sock")
    stop = _forger.start_thread(sock, str(root.resolve()), _sizes(root / "a"), "forge")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # said once per process: checked by the notes
            with fastckpt.Loader(server=sock, server_timeout_s=5) as loader:
                loaded, st = loader.load(root / "a", verify=True, stats=True)
        assert same(loaded, sd) and st.path_taken != "daemon"
        assert any("failed verification" in n for n in st.notes), st.notes
        # without verify the same-uid daemon is trusted (it could write the files anyway)
        unverified = load_via_server(root / "a", server=sock, timeout_s=5)
        assert unverified is not None and not same(unverified, sd)
    finally:
        stop.set()


@pytest.mark.parametrize("mode", ["overrun", "crawl"])
def test_nonsense_or_endless_progress_is_bounded(
    tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Progress frames whose ``loaded`` passes ``total`` are a protocol error at once; progress
    that creeps forever is cut off by the whole-answer bound (``server_fill_wait_s``). Either
    way the load reads the files itself instead of waiting without end."""
    root = tmp_path / "models"
    save_ckpt(root / "a", seed=92)
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    sock = str(run / "sock")
    monkeypatch.setenv("FASTCKPT_SERVER_FILL_WAIT_S", "2")
    stop = _forger.start_thread(sock, str(root.resolve()), _sizes(root / "a"), mode)
    out: list[object] = []
    try:
        worker = threading.Thread(
            target=lambda: out.append(load_via_server(root / "a", server=sock, timeout_s=1.0)),
            daemon=True,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            worker.start()
            worker.join(30)  # a bound for the test itself, far above the 2 s configured
        assert not worker.is_alive(), "the client kept waiting on the daemon"
        assert out == [None]
    finally:
        stop.set()


@pytest.mark.parametrize("mode", [0o1777, 0o777, 0o770])
def test_daemon_refuses_a_socket_directory_others_can_write(tmp_path: Path, mode: int) -> None:
    root = tmp_path / "models"
    root.mkdir()
    run = tmp_path / "open"
    run.mkdir()
    os.chmod(run, mode)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastckpt.cli",
            "serve",
            "--socket",
            str(run / "s"),
            "--root",
            str(root),
            "--dram-budget",
            "1MiB",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert "writable by" in proc.stderr and "XDG_RUNTIME_DIR" in proc.stderr
    assert not (run / "s").exists()


def test_daemon_refuses_a_socket_directory_under_one_others_can_write(tmp_path: Path) -> None:
    """A private directory inside a non-sticky world-writable one can be renamed away by
    anyone and replaced."""
    from fastckpt.serve.daemon import ServeError, prepare_socket_dir

    outer = tmp_path / "outer"
    outer.mkdir()
    os.chmod(outer, 0o777)
    with pytest.raises(ServeError, match="writable by"):
        prepare_socket_dir(str(outer / "run" / "sock"))
    os.chmod(outer, 0o755)
    prepare_socket_dir(str(outer / "run" / "sock"))
    assert os.stat(outer / "run").st_mode & 0o777 == 0o700


# ------------------------------------------------------------------ what the daemon serves


def test_hugging_face_cache_snapshots_and_single_files_are_served(
    tmp_path: Path, daemon_factory: Any
) -> None:
    """Partitions that are links into ``../../blobs`` and a lone ``.safetensors`` file are opened
    the way a load opens them, and served."""
    import torch
    from safetensors.torch import save_file

    root = tmp_path / "models"
    repo = root / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    g = torch.Generator().manual_seed(93)
    sd = {"w": torch.randn(300, 64, generator=g), "b": torch.randn(64, generator=g)}
    save_file(sd, str(repo / "blobs" / "5f3e"))
    (snap / "model.safetensors").symlink_to("../../blobs/5f3e")
    single = {"x": torch.arange(5000, dtype=torch.float32)}
    save_file(single, str(root / "lone.safetensors"))
    d = daemon_factory(str(root), "8MiB")
    got, st = load_via_server(snap, stats=True, server=d.socket)
    assert st.path_taken == "daemon" and same(got, sd)
    got, st = load_via_server(root / "lone.safetensors", stats=True, server=d.socket)
    assert st.path_taken == "daemon" and same(got, single)


def test_a_partition_rewritten_in_place_with_its_mtime_restored_is_not_served_stale(
    tmp_path: Path, daemon_factory: Any
) -> None:
    root = tmp_path / "models"
    save_ckpt(root / "a", seed=94)
    d = daemon_factory(str(root), "8MiB", "--no-verify")
    first = load_via_server(root / "a", server=d.socket)
    assert first is not None
    part = sorted(p for p in (root / "a").iterdir() if p.name != "fastckpt.index")[0]
    st = part.stat()
    data = bytearray(part.read_bytes())
    data[4096 : 4096 + 64] = bytes(255 - b for b in data[4096 : 4096 + 64])
    with open(part, "r+b") as f:  # same inode, same size
        f.write(bytes(data))
    os.utime(part, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert part.stat().st_mtime_ns == st.st_mtime_ns and part.stat().st_ino == st.st_ino
    now = fastckpt.load(root / "a", private_copy=True)  # the files as they are
    again, stats = load_via_server(root / "a", stats=True, server=d.socket)
    assert stats.path_taken == "daemon"
    assert same(again, now) and not same(again, first)


def test_a_failed_get_pins_nothing_and_release_never_unpins_another_client(
    tmp_path: Path, daemon_factory: Any
) -> None:
    """A GET whose fill fails (here: the daemon may not grow files, RLIMIT_FSIZE) must leave no
    pin on its connection; the same checkpoint filled later for another client stays pinned by
    that client after the first one sends RELEASE, so a third cannot evict it while in use."""
    import resource

    from fastckpt.serve import names, protocol
    from fastckpt.serve.client import Client, ServerRefused

    root = tmp_path / "models"
    save_ckpt(root / "a", seed=95)
    d = daemon_factory(str(root), "8MiB")
    index, stamped = names.read_consistent(str((root / "a").resolve()))
    ident = names.identity(index, stamped)
    unlimited = resource.prlimit(d.pid, resource.RLIMIT_FSIZE)
    with Client(d.socket) as a, Client(d.socket) as b, Client(d.socket) as c:
        resource.prlimit(d.pid, resource.RLIMIT_FSIZE, (1024, unlimited[1]))
        with pytest.raises(ServerRefused, match="load_failed"):
            a.get(root / "a", ident)
        resource.prlimit(d.pid, resource.RLIMIT_FSIZE, unlimited)
        _, fds = b.get(root / "a", ident)  # same generation, filled now, pinned by b
        try:
            assert [e["pins"] for e in c.ls()["entries"]] == [1]
            a.request(protocol.RELEASE)  # after its failed GET
            assert [e["pins"] for e in c.ls()["entries"]] == [1]
            assert c.evict(root / "a") == {"evicted": 0, "in_use": 1}
        finally:
            for fd in fds:
                os.close(fd)
        b.request(protocol.RELEASE)
        assert c.evict(root / "a") == {"evicted": 1, "in_use": 0}
