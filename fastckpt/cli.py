"""Command line: ``fastckpt <command> ...`` and ``fastckpt-convert SRC DST``.

Subcommands are plain data: a ``Command`` (name, help, a function that adds its arguments to an
``argparse`` parser, a function that runs it and returns the exit status) in the module-level
``COMMANDS`` list. ``register()`` adds one, so other modules can plug in (``bench``, ``demo``).

Every command is a thin shell over the public API. Expected failures (a malformed checkpoint, a
destination that exists, an I/O error, a bad argument) print ``fastckpt: error: <message>`` to
stderr and exit with status 1, never a traceback; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastckpt.config import get_config
from fastckpt.errors import FastckptError
from fastckpt.rules import units

PROG = "fastckpt"


class UsageError(Exception):
    """A command-line argument is invalid (reported like any other error, exit status 1)."""


@dataclass(frozen=True)
class Command:
    """One subcommand of ``fastckpt``."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: list[Command] = []


def register(
    name: str,
    help: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
) -> Command:
    """Add (or replace) the subcommand ``name``; commands are listed in registration order."""
    cmd = Command(name, help, add_arguments, run)
    for i, existing in enumerate(COMMANDS):
        if existing.name == name:
            COMMANDS[i] = cmd
            return cmd
    COMMANDS.append(cmd)
    return cmd


# --- argument parsing helpers -------------------------------------------------------------------


parse_size = units.size_arg  # argparse type for sizes (fastckpt.rules.units)


def parse_device_map(text: str) -> dict[str, Any]:
    """A device map given as inline JSON or as the path of a JSON file."""
    if os.path.isfile(text):
        try:
            with open(text, encoding="utf-8") as f:
                value = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UsageError(f"--device-map: cannot read JSON from file {text!r}: {exc}") from None
    else:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(
                f"--device-map: {text!r} is neither a JSON object nor an existing file ({exc})"
            ) from None
    if not isinstance(value, dict):
        raise UsageError(
            "--device-map must be a JSON object mapping tensor-name prefixes to devices, e.g. "
            '\'{"model.layers.0": "cuda:0", "": "cuda:1"}\''
        )
    return value


def parse_metadata(pairs: Sequence[str] | None) -> dict[str, str] | None:
    if not pairs:
        return None
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--metadata {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default where it has a meaningful one (not None/False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" not in text
            and default not in (None, False, argparse.SUPPRESS)
            and action.option_strings
        ):
            text += " (default: %(default)s)"
        return text


# --- convert ------------------------------------------------------------------------------------


def _add_convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="source checkpoint: file or directory, or an s3:// or https:// URL")
    p.add_argument("dst", help="fastckpt checkpoint directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")
    p.add_argument(
        "--partition-size",
        type=parse_size,
        metavar="SIZE",
        default=None,
        help="size cap of one partition file, e.g. 4GB or 4GiB (default: config partition_bytes)",
    )
    p.add_argument(
        "--device-map",
        metavar="JSON|FILE",
        default=None,
        help="tensor-name prefix -> device, as inline JSON or a JSON file ('' is the default)",
    )
    p.add_argument(
        "--metadata",
        metavar="KEY=VALUE",
        action="extend",
        nargs="+",
        default=None,
        help="metadata stored in the index (repeatable)",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="never show a progress bar (by default one is shown when stderr is a terminal)",
    )


def _run_convert(args: argparse.Namespace) -> int:
    from fastckpt.loader.remotefiles import convert  # local paths and s3://, https:// URLs

    device_map = parse_device_map(args.device_map) if args.device_map is not None else None
    metadata = parse_metadata(args.metadata)
    start = time.perf_counter()
    from fastckpt.format.atomic import Terminated, sigterm_raises

    try:
        with sigterm_raises():  # SIGTERM cleans up the temporary folder, as Ctrl-C does
            index = convert(
                args.src,
                args.dst,
                overwrite=args.overwrite,
                partition_bytes=args.partition_size,
                device_map=device_map,
                metadata=metadata,
                progress=False if args.no_progress else None,
            )
    except Terminated:
        print("fastckpt: terminated; nothing was written", file=sys.stderr)
        return 143
    elapsed = time.perf_counter() - start
    nbytes = index.nbytes
    rate = f", {units.format_rate(nbytes, elapsed)}" if elapsed > 0 else ""
    print(
        f"converted {args.src} -> {index.root}: {len(index.tensors)} tensors"
        f"{f' (+{len(index.aliases)} aliases)' if index.aliases else ''}, "
        f"{units.format_bytes(nbytes)} in {len(index.partitions)} partition(s), "
        f"{len(index.files)} carried file(s); {elapsed:.2f} s{rate}"
    )
    return 0


# --- info / verify ------------------------------------------------------------------------------


def _add_info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="checkpoint directory (or .safetensors file / shards)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _run_info(args: argparse.Namespace) -> int:
    from fastckpt.format.info import info

    summary = info(args.path)
    if args.json:
        print(json.dumps(_jsonable(summary), indent=2, sort_keys=False))
    else:
        print(str(summary))
    return 0


def _jsonable(value: Any) -> Any:
    """Plain JSON data from a summary object (dataclasses, named tuples, mappings, tuples)."""
    import dataclasses
    from collections.abc import Mapping

    method = getattr(value, "to_dict", None)
    if callable(method):
        return _jsonable(method())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple) and hasattr(value, "_asdict"):
        return {k: _jsonable(v) for k, v in value._asdict().items()}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _add_verify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "path",
        help="a fastckpt checkpoint directory (every chunk checksum is checked); a .safetensors "
        "file or a directory of shards is accepted too, but stores no checksums, so only its "
        "structure is checked",
    )


def _run_verify(args: argparse.Namespace) -> int:
    from fastckpt.format.verify import verify

    result = verify(args.path)
    if result.checksums:
        print(
            f"{result.path}: OK, {result.chunks} chunk(s) in {result.partitions} partition(s), "
            f"{units.format_bytes(result.nbytes)} in {result.seconds:.2f} s "
            f"({units.format_rate(result.nbytes, result.seconds)})"
        )
    else:
        print(result)
    return 0


register(
    "convert", "convert a checkpoint to the fastckpt format", _add_convert_arguments, _run_convert
)
register("info", "summarize a checkpoint", _add_info_arguments, _run_info)
register(
    "verify",
    "check every chunk checksum of a fastckpt checkpoint (names the first bad chunk)",
    _add_verify_arguments,
    _run_verify,
)


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from fastckpt import demo

    demo.add_arguments(parser)


def _run_demo(args: argparse.Namespace) -> int:
    from fastckpt import demo

    return demo.run(args)


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from fastckpt.bench import cli as bench_cli

    bench_cli.add_arguments(parser)


def _run_bench(args: argparse.Namespace) -> int:
    from fastckpt.bench import cli as bench_cli

    return bench_cli.run(args)


register(
    "demo",
    "generate a small checkpoint, convert it, load it, check it bit for bit",
    _add_demo_arguments,
    _run_demo,
)
register(
    "bench",
    "measure fastckpt beside safetensors, torch.load and installed peers",
    _add_bench_arguments,
    _run_bench,
)


# fastckpt cache: the SSD tier and read-mode profile (fastckpt.cachecli), and the cache
# daemon when one is configured (fastckpt.serve.cli: prefetch, evict, stats, and ls via --server)
_DAEMON_ACTIONS = ("prefetch", "evict", "stats")


def _add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    from fastckpt.cachecli import add_arguments
    from fastckpt.serve.cli import add_daemon_actions

    server_help = "cache daemon socket (default: FASTCKPT_SERVER)"
    parser.add_argument("--server", metavar="PATH", help=server_help)
    parser.add_argument("--json", action="store_true", help="print JSON")
    actions = add_arguments(parser)
    add_daemon_actions(actions)
    # --server and --json work before the action and after it (`cache stats --server S`)
    for name in ("ls", *_DAEMON_ACTIONS):
        actions.choices[name].add_argument(
            "--server", metavar="PATH", default=argparse.SUPPRESS, help=server_help
        )


def _run_cache(args: argparse.Namespace) -> int:
    action = args.cache_command
    local_ls = action == "ls" and (
        getattr(args, "dir", None) or not (args.server or get_config().server)
    )
    if action in _DAEMON_ACTIONS or (action == "ls" and not local_ls):
        from fastckpt.serve.cli import run_cache

        return run_cache(args)
    from fastckpt.cachecli import run

    return run(args)


register(
    "cache",
    "the SSD tier (ls, size, clear), the read-mode profile (profile, probe) and the cache "
    "daemon (prefetch, evict, stats; ls with --server)",
    _add_cache_arguments,
    _run_cache,
)


# fastckpt.sched: calibrate this machine's tiers, estimate a checkpoint's load time
def _sched_cli() -> Any:
    from fastckpt.sched import cli as sched_cli

    return sched_cli


register(
    "calibrate",
    "measure this machine's load tiers and write the scheduler's profile",
    lambda p: _sched_cli().add_calibrate_arguments(p),
    lambda a: _sched_cli().run_calibrate(a),
)
register(
    "estimate",
    "estimate a checkpoint's load time per tier from the profile",
    lambda p: _sched_cli().add_estimate_arguments(p),
    lambda a: _sched_cli().run_estimate(a),
)


# --- serve / cache (cache daemon: fastckpt/serve/cli.py) ---------------------------------------


def _serve_cli() -> Any:
    from fastckpt.serve import cli as serve_cli

    return serve_cli


register(
    "serve",
    "run the machine-wide checkpoint cache daemon (foreground)",
    lambda p: _serve_cli().add_serve_arguments(p),
    lambda a: _serve_cli().run_serve(a),
)


# --- vllm-export (fastckpt/integrations/vllm/cli.py; runs vLLM) ---------------------------------


def _vllm_cli() -> Any:
    from fastckpt.integrations.vllm import cli as vllm_cli

    return vllm_cli


register(
    "vllm-export",
    "run vLLM once and save each tensor-parallel rank's weights as vLLM holds them "
    "(load with --load-format fastckpt)",
    lambda p: _vllm_cli().add_arguments(p),
    lambda a: _vllm_cli().run(a),
)


# --- entry points -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from fastckpt import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Load model checkpoints as fast as the hardware allows: convert them to "
        "the loading-optimized format, inspect and verify them, measure loads, run the "
        "machine-wide cache daemon, estimate start times. `fastckpt COMMAND --help` for each.",
    )
    parser.add_argument("--version", action="version", version=f"fastckpt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for cmd in COMMANDS:
        p = sub.add_parser(
            cmd.name, help=cmd.help, description=cmd.help, formatter_class=_HelpFormatter
        )
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


# Python keyword arguments named in library messages, as the command line spells them.
_CLI_WORDS = (
    (re.compile(r"overwrite=True \(CLI: --overwrite\)"), "--overwrite"),
    (re.compile(r"\boverwrite=True\b"), "--overwrite"),
    (re.compile(r"\bpartition_bytes=?"), "--partition-size "),
    (re.compile(r"\bdevice_map=?"), "--device-map "),
)


def _cli_words(message: str) -> str:
    for pattern, words in _CLI_WORDS:
        message = pattern.sub(words, message)
    return message.replace("  ", " ")


def _error_message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        return _cli_words(f"{exc.filename}: {exc.strerror}")
    return _cli_words(str(exc) or type(exc).__name__)


def _stdout_reader_gone() -> bool:
    """Whether standard output is a pipe or socket whose reading end is closed."""
    import select

    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (a test's capture)
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def _discard_stdout() -> None:
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (a test's capture)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _execute(parser: argparse.ArgumentParser, argv: Sequence[str] | None, prog: str) -> int:
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        status: int = args._run(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return status
    except BrokenPipeError as exc:
        if not _stdout_reader_gone():  # another pipe or socket (the daemon's): an error
            print(f"{prog}: error: {_error_message(exc)}", file=sys.stderr)
            return 1
        # The reader closed the pipe (`fastckpt info X --json | head -1`): it has what it wanted,
        # a normal end. Output still buffered goes nowhere, so that exit does not fail again.
        _discard_stdout()
        return 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (FastckptError, OSError, ValueError, UsageError) as exc:
        print(f"{prog}: error: {_error_message(exc)}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """``fastckpt COMMAND ...``; returns the exit status."""
    return _execute(build_parser(), argv, PROG)


def convert_main(argv: Sequence[str] | None = None) -> int:
    """``fastckpt-convert SRC DST [options]`` (the same options as ``fastckpt convert``)."""
    parser = argparse.ArgumentParser(
        prog="fastckpt-convert",
        description="Convert a checkpoint to the fastckpt format.",
        formatter_class=_HelpFormatter,
    )
    _add_convert_arguments(parser)
    parser.set_defaults(_run=_run_convert)
    return _execute(parser, argv, PROG)


__all__ = [
    "COMMANDS",
    "Command",
    "UsageError",
    "build_parser",
    "convert_main",
    "main",
    "parse_device_map",
    "parse_metadata",
    "parse_size",
    "register",
]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
