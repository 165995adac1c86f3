"""A stand-in for vLLM's ``LLMEngine`` with the surface ``VllmEngine`` uses, for fast tests of
the adapter's own logic (delivery, freezing, prefills by whole block, failures, threading)
without vLLM. The real engine is tested in tests/vllm_migrate.

Its "model" makes the next token from the context: greedy requests a hash of the tokens;
position-keyed ones (``extra_args["fastckpt_sampling"]``) also mix in ``step_seed(seed,
position)``; seeded ones (``seed``) mix in a counter of the request's own steps, like vLLM's
per-request generator (so they cannot continue elsewhere). Prefix caching keeps whole blocks.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

from fastckpt.migrate.state import step_seed
from fastckpt.migrate.vllm import POSITION_SAMPLER, SAMPLING_KEY


def make_params(kw: dict[str, Any], final_only: bool) -> dict[str, Any]:
    return {**kw, "final_only": final_only}


class FakeLLMEngine:
    def __init__(self, *, block_size: int = 4, max_model_len: int = 256) -> None:
        model_config = SimpleNamespace(
            max_model_len=max_model_len,
            logits_processors=[POSITION_SAMPLER],
            hf_config=SimpleNamespace(eos_token_id=2),
            try_get_generation_config=lambda: {"eos_token_id": [2, 3]},
        )
        cache_config = SimpleNamespace(block_size=block_size, enable_prefix_caching=True)
        self.vllm_config = SimpleNamespace(model_config=model_config, cache_config=cache_config)
        self.model_config = model_config
        self.renderer = SimpleNamespace(render_cmpl=lambda prompts: [dict(p) for p in prompts])
        self.block_size = block_size
        self.requests: dict[str, dict[str, Any]] = {}
        self.blocks: set[tuple[int, ...]] = set()
        self.threads: set[int] = set()
        self.steps = 0
        self.fail_next_step = False
        self.fail_with: str | None = None  # fail a step that runs a request id containing this
        self.added: list[str] = []

    def _touch(self) -> None:
        self.threads.add(threading.get_ident())

    def add_request(self, rid: str, prompt: dict[str, Any], params: dict[str, Any]) -> None:
        self._touch()
        tokens = list(prompt["prompt_token_ids"])
        b = self.block_size
        cached = 0
        while cached + b <= len(tokens) - 1 and tuple(tokens[: cached + b]) in self.blocks:
            cached += b
        self.requests[rid] = {
            "tokens": tokens,
            "params": params,
            "made": [],
            "cached": cached,
        }
        self.added.append(rid)

    def abort_request(self, ids: list[str]) -> None:
        self._touch()
        for rid in ids:
            self.requests.pop(rid, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def _next(self, req: dict[str, Any]) -> int:
        tokens, params = req["tokens"], req["params"]
        h = (31 * sum(tokens) + 7 * tokens[-1] + len(tokens)) % 1009
        spec = (params.get("extra_args") or {}).get(SAMPLING_KEY)
        if spec is not None and spec["temperature"] > 0:
            h ^= step_seed(spec["seed"], len(tokens)) % 1009
        elif params.get("seed") is not None:
            h ^= step_seed(params["seed"], len(req["made"])) % 1009
        return 4 + h % 90

    def step(self) -> list[Any]:
        self._touch()
        self.steps += 1
        if self.fail_next_step or (
            self.fail_with is not None and any(self.fail_with in rid for rid in self.requests)
        ):
            raise RuntimeError("injected: the engine failed")
        outputs = []
        b = self.block_size
        for rid, req in list(self.requests.items()):
            tokens, params = req["tokens"], req["params"]
            for k in range(b, len(tokens) + 1, b):  # the context's KV is computed now
                self.blocks.add(tuple(tokens[:k]))
            token = self._next(req)
            tokens.append(token)
            req["made"].append(token)
            reason = None
            if token in params.get("stop_token_ids", ()):
                reason = "stop"
            elif len(req["made"]) >= params["max_tokens"]:
                reason = "length"
            if reason is not None:
                del self.requests[rid]
            if params["final_only"] and reason is None:
                continue
            made = req["made"] if params["final_only"] else [token]
            outputs.append(
                SimpleNamespace(
                    request_id=rid,
                    finished=reason is not None,
                    outputs=[SimpleNamespace(token_ids=list(made), finish_reason=reason)],
                    num_cached_tokens=req["cached"],
                )
            )
        return outputs


class LocalTransport:
    """A ``Transport`` straight into a ``TargetHost`` (no socket)."""

    def __init__(self, host: Any) -> None:
        self.host = host

    def request(self, header: dict[str, Any], payload: bytes = b"") -> tuple[dict[str, Any], bytes]:
        return self.host.handle(header, payload)

    def close(self) -> None:
        pass
