"""The command line: ``fastckpt convert|info|verify``, ``fastckpt-convert``, tools/convert.py."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fastckpt import cli
from fastckpt.format.reader import read_index
from fastckpt.rules.units import format_bytes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def src(tmp_path) -> Path:
    g = torch.Generator().manual_seed(0)
    sd = {
        "model.embed.weight": torch.randn(64, 16, generator=g),
        "model.layers.0.w": torch.randn(16, 16, generator=g),
        "model.layers.1.w": torch.randn(16, 16, generator=g),
        "lm_head.weight": torch.randn(64, 16, generator=g),
    }
    path = tmp_path / "m.safetensors"
    save_file(sd, path, metadata={"format": "pt"})
    return path


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_convert_info_verify(tmp_path, src, capsys) -> None:
    dst = tmp_path / "ck"
    code, out, err = run(["convert", str(src), str(dst), "--no-progress"], capsys)
    assert code == 0, err
    assert "4 tensors" in out and str(dst) in out
    assert read_index(dst).metadata["format"] == "pt"

    code, out, _ = run(["info", str(dst)], capsys)
    assert code == 0
    assert "fastckpt 1.0" in out and "tensors     4" in out

    code, out, _ = run(["info", str(dst), "--json"], capsys)
    assert code == 0
    doc = json.loads(out)
    assert doc["tensors"] == 4 and doc["kind"] == "fastckpt" and doc["version"] == [1, 0]
    assert doc["metadata"] == {"format": "pt"}

    code, out, err = run(["verify", str(dst)], capsys)
    assert code == 0 and err == ""
    assert "OK" in out and len(out.strip().splitlines()) == 1


def test_convert_options(tmp_path, src, capsys) -> None:
    dmap_file = tmp_path / "dmap.json"
    dmap_file.write_text(json.dumps({"model.layers.1": "cuda:1", "": "cuda:0"}))
    for dmap, dst in [
        (str(dmap_file), tmp_path / "a"),
        ('{"model.layers.1": "cuda:1", "": 0}', tmp_path / "b"),
    ]:
        code, _, err = run(
            [
                "convert",
                str(src),
                str(dst),
                "--partition-size",
                "4KiB",
                "--device-map",
                dmap,
                "--metadata",
                "a=1",
                "b=x=y",
                "--metadata",
                "c=",
            ],
            capsys,
        )
        assert code == 0, err
        index = read_index(dst)
        assert {"a": "1", "b": "x=y", "c": ""}.items() <= dict(index.metadata).items()
        devices = {p.device for p in index.partitions}
        assert devices == {"cuda:0", "cuda:1"}
        assert len(index.partitions) > 2


def test_existing_destination(tmp_path, src, capsys) -> None:
    dst = tmp_path / "ck"
    assert cli.main(["convert", str(src), str(dst)]) == 0
    capsys.readouterr()
    code, out, err = run(["convert", str(src), str(dst)], capsys)
    assert code == 1 and out == ""
    assert err.startswith("fastckpt: error: ") and "--overwrite" in err
    assert "overwrite=True" not in err  # the command line's words, not the API's
    assert "Traceback" not in err
    code, _, err = run(["convert", str(src), str(dst), "--overwrite"], capsys)
    assert code == 0, err


def test_verify_reports_corruption(tmp_path, src, capsys) -> None:
    dst = tmp_path / "ck"
    assert cli.main(["convert", str(src), str(dst)]) == 0
    capsys.readouterr()
    part = dst / "part-00000.fckpt"
    data = bytearray(part.read_bytes())
    data[300] ^= 0xFF
    part.write_bytes(bytes(data))
    code, out, err = run(["verify", str(dst)], capsys)
    assert code == 1 and out == ""
    assert err.startswith("fastckpt: error: ") and "part-00000.fckpt" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["verify", "{tmp}/nothing"], "nothing: no such checkpoint"),
        (["info", "{tmp}/bad"], "not a fastckpt index"),
        (["verify", "{tmp}/bad"], "not a fastckpt index"),
        (["convert", "{tmp}/nothing", "{tmp}/out"], "nothing: conversion source not found"),
        (["convert", "{tmp}/evil.pt", "{tmp}/out"], "objects other than tensors"),
        (["convert", "{src}", "{tmp}/out", "--device-map", "[1, 2]"], "JSON object"),
        (["convert", "{src}", "{tmp}/out", "--device-map", "{nope"], "neither a JSON object"),
        (["convert", "{src}", "{tmp}/out", "--device-map", '{"a": ""}'], "empty device"),
        (["convert", "{src}", "{tmp}/out", "--metadata", "novalue"], "KEY=VALUE"),
    ],
)
def test_errors_are_one_line(tmp_path, src, capsys, argv, match) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "fastckpt.index").write_bytes(b"FCKPTIDY" + bytes(40))
    torch.save({"x": argparse.Namespace()}, tmp_path / "evil.pt")
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{src}", str(src)) for a in argv]
    code, out, err = run(argv, capsys)
    assert code == 1 and out == ""
    assert err.startswith("fastckpt: error: ") and match in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv",
    [[], ["bogus"], ["convert", "only-src"], ["convert", "a", "b", "--partition-size", "4XB"]],
)
def test_usage_errors(capsys, argv) -> None:
    code, _, err = run(argv, capsys)
    assert code == 2
    assert "usage:" in err


def test_help_and_version(capsys) -> None:
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.startswith("fastckpt ")
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    for name in ("convert", "info", "verify"):
        assert name in out


def test_ctrl_c(tmp_path, src, capsys, monkeypatch) -> None:
    import fastckpt.format.convert as conv

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(conv, "convert", interrupted)
    code, _, err = run(["convert", str(src), str(tmp_path / "ck")], capsys)
    assert code == 130 and "interrupted" in err


def test_register_a_command(capsys, monkeypatch) -> None:
    monkeypatch.setattr(cli, "COMMANDS", list(cli.COMMANDS))
    seen = []

    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("--n", type=int, default=1)

    def go(args: argparse.Namespace) -> int:
        seen.append(args.n)
        return 7

    cli.register("hello", "say hello", add, go)
    assert [c.name for c in cli.COMMANDS][-1] == "hello"
    assert cli.main(["hello", "--n", "3"]) == 7
    assert seen == [3]
    cli.register("hello", "replaced", add, lambda args: 0)  # same name replaces
    assert [c.name for c in cli.COMMANDS].count("hello") == 1
    assert cli.main(["hello"]) == 0


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4096", 4096),
        ("4KiB", 4096),
        ("4k", 4000),
        ("4KB", 4000),
        ("1.5GiB", 3 << 29),
        ("2G", 2 * 10**9),
        ("512MB", 512 * 10**6),
        (" 1 MiB ", 1 << 20),
        ("1T", 10**12),
        ("1.1KB", 1100),
        ("0.1KB", 100),
    ],
)
def test_parse_size(text, value) -> None:
    assert cli.parse_size(text) == value


@pytest.mark.parametrize(
    "text", ["", "GiB", "-1", "0", "1.5", "4XB", "1e9", "0.0001KB", "1.0000001KiB"]
)
def test_parse_size_refuses(text) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_size(text)


def test_convert_main(tmp_path, src, capsys) -> None:
    assert cli.convert_main([str(src), str(tmp_path / "ck"), "--partition-size", "4K"]) == 0
    assert len(read_index(tmp_path / "ck").partitions) > 1
    capsys.readouterr()
    code = cli.convert_main([str(src), str(tmp_path / "ck")])
    assert code == 1
    assert capsys.readouterr().err.startswith("fastckpt: error: ")


def _console_script(name: str) -> str | None:
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else shutil.which(name)


def test_console_script_and_tool_subprocess(tmp_path, src) -> None:
    script = _console_script("fastckpt-convert")
    runs = [[sys.executable, str(ROOT / "tools" / "convert.py")]]
    if script is not None:
        runs.append([script])
    for i, prefix in enumerate(runs):
        dst = tmp_path / f"ck{i}"
        out = subprocess.run(
            [*prefix, str(src), str(dst)], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        assert "converted" in out.stdout
        assert out.stderr == ""  # no progress bar when stderr is not a terminal
        read_index(dst)
        again = subprocess.run(
            [*prefix, str(src), str(dst)], capture_output=True, text=True, timeout=120
        )
        assert again.returncode == 1
        assert again.stderr.startswith("fastckpt: error: ") and "Traceback" not in again.stderr
    assert script is not None or os.environ.get("CI") is None


def test_one_unit_convention_in_output(tmp_path, src, capsys) -> None:
    """convert, info and verify print sizes in decimal units (as bench does), never KiB/GiB."""
    dst = tmp_path / "ck"
    code, out_convert, _ = run(["convert", str(src), str(dst), "--no-progress"], capsys)
    assert code == 0
    code, out_info, _ = run(["info", str(dst)], capsys)
    assert code == 0
    code, out_verify, _ = run(["verify", str(dst)], capsys)
    assert code == 0
    nbytes = read_index(dst).nbytes
    assert format_bytes(nbytes) in out_convert
    assert format_bytes(nbytes) in out_info
    for out in (out_convert, out_info, out_verify):
        assert "iB" not in out
        assert " bytes in " not in out
    assert "GB/s" in out_convert and "GB/s" in out_verify


def test_help_says_what_verify_accepts_and_shows_defaults(capsys) -> None:
    assert cli.main(["verify", "--help"]) == 0
    out = capsys.readouterr().out
    assert "fastckpt checkpoint directory" in out and "safetensors" in out
    assert "checksum" in out
    assert cli.main(["bench", "--help"]) == 0
    assert "(default:" in capsys.readouterr().out
    assert cli.convert_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "terminal" in out  # --no-progress says when a bar is shown


def test_demo_without_cuda_fails_before_generating(tmp_path, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("checks the no-CUDA error")
    work = tmp_path / "demo"
    code, _, err = run(["demo", "--device", "cuda:0", "--workdir", str(work)], capsys)
    assert code == 1
    assert "CUDA is not available" in err and "--device cpu" in err
    assert not work.exists() or not any(work.iterdir())


def test_convert_shows_progress_on_a_terminal(tmp_path, src) -> None:
    """tqdm is a dependency: a plain install shows a bar when stderr is a terminal."""
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    # a terminal 80 columns wide (a fresh pty has none, and a bar then has no room)
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "fastckpt.cli", "convert", str(src), str(tmp_path / "ck")],
            stderr=follower,
            stdout=subprocess.PIPE,
            timeout=120,
            check=False,
        )
        os.close(follower)
        follower = -1
        chunks = []
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not data:
                break
            chunks.append(data)
    finally:
        if follower >= 0:
            os.close(follower)
        os.close(leader)
    assert proc.returncode == 0
    assert "%|" in b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize(
    "argv", [["info", "{ck}", "--json"], ["cache", "profile", "--json"]], ids=["info", "profile"]
)
def test_a_closed_pipe_is_a_normal_end(tmp_path, src, argv) -> None:
    """`fastckpt info X --json | head -1`: the reader is gone before the output is written."""
    ck = tmp_path / "ck"
    assert cli.main(["convert", str(src), str(ck)]) == 0
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader left before anything was written: every write is EPIPE
    try:
        out = subprocess.run(
            [sys.executable, "-m", "fastckpt.cli", *[a.replace("{ck}", str(ck)) for a in argv]],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""


def test_a_broken_pipe_elsewhere_is_an_error(capsys, monkeypatch) -> None:
    """A broken connection that is not standard output (the cache daemon's) stays an error."""
    monkeypatch.setattr(cli, "COMMANDS", list(cli.COMMANDS))

    def broken(args: argparse.Namespace) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    cli.register("pipe", "fails", lambda p: None, broken)
    code, _, err = run(["pipe"], capsys)
    assert code == 1 and err == "fastckpt: error: [Errno 32] Broken pipe\n"


def _sub_parsers(parser: argparse.ArgumentParser, path: str = "fastckpt"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{path} {name}", sub
                yield from _sub_parsers(sub, f"{path} {name}")


def test_every_command_and_action_says_what_it_does() -> None:
    """`fastckpt X --help` and `fastckpt cache Y --help` open with a description, and no option
    repeats its default."""
    found = list(_sub_parsers(cli.build_parser()))
    names = {path for path, _ in found}
    assert {"fastckpt cache stats", "fastckpt cache profile", "fastckpt cache prefetch"} <= names
    missing = [path for path, sub in found if not (sub.description or "").strip()]
    assert not missing, f"no description in --help: {missing}"
    for path, sub in found:
        text = " ".join(sub.format_help().split())
        assert not re.search(r"\(([^()]+)\) \(default: \1\)", text), path


@pytest.mark.parametrize("what", ["file", "dir", "symlink"])
def test_convert_suggests_overwrite_only_where_it_would_work(tmp_path, src, capsys, what) -> None:
    """`fastckpt convert SRC existing.safetensors` used to suggest --overwrite, which then
    refused: a destination --overwrite cannot replace gets the reason at once."""
    dst = tmp_path / "existing.safetensors"
    if what == "file":
        shutil.copy(src, dst)
    elif what == "dir":
        dst.mkdir()
        (dst / "notes.txt").write_text("mine")
    else:
        dst.symlink_to(src)
    for extra in ([], ["--overwrite"]):
        code, out, err = run(["convert", str(src), str(dst), *extra], capsys)
        assert code == 1 and out == ""
        assert "--overwrite" not in err and "only replaces a fastckpt checkpoint" in err
    if what == "file":
        assert "a file, not a directory" in err


def test_demo_output_reads_as_sentences(tmp_path, capsys) -> None:
    """No raw dict, no "[none]" that reads like an error: each line says what happened."""
    code, out, err = run(["demo", "--device", "cpu", "--workdir", str(tmp_path / "demo")], capsys)
    assert code == 0, err
    lines = {line.split(":", 1)[0]: line for line in out.splitlines() if not line[:1].isspace()}
    assert {"source", "converted", "loaded", "checked", "engine"} <= set(lines)
    assert "{" not in out and "[none]" not in out and "True" not in out
    assert "bitwise equal to the source" in lines["checked"]
    assert " MB to cpu in " in lines["loaded"] and "GB/s" in lines["loaded"]
    assert "reads" in lines["engine"]
    assert not any((tmp_path / "demo").iterdir())  # the demo's files are removed


def test_demo_has_words_for_every_byte_source() -> None:
    from fastckpt.demo import SOURCE_WORDS
    from fastckpt.loader.policy import SOURCES

    assert set(SOURCES) == set(SOURCE_WORDS)


def test_info_lists_carried_files_in_sub_folders(tmp_path, src, capsys) -> None:
    """A sentence-transformers folder carries 1_Pooling/config.json: info lists it."""
    model = tmp_path / "minilm"
    (model / "1_Pooling").mkdir(parents=True)
    shutil.copy(src, model / "model.safetensors")
    (model / "config.json").write_text('{"model_type": "bert"}')
    (model / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    ck = tmp_path / "ck"
    assert cli.main(["convert", str(model), str(ck)]) == 0
    capsys.readouterr()
    code, out, _ = run(["info", str(ck)], capsys)
    assert code == 0
    files = next(line for line in out.splitlines() if line.startswith("files"))
    assert "config.json" in files and "1_Pooling/config.json" in files
    code, out, _ = run(["info", str(ck), "--json"], capsys)
    doc = json.loads(out)
    assert doc["files"] == ["config.json"] and doc["tree"] == ["1_Pooling/config.json"]
