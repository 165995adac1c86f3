"""What this machine's kernel reports about its memory (one reader of ``/proc/meminfo`` for the
benchmarks and for a serving replica's routing stats)."""

from __future__ import annotations


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (empty where unavailable)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                fields = rest.split()
                if fields and fields[0].isdigit():
                    out[key] = int(fields[0]) * (1024 if len(fields) > 1 else 1)
    except OSError:
        pass
    return out
