"""Each fault of the remote tier, injected by the proxy between fastckpt and a real server on
127.0.0.1: throttling, a dropped connection, a truncated or altered response, an object replaced
mid-download, missing or expired credentials, the SSD tier's disk full, Ctrl-C. Every wait is
bounded (the store timeout is 10 s, retries back off from 0.1 s)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

import fastckpt
from fastckpt.bench.localstore import RangeServer
from fastckpt.errors import (
    CacheWarning,
    ChecksumError,
    RemoteAuthError,
    RemoteError,
    RemoteExtraMissing,
)
from fastckpt.remote.store import forget_stores

from .conftest import Checkpoints, Remote, assert_same
from .faultproxy import Fault, FaultProxy


@pytest.fixture
def loader() -> Iterator[fastckpt.Loader]:
    with fastckpt.Loader() as ld:
        yield ld


def _prefix(url: str) -> str:
    return url.split("/", 3)[3]


def _first_partition(ck: Path) -> str:
    return fastckpt.read_index(ck).partitions[0].file


# ------------------------------------------------------------------------------ throttling


def test_503_slowdown_is_retried_with_backoff(
    remote: Remote, checkpoints: Checkpoints, loader: fastckpt.Loader
) -> None:
    url = remote.upload(checkpoints.fck)
    remote.proxy.add(Fault("slowdown", times=3))
    t0 = time.monotonic()
    got = loader.load(url, "cpu")
    assert_same(got, checkpoints.state)
    assert remote.proxy.fired("slowdown") == 3
    # backoff, not a busy loop: three throttled attempts wait at least 0.05 s in all
    assert time.monotonic() - t0 >= 0.05


def test_throttling_that_never_ends_fails_after_the_retries(
    remote: Remote, checkpoints: Checkpoints, loader: fastckpt.Loader, monkeypatch
) -> None:
    monkeypatch.setenv("FASTCKPT_REMOTE_RETRIES", "2")
    url = remote.upload(checkpoints.st_file)
    remote.proxy.add(Fault("slowdown", times=1000))
    with pytest.raises(RemoteError) as e:
        loader.load(url, "cpu")
    assert "SlowDown" in str(e.value) and url in str(e.value)


# ------------------------------------------------------------------------------ broken responses


@pytest.mark.parametrize("kind", ["fck", "st_file"])
def test_a_dropped_connection_resumes_where_it_stopped(
    remote: Remote, checkpoints: Checkpoints, loader: fastckpt.Loader, kind: str
) -> None:
    local = getattr(checkpoints, kind)
    url = remote.upload(local)
    target = _first_partition(local) if kind == "fck" else ""
    drop = remote.proxy.add(Fault("drop", keep=10_000, path_contains=target))
    got = loader.load(url, "cpu")
    assert_same(got, checkpoints.state)
    assert drop.fired == 1
    # the next request for that object asks for the first byte it did not get, onwards
    lo, hi = map(int, re.fullmatch(r"bytes=(\d+)-(\d+)", drop.fired_ranges[0]).groups())
    resumed = f"bytes={lo + 10_000}-{hi}"
    assert any(r == resumed for _, _, r in remote.proxy.log), (resumed, remote.proxy.log)


@pytest.mark.parametrize("kind", ["fck", "st_file"])
def test_a_truncated_response_is_refused_and_fetched_again(
    remote: Remote, checkpoints: Checkpoints, loader: fastckpt.Loader, kind: str
) -> None:
    url = remote.upload(getattr(checkpoints, kind))
    remote.proxy.add(Fault("truncate", keep=1000, times=2, after=1))
    got = loader.load(url, "cpu")
    assert_same(got, checkpoints.state)
    assert remote.proxy.fired("truncate") == 2


def test_an_altered_chunk_is_refused_by_its_crc32c_and_fetched_again(
    remote: Remote, checkpoints: Checkpoints, loader: fastckpt.Loader
) -> None:
    url = remote.upload(checkpoints.fck)
    remote.proxy.add(Fault("corrupt", keep=777, path_contains=_first_partition(checkpoints.fck)))
    got = loader.load(url, "cpu")
    assert_same(got, checkpoints.state)
    assert remote.proxy.fired("corrupt") == 1


def test_a_chunk_altered_every_time_fails_with_a_checksum_error(
    remote: Remote, checkpoints: Checkpoints, loader: fastckpt.Loader, monkeypatch
) -> None:
    monkeypatch.setenv("FASTCKPT_REMOTE_RETRIES", "1")
    part = _first_partition(checkpoints.fck)
    url = remote.upload(checkpoints.fck)
    remote.proxy.add(Fault("corrupt", keep=5, path_contains=part, times=1000))
    with pytest.raises(ChecksumError) as e:
        loader.load(url, "cpu")
    assert part in str(e.value) and e.value.offset == 0


def test_a_stalled_server_is_timed_out_and_retried(
    remote: Remote, checkpoints: Checkpoints, loader: fastckpt.Loader, monkeypatch
) -> None:
    monkeypatch.setenv("FASTCKPT_REMOTE_TIMEOUT_S", "0.5")
    url = remote.upload(checkpoints.st_file)
    remote.proxy.add(Fault("stall", seconds=3, after=1))
    got = loader.load(url, "cpu")
    assert_same(got, checkpoints.state)
    assert remote.proxy.fired("stall") == 1


# ------------------------------------------------------------------------------ replaced objects


def test_a_checkpoint_replaced_mid_download_loads_the_new_generation_whole(
    remote: Remote, checkpoints: Checkpoints, loader: fastckpt.Loader
) -> None:
    url = remote.upload(checkpoints.fck)
    prefix = _prefix(url)

    def replace() -> None:
        remote.s3.upload_tree(str(checkpoints.fck2), prefix)

    # the second GET of a partition replaces every object first (the request then sees the
    # new generation); ranges fetched before are of the old one
    remote.proxy.add(Fault("hook", after=1, path_contains=".fckpt", action=replace))
    got = loader.load(url, "cpu")
    assert remote.proxy.fired("hook") == 1
    assert_same(got, checkpoints.state2)  # never a mix of the two generations


def test_a_file_replaced_mid_download_over_http_is_never_mixed(
    checkpoints: Checkpoints, loader: fastckpt.Loader, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("FASTCKPT_REMOTE_RANGE_BYTES", str(64 << 10))
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(checkpoints.st_file, served / "m.safetensors")

    def replace() -> None:
        tmp = served / ".new"
        shutil.copy(checkpoints.st_file2, tmp)
        os.replace(tmp, served / "m.safetensors")  # a new inode: a new ETag

    with RangeServer(str(served)) as server, FaultProxy(server.url.split("//")[1]) as proxy:
        proxy.add(Fault("hook", after=2, action=replace))
        got = loader.load(f"{proxy.url}/m.safetensors", "cpu")
        assert proxy.fired("hook") == 1
    assert_same(got, checkpoints.state2)


# ------------------------------------------------------------------------------ credentials


def test_missing_credentials_name_the_bucket_without_a_hang(
    remote: Remote, checkpoints: Checkpoints, loader: fastckpt.Loader, monkeypatch
) -> None:
    url = remote.upload(checkpoints.st_file)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    t0 = time.monotonic()
    with pytest.raises(RemoteAuthError) as e:
        loader.load(url, "cpu")
    assert time.monotonic() - t0 < 30
    assert isinstance(e.value, PermissionError) and e.value.errno == errno.EACCES
    assert "'models'" in str(e.value) and "AWS_ACCESS_KEY_ID" in str(e.value)
    assert remote.proxy.requests == 0  # nothing was sent unsigned


@pytest.mark.parametrize("when", ["first request", "mid-download"])
def test_an_expired_token_names_the_bucket_and_is_not_retried(
    remote: Remote, checkpoints: Checkpoints, loader: fastckpt.Loader, when: str
) -> None:
    url = remote.upload(checkpoints.fck)
    if when == "first request":
        remote.proxy.add(Fault("expired", method="", ranged_only=False, times=1000))
    else:
        part = _first_partition(checkpoints.fck)
        remote.proxy.add(Fault("expired", path_contains=part, times=1000))
    with pytest.raises(RemoteAuthError) as e:
        loader.load(url, "cpu")
    # (a HEAD's answer has no body: then only its status names the refusal)
    assert re.search("ExpiredToken|403", str(e.value)) and "'models'" in str(e.value)
    assert remote.proxy.fired("expired") == 1  # refused once: not a retry loop


def test_without_boto3_the_error_names_the_extra(
    remote: Remote, checkpoints: Checkpoints, loader: fastckpt.Loader, monkeypatch
) -> None:
    forget_stores()
    for name in [m for m in sys.modules if m == "boto3" or m.startswith("boto3.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "boto3", None)  # import boto3 -> ImportError
    try:
        with pytest.raises(
            RemoteExtraMissing, match=re.escape("'remote' extra (fastckpt-loader[remote])")
        ):
            loader.load("s3://models/any.safetensors", "cpu")
    finally:
        forget_stores()


# ------------------------------------------------------------------------------ the SSD tier


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 128 KiB tmpfs: a real ENOSPC for the SSD tier (the checkpoint is about 330 KB)."""
    where = tmp_path / "tiny"
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        with contextlib.suppress(Exception):
            subprocess.run(["umount", str(where)], check=True, capture_output=True)


def test_a_full_ssd_disk_streams_the_load_and_keeps_nothing_half_written(
    remote: Remote, checkpoints: Checkpoints, tiny_disk: Path
) -> None:
    url = remote.upload(checkpoints.fck)
    ssd = tiny_disk / "ssd"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with fastckpt.Loader(ssd_tier_bytes=64 << 20, ssd_tier_dir=str(ssd)) as ld:
            for _ in range(2):
                got, stats = ld.load(url, "cpu", stats=True)
                assert_same(got, checkpoints.state)
                assert stats.path_taken.startswith("stream")
            assert ld.prefetch(url, tier="ssd").result(timeout=60) is False
    assert [p for p in os.listdir(ssd) if not p.startswith(".lock-")] == []
    said = [str(w.message) for w in caught if issubclass(w.category, CacheWarning)]
    assert len(said) == 1 and "space" in said[0], said  # said once, not per load


# ------------------------------------------------------------------------------ Ctrl-C


_INTERRUPTED = textwrap.dedent(
    """
    import signal, sys, fastckpt
    # Ctrl-C raises here even when the suite runs as a background job, which ignores SIGINT
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with fastckpt.Loader(ssd_tier_bytes=64 << 20, ssd_tier_dir=sys.argv[2]) as ld:
        try:
            ld.load(sys.argv[1], "cpu")
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            raise
    """
)


def test_ctrl_c_during_a_download_stops_it_and_leaves_no_entry(
    remote: Remote, checkpoints: Checkpoints, tmp_path: Path
) -> None:
    url = remote.upload(checkpoints.fck)
    ssd = tmp_path / "ssd"
    # every data range of the last partition stalls: the load is mid-download
    last = fastckpt.read_index(checkpoints.fck).partitions[-1].file
    remote.proxy.add(Fault("stall", seconds=8, path_contains=last, times=1000))
    env = {**os.environ, "FASTCKPT_REMOTE_TIMEOUT_S": "30"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _INTERRUPTED, url, str(ssd)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while remote.proxy.fired("stall") == 0 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        assert remote.proxy.fired("stall") > 0
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)  # stopped, not left to finish the download
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0 and "interrupted" in out, err
    assert "KeyboardInterrupt" in err
    # nothing a later load would trust; the tier cleans the leftovers of the dead process
    with fastckpt.Loader(ssd_tier_bytes=64 << 20, ssd_tier_dir=str(ssd)) as ld:
        assert ld.ssd_tier is not None and ld.ssd_tier.entries_from(url) == []
        assert [p for p in os.listdir(ssd) if not p.startswith(".lock-")] == []
        remote.proxy.clear()
        assert_same(ld.load(url, "cpu"), checkpoints.state)
