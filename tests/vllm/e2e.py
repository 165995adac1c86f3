"""End-to-end check of the fastckpt vLLM plug-in; runs in the interpreter that has vLLM (the
separate venv of make_venv.sh), started by tests/vllm/test_vllm_e2e.py or by hand:

    .vllm-venv/bin/python tests/vllm/e2e.py WORKDIR [--models llama,qwen2] [--tp 1]

For each tiny model (random weights, built from a config, no downloads) it writes a stock
safetensors folder and a fastckpt-converted copy, then generates greedily from the same token
prompts with load_format "safetensors" (the stock folder), "fastckpt" on the stock folder and
"fastckpt" on the converted folder. Each engine runs in a fresh process (vLLM keeps global state
per process). Prints one JSON object: tokens per (model, case) and vLLM's load seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

PROMPTS = [[1, 17, 42, 99, 7], [5, 300, 8], [250, 251, 252, 253, 254, 255, 2]]
MAX_TOKENS = 12
_LOAD_RE = re.compile(r"Model loading took ([0-9.]+) GiB memory and ([0-9.]+) seconds")


def build_model(kind: str, root: str) -> str:
    """Write a tiny random model of ``kind`` (llama, qwen2, gpt2) as a stock folder."""
    import torch
    import transformers

    out = os.path.join(root, kind)
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    small = dict(vocab_size=512, max_position_embeddings=256)
    if kind == "llama":
        cfg = transformers.LlamaConfig(
            **small,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        )
        cls = transformers.LlamaForCausalLM
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(
            **small,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
        cls = transformers.Qwen2ForCausalLM
    elif kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=512, n_positions=256, n_embd=64, n_layer=2, n_head=4)
        cls = transformers.GPT2LMHeadModel
    else:
        raise SystemExit(f"unknown model kind {kind!r}")
    torch.manual_seed(0)
    model = cls(cfg).to(torch.bfloat16)
    with torch.no_grad():  # spread the logits so greedy tokens are not ties
        for p in model.parameters():
            p.mul_(4.0)
    model.save_pretrained(out)
    return out


def convert(src: str, root: str) -> str:
    import fastckpt

    dst = os.path.join(root, os.path.basename(src) + "-fastckpt")
    if not os.path.exists(dst):
        fastckpt.convert(src, dst)
    return dst


ENGINE = r"""
import json, sys
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    llm = LLM(model=args["model"], load_format=args["load_format"], skip_tokenizer_init=True,
              dtype="bfloat16", max_model_len=128, max_num_seqs=4, enforce_eager=True,
              gpu_memory_utilization=args["mem"], tensor_parallel_size=args["tp"],
              model_loader_extra_config=args["extra"] or None, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=args["max_tokens"], ignore_eos=True,
                            detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in args["prompts"]], params)
    print("E2E_RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]), flush=True)
"""


def run_engine(
    model: str,
    load_format: str,
    *,
    tp: int = 1,
    extra: dict[str, object] | None = None,
    mem: float = 0.1,
    timeout_s: float = 600,
) -> dict[str, object]:
    """Generate in a fresh process; returns tokens, vLLM's load seconds and the wall time."""
    args = dict(
        model=model,
        load_format=load_format,
        tp=tp,
        extra=extra or {},
        mem=mem,
        prompts=PROMPTS,
        max_tokens=MAX_TOKENS,
    )
    env = dict(os.environ, VLLM_CONFIGURE_LOGGING="1", TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", ENGINE, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
    )
    wall = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    tokens = None
    for line in proc.stdout.splitlines():
        if line.startswith("E2E_RESULT "):
            tokens = json.loads(line.split(" ", 1)[1])
    load = [float(m.group(2)) for m in _LOAD_RE.finditer(log)]
    return {
        "rc": proc.returncode,
        "tokens": tokens,
        "load_s": load,
        "wall_s": round(wall, 2),
        "log_tail": "" if proc.returncode == 0 else log[-4000:],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir")
    ap.add_argument("--models", default="llama,qwen2")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--mem", type=float, default=0.1)
    a = ap.parse_args(argv)
    os.makedirs(a.workdir, exist_ok=True)
    results: dict[str, dict[str, object]] = {}
    for kind in a.models.split(","):
        stock = build_model(kind, a.workdir)
        converted = convert(stock, a.workdir)
        cases = {
            "safetensors": (stock, "safetensors"),
            "fastckpt_stock": (stock, "fastckpt"),
            "fastckpt_converted": (converted, "fastckpt"),
        }
        results[kind] = {
            case: run_engine(model, fmt, tp=a.tp, mem=a.mem) for case, (model, fmt) in cases.items()
        }
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
