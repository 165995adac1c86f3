"""Shared pieces of the migration tests: a tiny random Llama, a target server process, a client
that checks exactly-once delivery, and wrappers that inject failures through the protocols."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fastckpt.migrate import MigrationSource, MigrationTarget, TargetStateError, TokenState

VOCAB = 96
PROMPT = (3, 14, 15, 92, 65, 35, 89, 79)


def build_tiny_llama(
    root: Path,
    *,
    dtype: str | None = None,
    seed: int = 0,
    convert: bool = True,
    **config: Any,
) -> Path:
    """Save a tiny random LlamaForCausalLM (from a config, nothing downloaded; ``config``
    overrides its fields) and convert it to a fastckpt checkpoint; returns the fastckpt
    directory, or the stock one with ``convert=False``."""
    import torch
    import transformers

    import fastckpt

    cfg = transformers.LlamaConfig(
        **{
            "vocab_size": VOCAB,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "tie_word_embeddings": False,
            **config,
        }
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * (0.3 if "embed" in name else 0.15)
            p.copy_(noise + (1.0 if name.endswith("norm.weight") else 0.0))
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    src = root / f"llama-{dtype or 'f32'}-src"
    model.save_pretrained(src, safe_serialization=True)
    if not convert:
        return src
    fck = root / f"llama-{dtype or 'f32'}-fck"
    fastckpt.convert(src, fck)
    return fck


@dataclass
class Server:
    proc: subprocess.Popen[str]
    host: str
    port: int

    def stop(self) -> None:
        """SIGTERM (the server's normal stop), then close its stdin; kill if it hangs."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.stdin is not None
        self.proc.stdin.close()


def start_server(
    model_dir: Path,
    *,
    lease_s: float,
    extra: tuple[str, ...] = ("--exit-on-stdin-eof",),
    env: dict[str, str] | None = None,
) -> Server:
    """Start ``python -m fastckpt.migrate.serve`` and wait for its ``listening`` line (lines
    before it, such as an engine's log, are skipped)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fastckpt.migrate.serve",
            "--model",
            str(model_dir),
            "--lease-s",
            str(lease_s),
            "--threads",
            "1",
            *extra,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    seen: list[str] = []
    for raw in proc.stdout:
        line = raw.split()
        if len(line) == 3 and line[0] == "listening":
            return Server(proc, line[1], int(line[2]))
        seen.append(raw)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"target server did not start; its output ended with {seen[-20:]!r}")


class Client:
    """What the user sees: tokens by index, each of which must arrive exactly once."""

    def __init__(self) -> None:
        self.tokens: dict[int, int] = {}
        self.duplicates: list[tuple[int, int]] = []

    def emit(self, index: int, token: int) -> None:
        if index in self.tokens:
            self.duplicates.append((index, token))
        self.tokens[index] = token

    def add(self, pairs: list[list[int]]) -> None:
        for i, t in pairs:
            self.emit(i, t)

    def output(self) -> list[int]:
        assert not self.duplicates, f"tokens delivered twice: {self.duplicates}"
        assert sorted(self.tokens) == list(range(len(self.tokens))), "a token is missing"
        return [self.tokens[i] for i in range(len(self.tokens))]


class FaultyTarget:
    """A MigrationTarget that forwards to ``inner`` and fails where told.

    fail_prefill_at: raise instead of the n-th prefill (1-based).
    commit: "before" raises without committing, "after" commits then raises (a lost reply),
        "twice" commits twice (a duplicate commit).
    """

    def __init__(
        self,
        inner: MigrationTarget,
        *,
        fail_prefill_at: int | None = None,
        commit: str | None = None,
        commit_failures: int = 1,
    ) -> None:
        self.inner = inner
        self.fail_prefill_at = fail_prefill_at
        self.commit_mode = commit
        self.commit_failures = commit_failures
        self.prefills = 0
        self.commits = 0
        self.aborts: list[bool] = []

    def prefill(self, state: TokenState) -> int:
        self.prefills += 1
        if self.prefills == self.fail_prefill_at:
            raise RuntimeError("injected: target failed mid-round")
        return self.inner.prefill(state)

    def commit(self, state: TokenState) -> None:
        self.commits += 1
        if self.commit_mode == "before" and self.commits <= self.commit_failures:
            raise RuntimeError("injected: commit failed before reaching the target")
        self.inner.commit(state)
        if self.commit_mode == "twice":
            self.inner.commit(state)
        if self.commit_mode == "after" and self.commits <= self.commit_failures:
            raise RuntimeError("injected: commit reply lost")

    def abort(self) -> bool:
        r = self.inner.abort()
        self.aborts.append(r)
        return r


class MappedSource:
    """A MigrationSource whose states pass through ``fn`` (e.g. to drop the sampling state)."""

    def __init__(self, inner: MigrationSource, fn: Callable[[TokenState], TokenState]) -> None:
        self.inner = inner
        self.fn = fn

    def snapshot(self) -> TokenState:
        return self.fn(self.inner.snapshot())

    def freeze(self) -> TokenState:
        return self.fn(self.inner.freeze())

    def unfreeze(self) -> None:
        self.inner.unfreeze()

    def release(self) -> None:
        self.inner.release()


def drop_generator_state(state: TokenState) -> TokenState:
    return state.replace(sampling=replace(state.sampling, generator_state=None))


def pace(source: Any, tokens_after_round: list[int]) -> Callable[[Any], None]:
    """An after_round hook: the source decodes tokens_after_round[i] tokens after round i+1."""

    def hook(info: Any) -> None:
        i = info.round - 1
        if i < len(tokens_after_round):
            source.run(tokens_after_round[i])

    return hook


class MemTarget:
    """A HostedTarget without a model."""

    def __init__(self) -> None:
        self.tokens: tuple[int, ...] = ()
        self._committed: TokenState | None = None
        self._status = "empty"
        self.freed = False

    @property
    def committed(self) -> bool:
        return self._committed is not None

    @property
    def covered(self) -> int:
        return len(self.tokens)

    def prefill(self, state: TokenState) -> int:
        state.check_model("m")
        if state.prompt_ids[0] == 0:
            raise ZeroDivisionError("engine blew up")
        self.tokens, self._status = state.tokens, "prefilling"
        return len(self.tokens)

    def commit(self, state: TokenState) -> None:
        if self._committed is not None and self._committed != state:
            raise TargetStateError("committed with another state")
        self.prefill(state)
        self._committed, self._status = state, "committed"

    def abort(self) -> bool:
        if self._committed is not None:
            return False
        self.freed, self._status = True, "aborted"
        return True

    def expire(self) -> None:
        self.freed, self._status = True, "expired"

    def status(self) -> str:
        return self._status

    def result(self, timeout_s: float | None) -> dict[str, Any]:
        return {"tokens": [[0, 5]], "finished": True, "finish_reason": "length"}
