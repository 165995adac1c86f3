"""Build fastckpt checkpoints by hand, byte by byte, and (re)generate the golden checkpoints.

The reader tests use ``Draft``/``draft``/``write`` to make valid checkpoints and then break them,
without depending on fastckpt's writer. Running this file regenerates ``golden/``:

    python tests/format/golden_gen.py

Golden checkpoints are released formats: once committed, their bytes never change (a new format
version gets a new directory). The tests read the committed bytes and check them against
``golden/expected.json``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fastckpt.format import dtypes, spec

GOLDEN = Path(__file__).resolve().parent / "golden"


@dataclass
class Tensor:
    """A tensor to place: its bytes (already C-contiguous, little-endian) and its partition."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes
    partition: int = 0


@dataclass
class Draft:
    """A checkpoint before it is written: the index body and each partition's bytes.

    Tests edit ``body`` (and ``partitions``) freely to break the checkpoint. Checksums are
    computed by ``write`` from the partition bytes unless ``body`` already holds them.
    """

    body: dict[str, Any]
    partitions: list[bytearray]
    files: dict[str, bytes] = field(default_factory=dict)

    def copy(self) -> Draft:
        return Draft(
            copy.deepcopy(self.body), [bytearray(p) for p in self.partitions], dict(self.files)
        )


def pattern(name: str, nbytes: int) -> bytes:
    """Deterministic pseudo-random bytes for a tensor called ``name``."""
    out = bytearray()
    counter = 0
    while len(out) < nbytes:
        out += hashlib.sha256(f"{name}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:nbytes])


def make(name: str, dtype: str, shape: tuple[int, ...], partition: int = 0) -> Tensor:
    """A tensor with pattern bytes (bool tensors get valid 0/1 bytes)."""
    nbytes = dtypes.get(dtype).itemsize * math.prod(shape)
    data = pattern(name, nbytes)
    if dtype == "bool":
        data = bytes(b & 1 for b in data)
    return Tensor(name, dtype, shape, data, partition)


def draft(
    tensors: list[Tensor],
    *,
    alignment: int = 256,
    chunk_bytes: int = 4096,
    devices: list[str | None] | None = None,
    aliases: dict[str, str] | None = None,
    metadata: dict[str, str] | None = None,
    files: dict[str, bytes] | None = None,
    source: dict[str, Any] | None = None,
) -> Draft:
    """Lay tensors out in their partitions (in list order, aligned, padded to 4 KiB)."""
    nparts = max([t.partition + 1 for t in tensors], default=0)
    if devices is not None:
        nparts = max(nparts, len(devices))
    parts = [bytearray() for _ in range(nparts)]
    entries = []
    for t in tensors:
        buf = parts[t.partition]
        offset = -(-len(buf) // alignment) * alignment
        buf.extend(bytes(offset - len(buf)))
        buf.extend(t.data)
        entries.append(
            {
                "name": t.name,
                "partition": t.partition,
                "offset": offset,
                "nbytes": len(t.data),
                "dtype": t.dtype,
                "shape": list(t.shape),
            }
        )
    for buf in parts:
        buf.extend(bytes(-len(buf) % spec.PAGE))
    body: dict[str, Any] = {
        "format": "fastckpt",
        "version": [spec.MAJOR, spec.MINOR],
        "alignment": alignment,
        "checksum": {"algorithm": spec.CHECKSUM_ALGORITHM, "chunk_bytes": chunk_bytes},
        "partitions": [
            {
                "file": spec.partition_name(i),
                "nbytes": len(buf),
                "device": devices[i] if devices is not None else None,
                "checksums": None,
            }
            for i, buf in enumerate(parts)
        ],
        "tensors": entries,
        "aliases": dict(aliases or {}),
        "source": dict(source or {"kind": "hand-built", "tool": "tests/format/golden_gen.py"}),
        "metadata": dict(metadata or {}),
        "files": sorted(files or {}),
    }
    return Draft(body, parts, dict(files or {}))


def chunk_checksums(data: bytes | bytearray, chunk_bytes: int) -> list[int]:
    return [spec.crc32c(bytes(data[k : k + chunk_bytes])) for k in range(0, len(data), chunk_bytes)]


def encode_body(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _plain_name(name: object) -> bool:
    """A name that stays inside the directory; anything else is never written (only tested)."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and os.path.basename(name) == name
        and "\\" not in name
        and "\x00" not in name
        and len(name.encode("utf-8", "replace")) <= 255
    )


def write(
    d: Draft,
    root: str | os.PathLike[str],
    *,
    major: int = spec.MAJOR,
    minor: int = spec.MINOR,
    flags: int = 0,
    raw_body: bytes | None = None,
) -> Path:
    """Write ``d`` into the directory ``root`` (created); return the index file's path.

    Partition files are named by ``body['partitions'][i]['file']`` when that is a plain file name;
    an unsafe name (``../x``, ``/abs``, ...) is never written anywhere.
    ``raw_body`` replaces the JSON body bytes (the header still describes them correctly).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    body = copy.deepcopy(d.body)
    chunk = body.get("checksum", {}).get("chunk_bytes")
    if type(chunk) is not int or chunk <= 0:  # a broken value under test: any chunking will do
        chunk = 4096
    for i, buf in enumerate(d.partitions):
        entry = body["partitions"][i] if i < len(body.get("partitions", [])) else None
        name = entry.get("file") if isinstance(entry, dict) else None
        if _plain_name(name):
            target = root / name
            assert target.resolve().parent == root.resolve(), target
            target.write_bytes(bytes(buf))
        if isinstance(entry, dict) and entry.get("checksums") is None:
            entry["checksums"] = chunk_checksums(buf, chunk)
    for name, data in d.files.items():
        assert _plain_name(name), name
        (root / name).write_bytes(data)
    raw = encode_body(body) if raw_body is None else raw_body
    index = root / spec.INDEX_FILE
    index.write_bytes(spec.pack_header(raw, major=major, minor=minor, flags=flags) + raw)
    return index


# --- the golden checkpoints ---------------------------------------------------------------------


def _f32(values: list[float]) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def golden_drafts() -> dict[str, Draft]:
    """The golden checkpoints of format 1.0, covering every dtype, 0-d, empty, aliases, devices."""
    basic = draft(
        [
            Tensor("w", "float32", (2, 3), _f32([0, 1, 2, 3, 4, 5])),
            make("b", "bfloat16", (4,)),
            make("scalar", "float64", ()),
            make("empty", "float16", (0, 3)),
            make("mask", "bool", (5,)),
            make("f8", "float8_e4m3fn", (7,)),
            make("f8b", "float8_e5m2", (3,)),
            make("long", "int8", (5000,)),
            make("i64", "int64", (3,)),
            make("u16", "uint16", (2, 2)),
            make("c64", "complex64", (2,)),
        ],
        aliases={"lm_head.weight": "w"},
        metadata={"format": "pt"},
        files={"config.json": b'{"model_type": "golden"}\n'},
    )
    devices = draft(
        [
            make("embed", "int32", (300,), 0),
            make("u8", "uint8", (10,), 0),
            make("c128", "complex128", (3,), 1),
            make("e8m0", "float8_e8m0fnu", (9,), 1),
            make("fnuz", "float8_e4m3fnuz", (9,), 1),
            make("head", "float16", (2, 2000), 2),
            make("u32", "uint32", (5,), 2),
            make("u64", "uint64", (1,), 2),
            make("i16", "int16", (4,), 2),
            make("fnuz2", "float8_e5m2fnuz", (1, 1), 2),
            make("zero_d_bool", "bool", (), 2),
        ],
        alignment=4096,
        chunk_bytes=8192,
        devices=["cuda:0", "cuda:0", "cuda:1"],
        aliases={"tied.a": "embed", "tied.b": "embed"},
        files={"tokenizer.json": b"{}\n", "generation_config.json": b"{}\n"},
    )
    return {"v1.0-basic": basic, "v1.0-devices": devices}


def expected_of(d: Draft) -> dict[str, Any]:
    """What a reader must report for ``d``: every entry plus each tensor's bytes' SHA-256."""
    tensors = {}
    for e in d.body["tensors"]:
        data = bytes(d.partitions[e["partition"]][e["offset"] : e["offset"] + e["nbytes"]])
        tensors[e["name"]] = {**e, "sha256": hashlib.sha256(data).hexdigest()}
    return {
        "tensors": tensors,
        "aliases": d.body["aliases"],
        "partitions": [
            {"file": p["file"], "nbytes": p["nbytes"], "device": p["device"]}
            for p in d.body["partitions"]
        ],
        "alignment": d.body["alignment"],
        "chunk_bytes": d.body["checksum"]["chunk_bytes"],
        "metadata": d.body["metadata"],
        "files": d.body["files"],
    }


def main() -> None:
    GOLDEN.mkdir(exist_ok=True)
    expected = {}
    for name, d in golden_drafts().items():
        target = GOLDEN / name
        if target.exists():
            shutil.rmtree(target)
        write(d, target)
        expected[name] = expected_of(d)
    (GOLDEN / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    print(f"wrote {', '.join(expected)} under {GOLDEN}")


if __name__ == "__main__":
    main()
