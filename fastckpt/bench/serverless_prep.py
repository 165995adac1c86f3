"""What the serverless benchmark prepares before any cluster starts (``fastckpt.bench.serverless``):
the models (real architectures, random weights, stock safetensors folders in a "store" standing
for remote storage), the greedy reference tokens every response is checked against, and the
calibration of each tier of the deployment's own load path and of each model's token steps."""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fastckpt.bench.tenants import BackgroundSampler
from fastckpt.sched.sim_serve import ComputeCost

PROMPTS = 4  # distinct prompts per model (references are computed once per prompt)
PROMPT_LEN = 8


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only model: architecture, width, depth, vocabulary (fp32 weights)."""

    name: str
    arch: str  # llama | qwen2 | mistral | gpt2
    hidden: int
    layers: int
    vocab: int
    seed: int

    def config(self) -> Any:
        import transformers

        heads = max(1, self.hidden // 64)
        if self.arch == "gpt2":
            return transformers.GPT2Config(
                vocab_size=self.vocab,
                n_embd=self.hidden,
                n_layer=self.layers,
                n_head=heads,
                n_positions=256,
                bos_token_id=self.vocab - 1,
                eos_token_id=self.vocab - 1,
            )
        cls = {
            "llama": transformers.LlamaConfig,
            "qwen2": transformers.Qwen2Config,
            "mistral": transformers.MistralConfig,
        }[self.arch]
        return cls(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.hidden * 8 // 3 // 32 * 32,
            num_hidden_layers=self.layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=256,
            tie_word_embeddings=False,
        )


#: The full run: six models of 28-254 MB (705 MB), 3 nodes whose 600 MB DRAM tiers hold most.
FULL_MODELS = (
    ModelShape("llama-a", "llama", 768, 6, 16000, 1),
    ModelShape("qwen-b", "qwen2", 640, 6, 16000, 2),
    ModelShape("mistral-c", "mistral", 512, 6, 12000, 3),
    ModelShape("gpt2-d", "gpt2", 512, 4, 12000, 4),
    ModelShape("llama-e", "llama", 384, 4, 8000, 5),
    ModelShape("qwen-f", "qwen2", 256, 4, 8000, 6),
)
#: The small version: three models of 2-6 MB on 2 nodes.
QUICK_MODELS = (
    ModelShape("llama-a", "llama", 128, 2, 4000, 1),
    ModelShape("qwen-b", "qwen2", 96, 2, 4000, 2),
    ModelShape("gpt2-c", "gpt2", 64, 2, 4000, 3),
)


# --------------------------------------------------------------------------------------------
# models and references
# --------------------------------------------------------------------------------------------


def make_models(store: str, shapes: Sequence[ModelShape]) -> dict[str, str]:
    """Save each model (random weights, seeded) as a safetensors model folder under ``store``;
    folders already there are kept."""
    import torch
    import transformers

    os.makedirs(store, exist_ok=True)
    out = {}
    for shape in shapes:
        path = os.path.join(store, shape.name)
        out[shape.name] = path
        if os.path.exists(os.path.join(path, "config.json")):
            continue
        torch.manual_seed(shape.seed)
        cfg = shape.config()
        model = transformers.AutoModelForCausalLM.from_config(cfg)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.05)
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        os.replace(tmp, path)
    return out


def prompt_of(shape: ModelShape, k: int) -> list[int]:
    """The ``k``-th prompt of a model (token ids inside its vocabulary)."""
    return [(shape.seed * 131 + k * 17 + j * 7) % (shape.vocab - 1) for j in range(PROMPT_LEN)]


def references(paths: Mapping[str, str], shapes: Sequence[ModelShape], tokens: int) -> dict:
    """Greedy tokens of every prompt of every model, from ``from_pretrained``."""
    from transformers import AutoModelForCausalLM

    from fastckpt.integrations.ray_serve.host import greedy_tokens

    out: dict[str, list[list[int]]] = {}
    for shape in shapes:
        model = AutoModelForCausalLM.from_pretrained(paths[shape.name]).eval()
        out[shape.name] = [
            greedy_tokens(model, prompt_of(shape, k), tokens) for k in range(PROMPTS)
        ]
        del model
    return out


# --------------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------------


@dataclass
class Calibration:
    tiers: dict[str, dict[str, Any]]  # tier -> fit (bandwidth_bps, overhead_s, ...) and samples
    compute: dict[str, ComputeCost]
    profile_path: str
    background: float = 0.0  # other scheduling groups with runnable threads while calibrating

    def speeds(self) -> dict[str, Any]:
        from fastckpt.sched.model import TierSpeed

        return {t: TierSpeed(t, f["bandwidth_bps"], f["overhead_s"]) for t, f in self.tiers.items()}


def _drop(paths: Sequence[str]) -> None:
    from fastckpt.io_engine import drop_page_cache

    for root in paths:
        for dirpath, _, names in os.walk(root):
            for n in names:
                with contextlib.suppress(OSError):
                    drop_page_cache(os.path.join(dirpath, n))


def calibrate(
    paths: Mapping[str, str],
    shapes: Sequence[ModelShape],
    workdir: str,
    *,
    repeats: int,
    threads: int = 1,
) -> Calibration:
    """Fit each tier of the deployment's load path (module docstring) and time first tokens,
    noting the other tenants' load meanwhile."""
    with BackgroundSampler(lambda: [os.getsid(0)]) as sampler:  # all but this process's group
        cal = _calibrate(paths, shapes, workdir, repeats=repeats, threads=threads)
    cal.background = sampler.mean()
    return cal


def _calibrate(
    paths: Mapping[str, str],
    shapes: Sequence[ModelShape],
    workdir: str,
    *,
    repeats: int,
    threads: int,
) -> Calibration:
    import torch

    import fastckpt
    from fastckpt.integrations.ray_serve.catalog import ModelEntry
    from fastckpt.integrations.ray_serve.host import decode_step, load_transformers
    from fastckpt.sched.calibrate import measure_tier
    from fastckpt.sched.profile import MachineProfile, profile_from_fits

    torch.set_num_threads(threads)
    ssd_dir = os.path.join(workdir, "calib-ssd")
    shutil.rmtree(ssd_dir, ignore_errors=True)
    sizes = {n: sum(os.path.getsize(os.path.join(p, f)) for f in os.listdir(p) if
                    f.endswith(".safetensors")) for n, p in paths.items()}  # fmt: skip
    entries = {n: ModelEntry(n, p, sizes[n]) for n, p in paths.items()}
    settings: dict[str, Any] = {
        "dram_tier_bytes": 4 << 30,
        "ssd_tier_bytes": 8 << 30,
        "ssd_tier_dir": ssd_dir,
    }

    def timed(load: Callable[[], Any], name: str) -> tuple[int, float]:
        t0 = time.perf_counter()
        model = load()
        seconds = time.perf_counter() - t0
        del model
        return sizes[name], seconds

    def fresh(name: str) -> tuple[int, float]:
        # a Loader of its own: an empty DRAM tier, the SSD tier's copies on disk; closing it
        # unlocks what its DRAM tier held, so the next measurement's page-cache drop works
        with fastckpt.Loader(**settings) as loader:
            return timed(lambda: load_transformers(entries[name], "cpu", loader), name)

    def copies() -> list[str]:
        return [os.path.join(ssd_dir, d) for d in os.listdir(ssd_dir) if not d.startswith(".")]

    def cold_remote(name: str) -> None:
        with fastckpt.Loader(**settings) as loader:
            loader.evict(paths[name])  # the SSD tier's copy
        _drop([paths[name]])

    def cold_ssd(name: str) -> None:
        with fastckpt.Loader(**settings) as loader:
            loader.prefetch(paths[name], tier="ssd").result()
        _drop([paths[name], *copies()])

    order = sorted(paths, key=lambda n: sizes[n])
    runs = {
        "remote": measure_tier("remote", fresh, order, prepare=cold_remote, repeats=repeats),
        "ssd": measure_tier("ssd", fresh, order, prepare=cold_ssd, repeats=repeats),
    }
    with fastckpt.Loader(**settings) as warm:

        def in_dram(name: str) -> None:
            timed(lambda: load_transformers(entries[name], "cpu", warm), name)

        runs["dram"] = measure_tier(
            "dram",
            lambda n: timed(lambda: load_transformers(entries[n], "cpu", warm), n),
            order,
            prepare=in_dram,
            repeats=repeats,
        )
    runs["plain"] = measure_tier(
        "plain",
        lambda n: timed(lambda: load_transformers(entries[n], "cpu", None), n),
        order,
        prepare=lambda n: _drop([paths[n]]),
        repeats=repeats,
    )
    profile = profile_from_fits("cpu", {t: r.fit for t, r in runs.items() if t != "plain"})
    profile_path = os.path.join(workdir, "sched-profile.json")
    MachineProfile.save(profile, profile_path)
    compute = {}
    for shape in shapes:
        model = load_transformers(entries[shape.name], "cpu", None)
        firsts, steps = [], []
        for k in range(PROMPTS + 1):
            t0 = time.perf_counter()
            nxt, past = decode_step(model, prompt_of(shape, k % PROMPTS), None)
            t1 = time.perf_counter()
            decode_step(model, [nxt], past)
            t2 = time.perf_counter()
            if k:  # the first round warms the code paths
                firsts.append(t1 - t0)
                steps.append(t2 - t1)
        compute[shape.name] = ComputeCost(statistics.median(firsts), statistics.median(steps))
        del model
    tiers = {
        t: {
            "bandwidth_bps": r.fit.bandwidth_bps,
            "overhead_s": r.fit.overhead_s,
            "max_rel_residual": r.fit.max_rel_residual,
            "samples": [[s.nbytes, s.seconds] for s in r.samples],
            "warmup": r.warmup,
        }
        for t, r in runs.items()
    }
    shutil.rmtree(ssd_dir, ignore_errors=True)
    return Calibration(tiers, compute, profile_path)
