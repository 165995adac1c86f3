"""``fastckpt cache``: list, size and clear the SSD tier; show or measure the read-mode profile.

    fastckpt cache ls [--dir DIR] [--json]
    fastckpt cache size [--dir DIR]
    fastckpt cache clear [--dir DIR]
    fastckpt cache profile [--json]          (what the read-mode probe measured, per filesystem)
    fastckpt cache probe FILE [--bytes N]    (measure now on FILE: drops FILE from the page cache)

The directory defaults to the configured SSD tier directory (``FASTCKPT_SSD_TIER_DIR``, else
``~/.cache/fastckpt/ssd``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from fastckpt.config import get_config, profile_dir, ssd_tier_dir
from fastckpt.rules.units import format_bytes


def add_arguments(parser: argparse.ArgumentParser) -> Any:
    """Add the SSD-tier and profile actions; returns the subparsers so that ``fastckpt cache``
    can add the daemon's actions beside them (``--json`` may also come before the action)."""
    sub = parser.add_subparsers(dest="cache_command", metavar="ACTION")
    sub.required = True
    for name, help_text in (
        (
            "ls",
            "list the SSD tier's entries, least recently used first (with --server or "
            "FASTCKPT_SERVER and no --dir: the cache daemon's entries)",
        ),
        ("size", "total bytes held by the SSD tier"),
        ("clear", "delete every entry of the SSD tier"),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--dir", help="SSD tier directory (default: the configured one)")
        if name == "ls":
            p.add_argument(
                "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON"
            )
    text = "show the stored read-mode profiles (one per filesystem)"
    p = sub.add_parser("profile", help=text, description=text)
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    text = (
        "measure O_DIRECT, buffered and mixed cold reads on FILE and store the profile "
        "(drops FILE from the page cache)"
    )
    p = sub.add_parser("probe", help=text, description=text)
    p.add_argument("file", help="a large file on the filesystem to measure (>= 8 MiB)")
    p.add_argument("--bytes", type=int, default=64 << 20, help="bytes to read per mode")
    return sub


def run(args: argparse.Namespace) -> int:
    cfg = get_config()
    action = args.cache_command
    if action in ("ls", "size", "clear"):
        from fastckpt.tiers import ssdfiles as ssd

        directory = args.dir or ssd_tier_dir(cfg)
        if action == "clear":
            count, nbytes = ssd.clear(directory)
            print(f"removed {count} entries ({format_bytes(nbytes)}) from {directory}")
            return 0
        entries = ssd.scan(directory)
        if action == "size":
            total = sum(e.nbytes for e in entries)
            print(f"{total}\t{format_bytes(total)}\t{len(entries)} entries\t{directory}")
            return 0
        if args.json:
            print(json.dumps(ssd.describe(entries), indent=1))
            return 0
        if not entries:
            print(f"(empty) {directory}")
        for e in entries:
            when = (
                time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used)) if e.last_used else "-"
            )
            print(f"{e.key}\t{format_bytes(e.nbytes)}\t{when}\t{e.source}")
        return 0
    if action == "profile":
        directory = profile_dir(cfg)
        found = []
        if os.path.isdir(directory):
            for name in sorted(os.listdir(directory)):
                if name.startswith("read-") and name.endswith(".json"):
                    with open(os.path.join(directory, name), encoding="utf-8") as f:
                        found.append(json.load(f))
        if args.json:
            print(json.dumps(found, indent=1))
        elif not found:
            print(f"no read-mode profile yet in {directory}")
        for p in found if not args.json else []:
            print(_profile_line(p))
        return 0
    if action == "probe":
        from fastckpt.loader import profile
        from fastckpt.loader.session import Loader

        if args.bytes < profile.PROBE_MIN_BYTES:
            raise ValueError(f"--bytes {args.bytes}: at least {profile.PROBE_MIN_BYTES}")
        with Loader() as loader:
            measured = profile.probe(args.file, loader.engine(), nbytes=args.bytes, force=True)
        if measured is None:
            raise ValueError(
                f"{args.file}: too small to probe (needs {profile.PROBE_MIN_BYTES} bytes)"
            )
        path = profile.store_profile(cfg, measured)
        profile.forget()
        print(_profile_line(measured.as_dict()))
        print(f"stored in {path}")
        return 0
    raise ValueError(f"unknown cache action {action!r}")


def _profile_line(p: dict[str, object]) -> str:
    return (
        f"{p['key']}: O_DIRECT {p['direct_gbps']} GB/s, buffered {p['buffered_gbps']} GB/s, "
        f"mixed {p['mixed_gbps']} GB/s over {format_bytes(float(str(p['probe_bytes'])))} "
        f"-> {p['best']} ({p['source']})"
    )
