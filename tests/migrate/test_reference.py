"""The reference adapter in one process: bfloat16 ties, a target whose model is still loading,
sampling rules, and the fingerprint."""

from __future__ import annotations

import concurrent.futures
import math
import threading
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch
from migrate_helpers import PROMPT, VOCAB, Client, build_tiny_llama, pace

import fastckpt
from fastckpt.migrate import (
    ModelMismatchError,
    Outcome,
    ReferenceEngine,
    SamplingParams,
    StopCriteria,
    TargetStateError,
    checkpoint_fingerprint,
    migrate,
    model_fingerprint,
)
from fastckpt.migrate.sampling import choose_token

TIE_ULPS = 2


def bf16_ulp(x: float) -> float:
    """Spacing of bfloat16 numbers (8 significant bits) at magnitude |x|."""
    return 2.0 ** (math.floor(math.log2(abs(x))) - 7) if x else 2.0**-133


def first_divergence(
    expected: list[int], got: list[int], margins: list[tuple[float, float, int, int]]
) -> int | None:
    """Index of the first differing token, after checking that the unmigrated run's top-2
    logits tied there within rounding and that the migrated run took the runner-up."""
    assert len(got) == len(expected)
    k = next((i for i, (a, b) in enumerate(zip(expected, got, strict=True)) if a != b), None)
    if k is None:
        return None
    gap, top, first, second = margins[k]
    assert gap <= TIE_ULPS * bf16_ulp(top), f"divergence at step {k} without a tie: {margins[k]}"
    assert (expected[k], got[k]) == (first, second), f"step {k} did not swap the top two"
    return k


def test_divergence_checker_rejects_an_unexplained_divergence() -> None:
    margins = [(0.5, 2.0, 1, 2), (0.0, 2.0, 3, 4), (0.5, 2.0, 5, 6)]
    assert first_divergence([1, 3, 5], [1, 3, 5], margins) is None
    assert first_divergence([1, 3, 5], [1, 4, 9], margins) == 1  # the tie at step 1
    with pytest.raises(AssertionError, match="without a tie"):
        first_divergence([1, 3, 5], [1, 3, 6], margins)
    with pytest.raises(AssertionError, match="top two"):
        first_divergence([1, 3, 5], [1, 7, 5], margins)


@pytest.fixture(scope="module")
def bf16_engine(tmp_path_factory: pytest.TempPathFactory) -> ReferenceEngine:
    path = build_tiny_llama(tmp_path_factory.mktemp("migrate-bf16"), dtype="bfloat16")
    engine = ReferenceEngine.from_checkpoint(path, record_margins=True)
    assert next(engine.model.parameters()).dtype == torch.bfloat16
    return engine


def test_bfloat16_equal_up_to_a_top2_tie(bf16_engine: ReferenceEngine) -> None:
    """bfloat16 logits tie often (8 significant bits); recompute by chunked prefill may round a
    tie the other way. Tokens must be equal up to the first step where the top two tied."""
    n = 24
    stop = StopCriteria(max_new_tokens=n)
    ties = diverged = 0
    for p in range(3):
        prompt = tuple((x * (p + 3) + p) % VOCAB for x in PROMPT)
        ref = bf16_engine.start(f"ref{p}", prompt, stop=stop)
        ref.run()
        ties += sum(g <= TIE_ULPS * bf16_ulp(top) for g, top, _, _ in ref.margins)
        for begin, rounds in ((0, 0), (6, 3)):
            client = Client()
            rid = f"bf{p}-{begin}"
            src = bf16_engine.start(rid, prompt, stop=stop, emit=client.emit)
            src.run(begin)
            tgt = bf16_engine.target(rid)
            report = migrate(
                src,
                tgt,
                threshold_tokens=3,
                max_rounds=rounds,
                after_round=pace(src, [4, 4, 1]),
            )
            assert report.outcome is Outcome.COMMITTED
            client.add(tgt.result(60)["tokens"])
            k = first_divergence(ref.generated, client.output(), ref.margins)
            diverged += k is not None
    assert ties > 0, "no tie at all: the property above was not exercised"
    print(f"bf16: {ties} tie steps in {3 * n}, {diverged} of 6 migrations diverged at a tie")


def test_target_starts_while_its_model_is_still_loading(
    llama_f32: Path, source_engine: ReferenceEngine
) -> None:
    """A target engine made from a future (what a prefetching Loader hands out) accepts the
    migration at once; its first prefill waits for the weights, then everything matches."""
    stop = StopCriteria(max_new_tokens=12)
    sampling = SamplingParams(temperature=1.0, seed=5)
    expected = source_engine.generate(PROMPT, sampling=sampling, stop=stop)

    future: concurrent.futures.Future[Any] = concurrent.futures.Future()
    target_engine = ReferenceEngine(future, fingerprint=checkpoint_fingerprint(llama_f32))
    assert not target_engine.model_ready
    client = Client()
    src = source_engine.start("pf", PROMPT, sampling=sampling, stop=stop, emit=client.emit)
    src.run(3)
    tgt = target_engine.target("pf")
    loader = threading.Timer(0.2, lambda: future.set_result(fastckpt.load_model(llama_f32)))
    loader.start()
    report = migrate(src, tgt, max_rounds=1)
    loader.join()
    assert report.outcome is Outcome.COMMITTED and target_engine.model_ready
    client.add(tgt.result(60)["tokens"])
    assert client.output() == expected


def test_background_checkpoint_load_and_failed_load(
    llama_f32: Path, source_engine: ReferenceEngine
) -> None:
    stop = StopCriteria(max_new_tokens=10)
    expected = source_engine.generate(PROMPT, stop=stop)
    engine = ReferenceEngine.from_checkpoint(llama_f32, background=True)
    assert engine.fingerprint == source_engine.fingerprint  # known before the weights
    client = Client()
    src = source_engine.start("bg", PROMPT, stop=stop, emit=client.emit)
    src.run(2)
    tgt = engine.target("bg")
    assert migrate(src, tgt).outcome is Outcome.COMMITTED
    client.add(tgt.result(60)["tokens"])
    assert client.output() == expected

    def broken() -> Any:
        raise OSError("disk gone")

    failing = ReferenceEngine(broken, fingerprint=source_engine.fingerprint)
    client = Client()
    src = source_engine.start("bad", PROMPT, stop=stop, emit=client.emit)
    report = migrate(src, failing.target("bad"))
    assert report.outcome is Outcome.TARGET_FAILED and "disk gone" in (report.error or "")
    src.run()
    assert client.output() == expected


def test_target_refuses_other_models_and_bad_sequences(source_engine: ReferenceEngine) -> None:
    stop = StopCriteria(max_new_tokens=6)
    src = source_engine.start("x", PROMPT, stop=stop)
    src.run(2)
    tgt = source_engine.target("x", background=False)
    with pytest.raises(ModelMismatchError):
        tgt.prefill(src.snapshot().replace(model_fingerprint="other"))
    tgt.prefill(src.snapshot())
    with pytest.raises(TargetStateError, match="does not extend"):
        tgt.prefill(src.snapshot().replace(prompt_ids=(1, 2)))
    state = src.freeze()
    tgt.commit(state)
    tgt.commit(state)  # idempotent
    with pytest.raises(TargetStateError, match="another state"):
        tgt.commit(state.replace(delivered=0))
    assert tgt.abort() is False
    tgt.run()
    assert tgt.status() == "finished"
    assert len(tgt.generated) == 6 and [i for i, _ in tgt.emitted] == [2, 3, 4, 5]


def test_model_fingerprint_tells_weights_apart(source_engine: ReferenceEngine) -> None:
    model = source_engine.model
    fp = model_fingerprint(model)
    assert fp == model_fingerprint(model)
    with torch.no_grad():
        w = model.model.norm.weight
        old = w[-1].item()
        w[-1] += 1.0
        try:
            assert model_fingerprint(model) != fp
        finally:
            w[-1] = old


def test_choose_token_rules() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=g)
    best = int(torch.argmax(logits))
    assert choose_token(logits, SamplingParams(), 7) == best
    assert choose_token(logits, SamplingParams(temperature=1.0, top_k=1, seed=3), 7) == best
    assert choose_token(logits, SamplingParams(temperature=1.0, top_p=1e-6, seed=3), 7) == best
    sampled = SamplingParams(temperature=1.0, seed=11)
    draws = [choose_token(logits, sampled, pos) for pos in range(200)]
    assert draws == [choose_token(logits, sampled, pos) for pos in range(200)]  # keyed, pure
    assert len(set(draws)) > 10
    top5 = set(torch.topk(logits, 5).indices.tolist())
    k5 = SamplingParams(temperature=2.0, top_k=5, seed=1)
    assert {choose_token(logits, k5, pos) for pos in range(200)} <= top5


def test_checkpoint_fingerprint(llama_f32: Path, tmp_path: Path) -> None:
    import shutil

    fp = checkpoint_fingerprint(llama_f32)
    assert fp == checkpoint_fingerprint(llama_f32)
    assert fp != checkpoint_fingerprint(llama_f32, dtype="bfloat16")
    stock = tmp_path / "stock"
    shutil.copytree(llama_f32.parent / "llama-f32-src", stock)
    before = checkpoint_fingerprint(stock)
    weights = next(stock.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one weight byte in the last window
    weights.write_bytes(bytes(data))
    assert checkpoint_fingerprint(stock) != before


def test_stop_tokens_and_strings_survive_a_migration(source_engine: ReferenceEngine) -> None:
    free = source_engine.generate(PROMPT, stop=StopCriteria(max_new_tokens=16))
    marker = free[9]
    first = free.index(marker)
    text_engine = ReferenceEngine(
        source_engine.model, detokenize=lambda ids: "".join(f"<{i}>" for i in ids)
    )
    for stop in (
        StopCriteria(max_new_tokens=16, stop_token_ids=(marker,)),
        StopCriteria(max_new_tokens=16, stop_strings=(f"<{marker}>",)),
    ):
        expected = text_engine.generate(PROMPT, stop=stop)
        assert expected == free[: first + 1]
        client = Client()
        src = text_engine.start(f"stop-{stop.stop_strings}", PROMPT, stop=stop, emit=client.emit)
        src.run(min(2, first))
        tgt = text_engine.target(src.request_id)
        assert migrate(src, tgt, max_rounds=1).outcome is Outcome.COMMITTED
        res = tgt.result(60)
        client.add(res["tokens"])
        assert client.output() == expected
        assert res["finish_reason"] == ("stop_token" if stop.stop_token_ids else "stop_string")
    with pytest.raises(ValueError, match="detokenize"):
        source_engine.start(
            "nostr", PROMPT, stop=StopCriteria(max_new_tokens=4, stop_strings=("x",))
        )
