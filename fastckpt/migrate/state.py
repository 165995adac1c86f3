"""The token state of one in-flight generation, and its versioned, checksummed bytes.

A migration moves this object, never the KV cache: the target rebuilds its cache by prefilling
``prompt_ids + generated_ids``. The state is small (a few bytes per token) and carries everything
the target needs to continue exactly where the source stopped:

- the token ids (prompt and generated so far), and how many generated tokens the client has
  already received (``delivered``), so the target sends the rest and nothing twice;
- the sampling settings and what determines the random draws (``SamplingParams``);
- the stop conditions (``StopCriteria``);
- a fingerprint of the model, so a target refuses a state that was made for another model.

Byte layout (all integers little-endian)::

    offset  size  field
    0       8     magic b"FCKTOKS\\0"
    8       2     major version (a reader refuses a major it does not know)
    10      2     minor version (additive changes; readers ignore unknown fields)
    12      4     body length in bytes (at most MAX_BODY_BYTES)
    16      4     CRC-32 (zlib) of bytes 0-15 followed by the body
    20      ...   body: UTF-8 JSON object (field names below)

The body holds ``request_id``, ``model_fingerprint``, ``prompt_ids``, ``generated_ids``,
``delivered``, ``finished``, ``finish_reason``, ``sampling`` (``temperature``, ``top_k``,
``top_p``, ``seed``, ``rng``, ``generator_state`` as base64 or null) and ``stop``
(``max_new_tokens``, ``stop_token_ids``, ``stop_strings``).

Decoding validates in a fixed order (length, magic, version, body length, checksum, JSON, every
field) and raises ``TokenStateError`` (or its checksum/version subclasses) naming the problem.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from fastckpt.migrate.errors import (
    ModelMismatchError,
    TokenStateChecksumError,
    TokenStateError,
    TokenStateVersionError,
)

MAGIC = b"FCKTOKS\0"
VERSION_MAJOR = 1
VERSION_MINOR = 1  # 1.1: rng mode "engine"
HEADER = struct.Struct("<8sHHII")
_CRC_AT = 16  # the checksum covers the 16 header bytes before it and the body
MAX_BODY_BYTES = 64 << 20
MAX_TOKEN_ID = (1 << 31) - 1

RNG_POSITION = "position"
RNG_GENERATOR = "generator"
RNG_ENGINE = "engine"
RNG_MODES = (RNG_POSITION, RNG_GENERATOR, RNG_ENGINE)

_MASK64 = (1 << 64) - 1


def step_seed(seed: int, position: int) -> int:
    """The seed of the random draw that samples the token at absolute ``position``.

    A SplitMix64-style mix of ``(seed, position)``: a pure function of the two integers, so
    every engine, process and device type derives the same draw for the same step and no random
    state has to travel with a migration. Result in ``[0, 2**63)`` (valid for
    ``torch.Generator.manual_seed``).
    """
    z = (seed * 0x9E3779B97F4A7C15 + (position + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return z & ((1 << 63) - 1)


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TokenStateError(f"{name} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise TokenStateError(f"{name} = {value} is outside [{lo}, {hi}]")


def _check_ids(name: str, ids: Any) -> tuple[int, ...]:
    if not isinstance(ids, (tuple, list)):
        raise TokenStateError(f"{name} must be a sequence of token ids, got {type(ids).__name__}")
    for i, t in enumerate(ids):
        _check_int(f"{name}[{i}]", t, 0, MAX_TOKEN_ID)
    return tuple(ids)


def _check_number(name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TokenStateError(f"{name} must be a number, got {type(value).__name__}")
    if not lo <= value <= hi:  # also refuses NaN
        raise TokenStateError(f"{name} = {value} is outside [{lo}, {hi}]")
    return float(value)


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen.

    Attributes:
        temperature: 0 means greedy (argmax); otherwise logits are divided by it.
        top_k: keep the k most likely tokens (0 = all).
        top_p: keep the smallest set of most likely tokens whose probability reaches top_p.
        seed: the request's seed.
        rng: ``"position"`` (default): the draw for the token at absolute position p comes from
            a fresh generator seeded with ``step_seed(seed, p)``, so nothing random travels.
            ``"generator"``: the request owns one generator; its state is shipped in
            ``generator_state`` (opaque engine bytes) at each snapshot.
            ``"engine"``: the engine's own random stream, which cannot be restored elsewhere
            (vLLM's per-request generator). A target continues with a fresh stream keyed by
            (seed, position of the switch): the same distribution, not the same tokens.
        generator_state: the generator's state at the snapshot's step boundary (``"generator"``
            mode only; None before the first draw).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    rng: str = RNG_POSITION
    generator_state: bytes | None = None

    def __post_init__(self) -> None:
        _check_number("sampling.temperature", self.temperature, 0.0, 1e6)
        _check_int("sampling.top_k", self.top_k, 0, MAX_TOKEN_ID)
        _check_number("sampling.top_p", self.top_p, 0.0, 1.0)
        if self.top_p == 0.0:
            raise TokenStateError("sampling.top_p must be > 0 (1.0 disables nucleus sampling)")
        _check_int("sampling.seed", self.seed, 0, (1 << 63) - 1)
        if self.rng not in RNG_MODES:
            raise TokenStateError(f"sampling.rng = {self.rng!r}; expected one of {RNG_MODES}")
        if self.generator_state is not None and not isinstance(self.generator_state, bytes):
            raise TokenStateError("sampling.generator_state must be bytes or None")
        if self.generator_state is not None and self.rng != RNG_GENERATOR:
            raise TokenStateError("sampling.generator_state is only used with rng='generator'")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class StopCriteria:
    """When a generation ends: after ``max_new_tokens`` generated tokens, after a token in
    ``stop_token_ids`` (it is kept), or when the decoded text contains a stop string (engines
    that check stop strings need a detokenizer)."""

    max_new_tokens: int
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_int("stop.max_new_tokens", self.max_new_tokens, 1, MAX_TOKEN_ID)
        object.__setattr__(
            self, "stop_token_ids", _check_ids("stop.stop_token_ids", self.stop_token_ids)
        )
        if not isinstance(self.stop_strings, (tuple, list)) or not all(
            isinstance(s, str) and s for s in self.stop_strings
        ):
            raise TokenStateError("stop.stop_strings must be a sequence of non-empty strings")
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))


@dataclass(frozen=True)
class TokenState:
    """Everything a target needs to continue a generation (see the module docstring)."""

    request_id: str
    model_fingerprint: str
    prompt_ids: tuple[int, ...]
    generated_ids: tuple[int, ...]
    sampling: SamplingParams
    stop: StopCriteria
    delivered: int = 0
    finished: bool = False
    finish_reason: str | None = None
    _tokens: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, str) or not self.request_id:
            raise TokenStateError("request_id must be a non-empty string")
        if not isinstance(self.model_fingerprint, str) or not self.model_fingerprint:
            raise TokenStateError("model_fingerprint must be a non-empty string")
        object.__setattr__(self, "prompt_ids", _check_ids("prompt_ids", self.prompt_ids))
        object.__setattr__(self, "generated_ids", _check_ids("generated_ids", self.generated_ids))
        if not self.prompt_ids:
            raise TokenStateError("prompt_ids must hold at least one token")
        if not isinstance(self.sampling, SamplingParams):
            raise TokenStateError("sampling must be a SamplingParams")
        if not isinstance(self.stop, StopCriteria):
            raise TokenStateError("stop must be a StopCriteria")
        _check_int("delivered", self.delivered, 0, len(self.generated_ids))
        if len(self.generated_ids) > self.stop.max_new_tokens:
            raise TokenStateError(
                f"{len(self.generated_ids)} generated tokens exceed "
                f"stop.max_new_tokens = {self.stop.max_new_tokens}"
            )
        if not isinstance(self.finished, bool):
            raise TokenStateError("finished must be a bool")
        if self.finish_reason is not None and not isinstance(self.finish_reason, str):
            raise TokenStateError("finish_reason must be a string or None")
        object.__setattr__(self, "_tokens", self.prompt_ids + self.generated_ids)

    @property
    def tokens(self) -> tuple[int, ...]:
        """Prompt and generated ids: what a target prefills."""
        return self._tokens

    def check_model(self, fingerprint: str) -> None:
        """Raise ``ModelMismatchError`` unless the state was made for the model ``fingerprint``."""
        if fingerprint != self.model_fingerprint:
            raise ModelMismatchError(
                f"token state of request {self.request_id!r} was made for model "
                f"{self.model_fingerprint!r}, this engine serves {fingerprint!r}"
            )

    def replace(self, **changes: Any) -> TokenState:
        return dataclasses.replace(self, **changes)

    # --- bytes -------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        s = self.sampling
        body = {
            "request_id": self.request_id,
            "model_fingerprint": self.model_fingerprint,
            "prompt_ids": list(self.prompt_ids),
            "generated_ids": list(self.generated_ids),
            "delivered": self.delivered,
            "finished": self.finished,
            "finish_reason": self.finish_reason,
            "sampling": {
                "temperature": s.temperature,
                "top_k": s.top_k,
                "top_p": s.top_p,
                "seed": s.seed,
                "rng": s.rng,
                "generator_state": None
                if s.generator_state is None
                else base64.b64encode(s.generator_state).decode("ascii"),
            },
            "stop": {
                "max_new_tokens": self.stop.max_new_tokens,
                "stop_token_ids": list(self.stop.stop_token_ids),
                "stop_strings": list(self.stop.stop_strings),
            },
        }
        raw = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
        if len(raw) > MAX_BODY_BYTES:
            raise TokenStateError(f"token state body of {len(raw)} bytes exceeds {MAX_BODY_BYTES}")
        fixed = HEADER.pack(MAGIC, VERSION_MAJOR, VERSION_MINOR, len(raw), 0)[:_CRC_AT]
        return fixed + struct.pack("<I", zlib.crc32(raw, zlib.crc32(fixed))) + raw

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> TokenState:
        data = bytes(data)
        if len(data) < HEADER.size:
            raise TokenStateError(f"token state of {len(data)} bytes is shorter than its header")
        magic, major, minor, body_len, crc = HEADER.unpack_from(data)
        if magic != MAGIC:
            raise TokenStateError(f"not a token state: magic {magic!r}, expected {MAGIC!r}")
        if major != VERSION_MAJOR:
            raise TokenStateVersionError(
                f"token state version {major}.{minor}; this reader understands {VERSION_MAJOR}.x"
            )
        if body_len > MAX_BODY_BYTES:
            raise TokenStateError(f"token state body length {body_len} exceeds {MAX_BODY_BYTES}")
        if len(data) != HEADER.size + body_len:
            raise TokenStateError(
                f"token state body length {body_len} but {len(data) - HEADER.size} bytes follow "
                "the header"
            )
        body = data[HEADER.size :]
        actual = zlib.crc32(body, zlib.crc32(data[:_CRC_AT]))
        if actual != crc:
            raise TokenStateChecksumError(
                f"token state checksum mismatch: header says {crc:#010x}, "
                f"content has {actual:#010x}"
            )
        try:
            obj = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise TokenStateError(f"token state body is not valid JSON: {e}") from None
        except RecursionError:  # arrays nested deeper than the interpreter recurses
            raise TokenStateError("token state body is nested too deeply") from None
        return _from_obj(obj)


def _field(obj: Any, name: str, where: str = "") -> Any:
    if not isinstance(obj, dict):
        raise TokenStateError(f"token state {where or 'body'} must be a JSON object")
    if name not in obj:
        raise TokenStateError(f"token state field {where}{name!r} is missing")
    return obj[name]


def _from_obj(obj: Any) -> TokenState:
    s = _field(obj, "sampling")
    st = _field(obj, "stop")
    gs = _field(s, "generator_state", "sampling.")
    if gs is not None:
        if not isinstance(gs, str):
            raise TokenStateError("sampling.generator_state must be a base64 string or null")
        try:
            gs = base64.b64decode(gs.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise TokenStateError("sampling.generator_state is not valid base64") from None
    try:
        sampling = SamplingParams(
            temperature=_field(s, "temperature", "sampling."),
            top_k=_field(s, "top_k", "sampling."),
            top_p=_field(s, "top_p", "sampling."),
            seed=_field(s, "seed", "sampling."),
            rng=_field(s, "rng", "sampling."),
            generator_state=gs,
        )
        stop = StopCriteria(
            max_new_tokens=_field(st, "max_new_tokens", "stop."),
            stop_token_ids=_field(st, "stop_token_ids", "stop."),
            stop_strings=_field(st, "stop_strings", "stop."),
        )
        return TokenState(
            request_id=_field(obj, "request_id"),
            model_fingerprint=_field(obj, "model_fingerprint"),
            prompt_ids=_field(obj, "prompt_ids"),
            generated_ids=_field(obj, "generated_ids"),
            sampling=sampling,
            stop=stop,
            delivered=_field(obj, "delivered"),
            finished=_field(obj, "finished"),
            finish_reason=_field(obj, "finish_reason"),
        )
    except TypeError as e:  # e.g. a list where a string belongs, hashed by the dataclass
        raise TokenStateError(f"token state has a field of the wrong type: {e}") from None


__all__ = [
    "MAGIC",
    "RNG_ENGINE",
    "RNG_GENERATOR",
    "RNG_POSITION",
    "VERSION_MAJOR",
    "VERSION_MINOR",
    "SamplingParams",
    "StopCriteria",
    "TokenState",
    "step_seed",
]
