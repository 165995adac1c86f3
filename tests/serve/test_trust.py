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

import pytest

import fastckpt
from fastckpt.serve.client import ServerUnavailableWarning, load_via_server

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
        assert same(loaded, sd) and st.path_taken != "server-map"
        assert any(
            issubclass(w.category, ServerUnavailableWarning) and "uid" in str(w.message)
            for w in caught
        )
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
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with fastckpt.Loader(server=sock, server_timeout_s=5) as loader:
                loaded, st = loader.load(root / "a", verify=True, stats=True)
        assert same(loaded, sd) and st.path_taken != "server-map"
        assert any("checksum" in str(w.message).lower() for w in caught), [
            str(w.message) for w in caught
        ]
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
