"""Token state: bytes round trip (hypothesis), validation, corruption and model checks."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastckpt.migrate import (
    ModelMismatchError,
    SamplingParams,
    StopCriteria,
    TokenState,
    TokenStateChecksumError,
    TokenStateError,
    TokenStateVersionError,
    step_seed,
)
from fastckpt.migrate.state import HEADER, MAGIC

ids = st.lists(st.integers(0, 2**31 - 1), max_size=40)


@st.composite
def token_states(draw: st.DrawFn) -> TokenState:
    rng = draw(st.sampled_from(["position", "generator"]))
    gen_state = draw(st.none() | st.binary(max_size=64)) if rng == "generator" else None
    sampling = SamplingParams(
        temperature=draw(st.floats(0.0, 100.0, allow_nan=False)),
        top_k=draw(st.integers(0, 1000)),
        top_p=draw(st.floats(0.001, 1.0)),
        seed=draw(st.integers(0, 2**63 - 1)),
        rng=rng,
        generator_state=gen_state,
    )
    generated = draw(ids)
    stop = StopCriteria(
        max_new_tokens=draw(st.integers(max(1, len(generated)), 2**31 - 1)),
        stop_token_ids=tuple(draw(ids)),
        stop_strings=tuple(draw(st.lists(st.text(min_size=1, max_size=8), max_size=3))),
    )
    finished = draw(st.booleans())
    return TokenState(
        request_id=draw(st.text(min_size=1, max_size=20)),
        model_fingerprint=draw(st.text(min_size=1, max_size=40)),
        prompt_ids=tuple(draw(ids.filter(bool))),
        generated_ids=tuple(generated),
        sampling=sampling,
        stop=stop,
        delivered=draw(st.integers(0, len(generated))),
        finished=finished,
        finish_reason=draw(st.none() | st.sampled_from(["length", "stop_token"]))
        if finished
        else None,
    )


@settings(max_examples=100, deadline=None)
@given(token_states())
def test_round_trip(state: TokenState) -> None:
    data = state.to_bytes()
    back = TokenState.from_bytes(data)
    assert back == state
    assert back.tokens == state.prompt_ids + state.generated_ids
    assert back.to_bytes() == data  # canonical


@settings(max_examples=40, deadline=None)
@given(token_states(), st.data())
def test_any_corruption_or_truncation_is_rejected(state: TokenState, data: st.DataObject) -> None:
    raw = bytearray(state.to_bytes())
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(TokenStateError):
        TokenState.from_bytes(bytes(raw[:cut]))
    pos = data.draw(st.integers(0, len(raw) - 1))
    flip = data.draw(st.integers(1, 255))
    raw[pos] ^= flip
    with pytest.raises(TokenStateError):
        TokenState.from_bytes(bytes(raw))


def _state(**kw: object) -> TokenState:
    base: dict[str, object] = dict(
        request_id="r1",
        model_fingerprint="model-a",
        prompt_ids=(1, 2, 3),
        generated_ids=(4, 5),
        sampling=SamplingParams(),
        stop=StopCriteria(max_new_tokens=8),
        delivered=2,
    )
    base.update(kw)
    return TokenState(**base)  # type: ignore[arg-type]


def test_body_corruption_is_a_checksum_error() -> None:
    raw = bytearray(_state().to_bytes())
    raw[HEADER.size + 5] ^= 0x01
    with pytest.raises(TokenStateChecksumError, match="checksum"):
        TokenState.from_bytes(bytes(raw))


def test_unknown_major_version_is_refused() -> None:
    raw = bytearray(_state().to_bytes())
    struct.pack_into("<H", raw, len(MAGIC), 2)
    with pytest.raises(TokenStateVersionError, match="version 2"):
        TokenState.from_bytes(bytes(raw))


def _with_body(body: bytes, minor: int = 0) -> bytes:
    fixed = HEADER.pack(MAGIC, 1, minor, len(body), 0)[:16]
    return fixed + struct.pack("<I", zlib.crc32(fixed + body)) + body


def test_newer_minor_version_is_read() -> None:
    body = _state().to_bytes()[HEADER.size :]
    assert TokenState.from_bytes(_with_body(body, minor=7)) == _state()
    raw = bytearray(_state().to_bytes())
    struct.pack_into("<H", raw, len(MAGIC) + 2, 7)  # the header is checksummed too
    with pytest.raises(TokenStateChecksumError):
        TokenState.from_bytes(bytes(raw))


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"sampling": {}, "stop": {}}', "missing"),
    ],
)
def test_well_checksummed_garbage_is_refused(body: bytes, match: str) -> None:
    with pytest.raises(TokenStateError, match=match):
        TokenState.from_bytes(_with_body(body))


def test_field_values_are_validated_after_decoding() -> None:
    import json

    obj = json.loads(_state().to_bytes()[HEADER.size :])
    obj["delivered"] = 3  # more than generated
    with pytest.raises(TokenStateError, match="delivered"):
        TokenState.from_bytes(_with_body(json.dumps(obj).encode()))
    obj["delivered"] = 0
    obj["prompt_ids"] = [1, -2]
    with pytest.raises(TokenStateError, match=r"prompt_ids\[1\]"):
        TokenState.from_bytes(_with_body(json.dumps(obj).encode()))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"prompt_ids": ()}, "at least one token"),
        ({"request_id": ""}, "request_id"),
        ({"delivered": 3}, "delivered"),
        ({"generated_ids": tuple(range(9))}, "max_new_tokens"),
    ],
)
def test_invalid_states_are_refused(kw: dict[str, object], match: str) -> None:
    with pytest.raises(TokenStateError, match=match):
        _state(**kw)


def test_invalid_sampling_is_refused() -> None:
    with pytest.raises(TokenStateError, match="rng"):
        SamplingParams(rng="global")
    with pytest.raises(TokenStateError, match="temperature"):
        SamplingParams(temperature=float("nan"))
    with pytest.raises(TokenStateError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(TokenStateError, match="rng='generator'"):
        SamplingParams(generator_state=b"x")


def test_wrong_model_fingerprint_is_refused() -> None:
    state = TokenState.from_bytes(_state().to_bytes())
    state.check_model("model-a")
    with pytest.raises(ModelMismatchError, match="model-b"):
        state.check_model("model-b")


def test_step_seed_is_a_pure_function_of_seed_and_position() -> None:
    assert step_seed(7, 100) == step_seed(7, 100)
    seeds = {step_seed(s, p) for s in range(20) for p in range(200)}
    assert len(seeds) == 20 * 200  # no collisions on a small grid
    assert all(0 <= x < 2**63 for x in seeds)
