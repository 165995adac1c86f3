"""Serve migration targets over TCP: ``python -m fastckpt.migrate.serve``.

With ``--engine reference`` (the default) it loads a checkpoint with ``fastckpt.load_model`` into a
``ReferenceEngine``; with ``--engine vllm`` it builds an in-process vLLM engine on it
(``fastckpt.migrate.vllm.VllmEngine``; ``--vllm-arg KEY=VALUE`` sets any ``vllm.EngineArgs``
field, VALUE read as JSON when it parses as JSON). It prints one line ``listening <host> <port>`` on
stdout once it accepts connections, and serves ``TargetHost`` messages (see
``fastckpt.migrate.remote``) until SIGTERM or SIGINT, or, with ``--exit-on-stdin-eof``, until its
standard input closes (a parent process that wants the server to die with it). With
``--background-load`` it accepts connections before the weights have arrived.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastckpt.migrate.serve", description=__doc__)
    p.add_argument("--model", required=True, help="checkpoint directory (fastckpt or stock)")
    p.add_argument("--dtype", default=None, help="load dtype, e.g. bfloat16 (default: as stored)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--lease-s", type=float, default=30.0, help="free silent migrations after this")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads of the reference engine (0: torch default; vLLM binds its own "
        "threads, see VLLM_CPU_OMP_THREADS_BIND)",
    )
    p.add_argument("--background-load", action="store_true", help="accept before weights load")
    p.add_argument("--engine", choices=("reference", "vllm"), default="reference")
    p.add_argument(
        "--vllm-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a vllm.EngineArgs field for --engine vllm, e.g. max_model_len=512 (repeatable)",
    )
    p.add_argument(
        "--exit-on-stdin-eof", action="store_true", help="stop when standard input closes"
    )
    args = p.parse_args(argv)
    if args.engine == "vllm" and args.background_load:
        p.error("--background-load is not supported with --engine vllm")
    if args.engine != "vllm" and args.vllm_arg:
        p.error("--vllm-arg needs --engine vllm")
    vllm_kw = _vllm_args(p, args.vllm_arg)

    from fastckpt.migrate.transport import SocketServer

    close_engine = None
    if args.engine == "vllm":
        from fastckpt.migrate.vllm import VllmEngine

        if args.dtype is not None:
            vllm_kw.setdefault("dtype", args.dtype)
        vllm_engine = VllmEngine.from_args(args.model, **vllm_kw).start_background()
        host = vllm_engine.host(lease_s=args.lease_s).start_reaper()
        close_engine = vllm_engine.close
    else:
        import torch

        from fastckpt.migrate.reference import ReferenceEngine

        if args.threads > 0:
            torch.set_num_threads(args.threads)
        kwargs = {} if args.dtype is None else {"dtype": args.dtype}
        engine = ReferenceEngine.from_checkpoint(
            args.model, background=args.background_load, **kwargs
        )
        host = engine.host(lease_s=args.lease_s).start_reaper()
    server = SocketServer(host.handle, args.host, args.port).start()
    print(f"listening {server.host} {server.port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if args.exit_on_stdin_eof:

        def watch_stdin() -> None:
            sys.stdin.read()
            stop.set()

        threading.Thread(target=watch_stdin, daemon=True).start()
    while not stop.wait(0.5):
        pass
    server.shutdown()
    host.close()
    if close_engine is not None:
        close_engine()
    return 0


def _vllm_args(p: argparse.ArgumentParser, items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            p.error(f"--vllm-arg wants KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


if __name__ == "__main__":
    raise SystemExit(main())
