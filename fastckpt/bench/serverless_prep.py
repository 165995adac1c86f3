"""What the serverless benchmark prepares before any cluster starts (``fastckpt.bench.serverless``):
the models (real architectures, random weights, stock safetensors folders in a "store" standing
for remote storage), the greedy reference tokens every response is checked against, and the
calibration of each tier of the deployment's own load path and of each model's token steps."""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastckpt.bench.tenants import BackgroundSampler
from fastckpt.sched.sim_serve import ComputeCost, CoRun

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
    # run -> tier -> {"step_slowdown", "load_slowdown", "samples"}: a start and token steps in
    # one process (``corun``)
    corun: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def coruns(self) -> dict[str, dict[str, CoRun]]:
        return coruns_of(self.corun)


def coruns_of(data: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, CoRun]]:
    """``Calibration.corun`` as the simulator's ``CoRun`` per run and tier."""
    return {
        run: {t: CoRun(float(f["step_slowdown"]), float(f["load_slowdown"])) for t, f in by.items()}
        for run, by in data.items()
    }

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
    # a start beside token steps in one process, per tier of each run: the largest model loads
    # (prepared as above) while a middle one takes first-token steps
    big, mid = order[-1], order[len(order) // 2]
    stepper = load_transformers(entries[mid], "cpu", None)
    shape = next(s for s in shapes if s.name == mid)

    def step() -> None:
        decode_step(stepper, prompt_of(shape, 0), None)

    with fastckpt.Loader(**settings) as warm:

        def dram_load() -> Any:
            return load_transformers(entries[big], "cpu", warm)

        dram_load()
        cases: dict[str, dict[str, tuple[Callable[[], Any], Callable[[], Any]]]] = {
            "plain": {
                "remote": (
                    lambda: _drop([paths[big]]),
                    lambda: load_transformers(entries[big], "cpu", None),
                )
            },
            "fastckpt": {
                "remote": (lambda: cold_remote(big), lambda: fresh(big)),
                "ssd": (lambda: cold_ssd(big), lambda: fresh(big)),
                "dram": (lambda: None, dram_load),
            },
        }
        corun = {
            run: {t: measure_corun(prep, load, step, repeats) for t, (prep, load) in by.items()}
            for run, by in cases.items()
        }
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
    return Calibration(tiers, compute, profile_path, corun=corun)


def measure_corun(
    prepare: Callable[[], Any],
    load: Callable[[], Any],
    step: Callable[[], Any],
    repeats: int,
) -> dict[str, Any]:
    """How ``load`` (after ``prepare``) and ``step`` slow each other in one process: each
    repeat times steps alone, the load alone, then the load in a thread while this thread
    takes steps until it ends. Slowdowns are medians over repeats, at least 1 (a co-run
    faster than alone is noise); a load shorter than one step gives no step sample."""
    samples: list[dict[str, Any]] = []
    for _ in range(max(1, repeats)):
        alone = []
        for _ in range(5):
            t0 = time.perf_counter()
            step()
            alone.append(time.perf_counter() - t0)
        prepare()
        t0 = time.perf_counter()
        load()
        load_alone = time.perf_counter() - t0
        prepare()
        load_during, during = _load_beside(load, step)
        samples.append(
            {
                "step_alone_s": statistics.median(alone),
                "step_during_s": statistics.median(during) if during else None,
                "steps_during": len(during),
                "load_alone_s": load_alone,
                "load_during_s": load_during,
            }
        )
    steps = [x["step_during_s"] / x["step_alone_s"] for x in samples if x["step_during_s"]]
    loads = [x["load_during_s"] / x["load_alone_s"] for x in samples]
    return {
        "step_slowdown": max(1.0, statistics.median(steps)) if steps else 1.0,
        "load_slowdown": max(1.0, statistics.median(loads)),
        "samples": samples,
    }


def _load_beside(load: Callable[[], Any], step: Callable[[], Any]) -> tuple[float, list[float]]:
    """``load`` in a thread while this thread takes steps until it ends: (the load's seconds,
    each whole step's seconds)."""
    done = threading.Event()
    box: dict[str, Any] = {}

    def run() -> None:
        t0 = time.perf_counter()
        try:
            load()
        except BaseException as exc:  # re-raised in the caller
            box["error"] = exc
        box["s"] = time.perf_counter() - t0
        done.set()

    th = threading.Thread(target=run, name="fastckpt-corun-load")
    th.start()
    during = []
    while not done.is_set():
        t0 = time.perf_counter()
        step()
        if not done.is_set():  # a step the load's end cut short says nothing
            during.append(time.perf_counter() - t0)
    th.join()
    if "error" in box:
        raise box["error"]
    return float(box["s"]), during
