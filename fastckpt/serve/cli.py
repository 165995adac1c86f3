"""``fastckpt serve`` (the daemon, foreground) and ``fastckpt cache ls|prefetch|evict|stats``
(talking to it). Registered in ``fastckpt.cli`` with a few lines.

Settings come from flags, then a TOML config file (``--config``: keys ``socket``, ``roots``,
``dram_budget``, ``allow_uids``, ``allow_gids``, ``verify``), then the environment
(``FASTCKPT_SERVER`` is the socket path, for the daemon and its clients alike).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from typing import Any

from fastckpt.config import get_config
from fastckpt.rules.units import format_bytes


class _Usage(ValueError):
    pass


# ------------------------------------------------------------------------------ serve


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    from fastckpt.rules.units import size_arg as parse_size

    p.add_argument("--socket", metavar="PATH", help="Unix socket path (default: FASTCKPT_SERVER)")
    p.add_argument(
        "--root",
        metavar="DIR",
        action="append",
        dest="roots",
        help="serve checkpoints under DIR (repeatable)",
    )
    p.add_argument("--dram-budget", metavar="SIZE", type=parse_size, help="e.g. 32GiB")
    p.add_argument(
        "--allow-uid",
        metavar="UID",
        type=int,
        action="append",
        dest="allow_uids",
        default=None,
        help="also serve this user id (repeatable; the daemon's own uid is always allowed)",
    )
    p.add_argument(
        "--allow-gid",
        metavar="GID",
        type=int,
        action="append",
        dest="allow_gids",
        default=None,
        help="also serve peers whose primary group id is GID (repeatable)",
    )
    p.add_argument("--no-verify", action="store_true", help="skip chunk checksums while filling")
    p.add_argument("--config", metavar="FILE", help="TOML file with the same settings")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def _config_file(path: str) -> dict[str, Any]:
    try:
        import tomllib
    except ImportError as exc:  # Python 3.10
        raise _Usage("--config needs Python 3.11 (tomllib); use flags instead") from exc
    with open(path, "rb") as f:
        data = tomllib.load(f)
    known = {"socket", "roots", "dram_budget", "allow_uids", "allow_gids", "verify"}
    unknown = set(data) - known
    if unknown:
        raise _Usage(f"{path}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
    return data


def serve_config(args: argparse.Namespace) -> Any:
    from fastckpt.rules.units import size_arg as parse_size
    from fastckpt.serve.daemon import ServeConfig

    file = _config_file(args.config) if args.config else {}
    socket_path = args.socket or file.get("socket") or get_config().server
    if not socket_path:
        raise _Usage("no socket: give --socket PATH, 'socket' in --config, or FASTCKPT_SERVER")
    roots = args.roots or file.get("roots")
    if not roots or not isinstance(roots, list):
        raise _Usage("no checkpoint root: give --root DIR (repeatable) or 'roots' in --config")
    budget = args.dram_budget
    if budget is None and "dram_budget" in file:
        raw = file["dram_budget"]
        budget = raw if isinstance(raw, int) else parse_size(str(raw))
    if budget is None:
        raise _Usage("no DRAM budget: give --dram-budget SIZE or 'dram_budget' in --config")
    uids = args.allow_uids if args.allow_uids is not None else file.get("allow_uids", [])
    gids = args.allow_gids if args.allow_gids is not None else file.get("allow_gids", [])
    verify = not args.no_verify and bool(file.get("verify", True))
    return ServeConfig(
        socket_path=str(socket_path),
        roots=[str(r) for r in roots],
        dram_budget_bytes=int(budget),
        allow_uids=frozenset(int(u) for u in uids),
        allow_gids=frozenset(int(g) for g in gids),
        verify=verify,
    )


def run_serve(args: argparse.Namespace) -> int:
    from fastckpt.serve.daemon import Daemon, ServeError

    logging.basicConfig(
        level=args.log_level.upper(), format="fastckpt serve: %(levelname)s %(message)s"
    )
    try:
        daemon = Daemon(serve_config(args))
        daemon.bind()
    except (ServeError, _Usage) as exc:
        print(f"fastckpt: error: {exc}", file=sys.stderr)
        return 1

    def on_signal(signum: int, frame: Any) -> None:
        daemon.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    daemon.serve_forever()
    return 0


# ------------------------------------------------------------------------------ cache


def add_daemon_actions(sub: Any) -> None:
    """Add the daemon's actions to ``fastckpt cache``'s subparsers (``ls`` is shared with the SSD
    tier: ``fastckpt cache --server PATH ls`` lists the daemon's entries)."""

    def action(name: str, text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(name, help=text, description=text)
        return parser

    pre = action("prefetch", "daemon: load checkpoints into the daemon's DRAM")
    pre.add_argument("paths", nargs="+", metavar="PATH", help="checkpoints under its roots")
    ev = action("evict", "daemon: drop checkpoints from its DRAM (not those in use)")
    ev.add_argument("paths", nargs="*", metavar="PATH", help="checkpoints to drop")
    ev.add_argument("--all", action="store_true", help="evict everything not in use")
    st = action("stats", "daemon: hits, misses, bytes, evictions, budget")
    for p in (pre, ev, st):
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")


def _client(args: argparse.Namespace) -> Any:
    from fastckpt.serve.client import Client

    cfg = get_config()
    path = args.server or cfg.server
    if not path:
        raise _Usage("no cache daemon configured: give --server PATH or set FASTCKPT_SERVER")
    return Client(path, timeout_s=cfg.server_timeout_s)


def cache_ls(client: Any) -> dict[str, Any]:
    return dict(client.ls())


def cache_prefetch(client: Any, paths: list[str]) -> list[dict[str, Any]]:
    return [dict(client.prefetch(p), path=p) for p in paths]


def cache_evict(client: Any, paths: list[str], every: bool) -> dict[str, int]:
    total = {"evicted": 0, "in_use": 0}
    if every:
        roots = client.roots()
        seen = set()
        for e in client.ls()["entries"]:
            key = (roots.index(e["root"]), e["name"])
            if key not in seen:
                seen.add(key)
                r = client.evict_name(*key)
                total["evicted"] += r["evicted"]
                total["in_use"] += r["in_use"]
    for p in paths:
        r = client.evict(p)
        total["evicted"] += r["evicted"]
        total["in_use"] += r["in_use"]
    return total


def cache_stats(client: Any) -> dict[str, Any]:
    return dict(client.stats())


def run_cache(args: argparse.Namespace) -> int:
    from fastckpt.serve.client import ServerRefused

    try:
        with _client(args) as client:
            if args.cache_command == "ls":
                out: Any = cache_ls(client)
                text = (
                    "\n".join(
                        f"{format_bytes(e['nbytes']):>12}  {'in use' if e['pins'] else 'idle':6}  "
                        f"{e['root']}/{e['name']}  ({e['identity'][:12]})"
                        for e in out["entries"]
                    )
                    or "(empty)"
                )
            elif args.cache_command == "prefetch":
                out = cache_prefetch(client, args.paths)
                text = "\n".join(f"{format_bytes(r['nbytes']):>12}  {r['path']}" for r in out)
            elif args.cache_command == "evict":
                if not args.paths and not args.all:
                    raise _Usage("evict: give PATH... or --all")
                out = cache_evict(client, args.paths, args.all)
                text = f"evicted {out['evicted']}, in use (kept) {out['in_use']}"
            else:
                out = cache_stats(client)
                text = "\n".join(f"{k}: {v}" for k, v in out.items())
    except ServerRefused as exc:
        print(f"fastckpt: error: the daemon refused: {exc}", file=sys.stderr)
        return 1
    except _Usage as exc:
        print(f"fastckpt: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # no daemon there, or it went away mid-answer
        where = args.server or get_config().server
        print(
            f"fastckpt: error: the cache daemon at {where}: {exc.strerror or exc}", file=sys.stderr
        )
        return 1
    print(json.dumps(out, indent=2) if args.json else text)
    return 0
