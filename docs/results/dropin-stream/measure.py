"""Drop-in vs plain from_pretrained, and iter_tensors vs load, on the same stock folder.

    python measure.py make DIR            # a LLaMA-like bf16 model folder (~1.5 GB), random weights
    python measure.py run DIR ROUNDS [plain|load]   # fresh process each, order alternated

Every measurement is one fresh process (imports untimed); the clock stops when every weight's
pages have been read. Cold: the folder's files are dropped from the page cache first
(posix_fadvise DONTNEED, via fastckpt.io_engine.drop_page_cache). Peak RSS is VmHWM after a
reset (clear_refs 5) just before the timed part, reported as the increase.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time


def _touch(tensors) -> int:
    import torch

    total = 0
    for t in tensors:
        if t.numel():
            total += int(t.reshape(-1).view(torch.uint8)[::4096].sum())
    return total


def _rss_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def worker(kind: str, folder: str) -> None:
    import torch  # noqa: F401
    import transformers

    import fastckpt
    import fastckpt.transformers as ft

    # Untimed: the imports a first call pays in a fresh process (transformers imports each
    # model's code on first use: seconds on a busy 2-core VM), the same for both paths.
    config = transformers.AutoConfig.from_pretrained(folder)
    transformers.AutoModelForCausalLM._model_mapping[type(config)]  # imports the model code
    import fastckpt.loader.api
    import fastckpt.loader.stream

    base = _rss_kb("VmRSS")
    _rss_reset()
    start = time.perf_counter()
    if kind in ("plain", "dropin"):
        if kind == "dropin":
            ft.enable()
        model = transformers.AutoModelForCausalLM.from_pretrained(folder)
        _touch(p.data for p in model.parameters())
    elif kind == "load":
        state = fastckpt.load(folder)
        _touch(state.values())
    elif kind == "iter":
        for _, t in fastckpt.iter_tensors(folder):
            _touch([t])
            del t
    seconds = time.perf_counter() - start
    peak = _rss_kb("VmHWM") - base
    print(json.dumps({"kind": kind, "seconds": seconds, "peak_rss_mb": peak / 1024}))


def make(folder: str) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=12,
        num_attention_heads=16,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, p in model.state_dict().items():
        t = torch.randn(p.shape, generator=gen, dtype=torch.float32) * 0.02
        state[name] = (t + 1 if name.endswith("norm.weight") else t).to(torch.bfloat16)
    os.makedirs(folder, exist_ok=True)
    config.save_pretrained(folder)
    save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    print(sum(t.numel() * 2 for t in state.values()) / 1e9, "GB")


def run(folder: str, rounds: int, which: str = "all") -> None:
    from fastckpt import io_engine

    files = [os.path.join(folder, f) for f in os.listdir(folder)]
    pairs = [("plain", "dropin"), ("load", "iter")]
    if which != "all":
        pairs = [p for p in pairs if which in p]
    results: dict[tuple[str, str], list[dict]] = {}
    for r in range(rounds):
        for scenario in ("cold", "warm"):
            for a, b in pairs:
                order = (a, b) if r % 2 == 0 else (b, a)
                for kind in order:
                    if scenario == "cold":
                        for f in files:
                            io_engine.drop_page_cache(f)
                    else:
                        for f in files:  # make sure it is resident
                            with open(f, "rb") as fh:
                                while fh.read(1 << 24):
                                    pass
                    out = subprocess.run(
                        [sys.executable, __file__, "worker", kind, folder],
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    rec = json.loads(out.stdout.strip().splitlines()[-1])
                    results.setdefault((scenario, kind), []).append(rec)
                    print(r, scenario, rec, flush=True)
    nbytes = os.path.getsize(os.path.join(folder, "model.safetensors"))
    print(f"\nmodel.safetensors {nbytes / 1e9:.2f} GB, {rounds} rounds, load {os.getloadavg()}")
    print("| scenario | what | median s | min-max s | GB/s | peak RSS MB (median) |")
    print("|---|---|---:|---:|---:|---:|")
    for (scenario, kind), recs in sorted(results.items()):
        secs = [x["seconds"] for x in recs]
        med = statistics.median(secs)
        rss = statistics.median(x["peak_rss_mb"] for x in recs)
        print(
            f"| {scenario} | {kind} | {med:.3f} | {min(secs):.3f}-{max(secs):.3f} | "
            f"{nbytes / med / 1e9:.2f} | {rss:.0f} |"
        )


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        worker(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "make":
        make(sys.argv[2])
    else:
        run(sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else "all")
