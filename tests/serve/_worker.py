"""A client process for the daemon tests: loads checkpoints, prints one JSON line per load."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from typing import Any

import torch

import fastckpt


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_and_report(paths: list[str]) -> list[dict[str, object]]:
    rows = []
    for path in paths:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tensors, stats = fastckpt.load(path, stats=True)
        rows.append(
            {
                "path": path,
                "digest": digest(tensors),
                "taken": stats.path_taken,
                "warnings": [str(w.message) for w in caught],
            }
        )
        # writing to a served tensor must never reach the cache (copy-on-write)
        for t in tensors.values():
            if t.numel() and t.is_floating_point():
                t.view(-1)[0] = 12345.0
                break
    return rows


def child(sock: str, timeout: float, paths: list[str], conn: Any) -> None:
    """Body of a client process started by the tests (forkserver: torch is already imported)."""
    os.environ["FASTCKPT_SERVER"] = sock
    os.environ["FASTCKPT_SERVER_TIMEOUT_S"] = str(timeout)
    torch.set_num_threads(1)
    conn.send(load_and_report(paths))
    conn.close()


def main() -> None:
    for row in load_and_report(json.loads(sys.argv[1])):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
