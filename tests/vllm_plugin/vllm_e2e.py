"""End-to-end check of the fastckpt vLLM plug-in; runs in the interpreter that has vLLM (the
separate venv of make_venv.sh), started by tests/vllm_plugin/test_vllm_e2e.py or by hand:

    .vllm-venv/bin/python tests/vllm_plugin/vllm_e2e.py WORKDIR [--models llama,qwen2] [--tp 1]

For each tiny model (random weights, built from a config, no downloads) it writes a stock
safetensors folder and a fastckpt-converted copy, then generates greedily from the same token
prompts with load_format "safetensors" (the stock folder), "fastckpt" on the stock folder and
"fastckpt" on the converted folder, all in one fresh interpreter; with --spawn, once more with
vLLM's own worker processes. Prints one line "E2E_ALL {json}": tokens or error per case and
vLLM's "Loading weights took" seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

from fastckpt.serve.spawn import start_daemon as spawn_daemon
from fastckpt.serve.spawn import stop_daemon

PROMPTS = [[1, 17, 42, 99, 7], [5, 300, 8], [250, 251, 252, 253, 254, 255, 2]]
MAX_TOKENS = 12


def build_model(kind: str, root: str) -> str:
    """Write a tiny random model of ``kind`` (llama, qwen2, gpt2) as a stock folder. Head size
    64: vLLM's CPU attention kernels refuse smaller ones."""
    import torch
    import transformers

    out = os.path.join(root, kind)
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    small = dict(vocab_size=512, max_position_embeddings=256)
    if kind == "llama":
        cfg = transformers.LlamaConfig(
            **small,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=False,
        )
        cls = transformers.LlamaForCausalLM
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(
            **small,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=True,
        )
        cls = transformers.Qwen2ForCausalLM
    elif kind == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=512, n_positions=256, n_embd=128, n_layer=2, n_head=2
        )
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


# Runs in a fresh interpreter: each case builds an LLM, generates, and is torn down. The engine
# core and its worker run inside this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, executor "uni")
# so that the cases share one vLLM import; with "spawn" the engine starts its processes the way
# `vllm serve` does (the plug-in is then registered in each spawned process by its entry point).
ENGINE = r"""
import gc, json, sys, time, traceback
from vllm import LLM, SamplingParams
from vllm.distributed import cleanup_dist_env_and_memory
if __name__ == "__main__":
    job = json.loads(sys.argv[1])
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True,
                            detokenize=False)
    for case in job["cases"]:
        out = {"case": case["name"]}
        start = time.perf_counter()
        backend = None if job["spawn"] else "uni"
        try:
            if "export" in case:  # fastckpt vllm-export, run here (one vLLM engine)
                from fastckpt.integrations.vllm.export import export_model
                made = export_model(case["model"], case["export"], overwrite=True,
                                    tensor_parallel_size=case.get("tp", 1), dtype="bfloat16",
                                    engine_args=dict(gpu_memory_utilization=job["mem"],
                                                     distributed_executor_backend=backend,
                                                     seed=0))
                out["exported"] = made.describe()
            else:
                llm = LLM(model=case["model"], load_format=case["load_format"],
                          skip_tokenizer_init=True, dtype=case.get("dtype", "bfloat16"),
                          max_model_len=128, max_num_seqs=4, enforce_eager=True,
                          gpu_memory_utilization=job["mem"],
                          tensor_parallel_size=case.get("tp", 1),
                          distributed_executor_backend=backend,
                          model_loader_extra_config=case.get("extra") or {}, seed=0)
                res = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]], params)
                out["tokens"] = [list(o.outputs[0].token_ids) for o in res]
                del llm
        except Exception as e:
            out["error"] = f"{type(e).__name__}: {e}"
            out["traceback"] = traceback.format_exc()[-3000:]
        out["wall_s"] = round(time.perf_counter() - start, 2)
        gc.collect()
        cleanup_dist_env_and_memory()
        print("E2E_RESULT " + json.dumps(out), flush=True)
"""

_WEIGHTS_RE = re.compile(r"Loading weights took ([0-9.]+) seconds")
# the plug-in's line per rank (fastckpt/integrations/vllm/loader.py)
_RANK_RE = re.compile(
    r"fastckpt rank tp=(\d+)/(\d+) pp=\d+/\d+ on (\S+): read (\d+) bytes for (\d+) bytes of "
    r"tensors \(checkpoint (-?\d+) bytes\) via (\S+)"
)


def run_cases(
    cases: list[dict[str, object]],
    *,
    spawn: bool = False,
    mem: float = 0.1,
    timeout_s: float = 900,
    env_extra: dict[str, str] | None = None,
) -> tuple[dict[str, dict[str, object]], str]:
    """Run ``cases`` (name, model, load_format, optional extra and tp) in one fresh interpreter.
    Returns ``{name: {tokens | error, wall_s, weights_s}}`` and the combined log."""
    job = dict(cases=cases, spawn=spawn, mem=mem, prompts=PROMPTS, max_tokens=MAX_TOKENS)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", **(env_extra or {}))
    if not spawn:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    proc = subprocess.run(
        [sys.executable, "-c", ENGINE, json.dumps(job)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # one stream, so each timer line precedes its case's result
        text=True,
        timeout=timeout_s,
        env=env,
    )
    log = proc.stdout
    results: dict[str, dict[str, object]] = {}
    timers: list[float] = []  # vLLM's "Loading weights took", one per rank that logs it
    ranks: list[dict[str, object]] = []  # the plug-in's bytes read, one per rank
    # fastckpt's errors logged by the case's workers: with spawned workers vLLM's exception says
    # only "Engine core initialization failed", the worker's own message is in the log
    errors: list[str] = []
    for line in log.splitlines():
        if "fastckpt" in line and ("MismatchError" in line or "OptionsError" in line):
            errors.append(line[-3000:])
        m = _WEIGHTS_RE.search(line)
        r = _RANK_RE.search(line)
        if m:
            timers.append(float(m.group(1)))
        if r:
            ranks.append(
                dict(
                    tp_rank=int(r.group(1)),
                    tp_size=int(r.group(2)),
                    device=r.group(3),
                    read_nbytes=int(r.group(4)),
                    tensor_nbytes=int(r.group(5)),
                    checkpoint_nbytes=int(r.group(6)),
                    via=r.group(7),
                )
            )
        if line.startswith("E2E_RESULT "):
            out = json.loads(line.split(" ", 1)[1])
            out["weights_s"] = timers
            out["ranks"] = sorted(ranks, key=lambda x: int(str(x["tp_rank"])))
            if "error" in out:
                out["error"] = "\n".join([out["error"], *errors[-4:]])
            timers, ranks, errors = [], [], []
            results[out.pop("case")] = out
    if proc.returncode != 0 or len(results) != len(cases):
        results["_runner"] = {"error": f"runner exited {proc.returncode}", "log_tail": log[-6000:]}
    return results, log


def cpu_bind(ranks: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for ``ranks`` CPU workers: this process's CPUs split into equal
    runs ("0|1" on two cores). vLLM's automatic binding wants one NUMA node per rank and refuses
    TP > 1 on a one-node machine."""
    if os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
        return os.environ["VLLM_CPU_OMP_THREADS_BIND"]
    cpus = sorted(os.sched_getaffinity(0))
    per = max(1, len(cpus) // ranks)
    runs = [cpus[r * per : (r + 1) * per] or cpus[-1:] for r in range(ranks)]
    return "|".join(str(c[0]) if len(c) == 1 else f"{c[0]}-{c[-1]}" for c in runs)


def start_daemon(workdir: str) -> tuple[subprocess.Popen[bytes], str]:
    """A ``fastckpt serve`` daemon for the models under ``workdir`` (the node's DRAM tier that
    outlives vLLM's processes); returns it and its socket path once it answers."""
    sock = os.path.join(workdir, "run", "fastckpt.sock")
    return spawn_daemon(sock, workdir, "256MiB"), sock


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir")
    ap.add_argument("--models", default="llama,qwen2")
    ap.add_argument("--mem", type=float, default=0.1)
    ap.add_argument(
        "--spawn", action="store_true", help="also run the converted llama with spawned workers"
    )
    ap.add_argument(
        "--export", action="store_true", help="per-rank exports (vllm-export) and their refusal"
    )
    ap.add_argument("--server", action="store_true", help="restarts served by fastckpt serve")
    ap.add_argument("--tp", type=int, default=0, help="also run every model with this TP size")
    a = ap.parse_args(argv)
    os.makedirs(a.workdir, exist_ok=True)
    cases: list[dict[str, object]] = []
    models = a.models.split(",")
    folders = {}
    for kind in models:
        stock = build_model(kind, a.workdir)
        folders[kind] = (stock, convert(stock, a.workdir))
    for kind, (stock, converted) in folders.items():
        cases += [
            dict(name=f"{kind}/safetensors", model=stock, load_format="safetensors"),
            dict(name=f"{kind}/fastckpt_stock", model=stock, load_format="fastckpt"),
            dict(name=f"{kind}/fastckpt_converted", model=converted, load_format="fastckpt"),
        ]
        if a.export:
            out = os.path.join(a.workdir, f"{kind}-export-tp1")
            cases += [
                dict(name=f"{kind}/export_tp1", model=stock, export=out),
                dict(name=f"{kind}/fastckpt_export", model=out, load_format="fastckpt"),
            ]
    # Clear errors, checked through vLLM: an unknown option, and a checkpoint of another model.
    first, other = models[0], models[-1]
    cases.append(
        dict(
            name="error/unknown_option",
            model=folders[first][0],
            load_format="fastckpt",
            extra={"engin": "pread"},
        )
    )
    if other != first:
        cases.append(
            dict(
                name="error/mismatch",
                model=folders[first][0],
                load_format="fastckpt",
                extra={"checkpoint": folders[other][1]},
            )
        )
    if a.export:  # an export made for bfloat16, run as float16: refused, saying so
        cases.append(
            dict(
                name="error/export_dtype",
                model=os.path.join(a.workdir, f"{first}-export-tp1"),
                load_format="fastckpt",
                dtype="float16",
            )
        )
    results, _ = run_cases(cases, mem=a.mem)
    if a.server:
        daemon, sock = start_daemon(a.workdir)
        try:
            server_cases: list[dict[str, object]] = [
                dict(
                    name=f"{first}/fastckpt_server_{when}",
                    model=folders[first][1],
                    load_format="fastckpt",
                    extra={"server": sock},
                )
                for when in ("first", "restart")
            ]
            # each start in a fresh engine process, as a restarted vLLM would be
            for case in server_cases:
                got, _ = run_cases([case], spawn=True, mem=a.mem)
                results.update(got)
        finally:
            stop_daemon(daemon)
    if a.spawn:
        spawned, _ = run_cases(
            [
                dict(
                    name=f"{first}/fastckpt_converted_spawn",
                    model=folders[first][1],
                    load_format="fastckpt",
                )
            ],
            spawn=True,
            mem=a.mem,
        )
        results.update(spawned)
    if a.tp > 1:
        tp = a.tp
        tp_cases: list[dict[str, object]] = []
        for kind, (stock, converted) in folders.items():
            tp_cases += [
                dict(name=f"{kind}/safetensors_tp{tp}", model=stock, load_format="safetensors"),
                dict(name=f"{kind}/fastckpt_stock_tp{tp}", model=stock, load_format="fastckpt"),
                dict(
                    name=f"{kind}/fastckpt_converted_tp{tp}",
                    model=converted,
                    load_format="fastckpt",
                ),
            ]
            if a.export:
                out = os.path.join(a.workdir, f"{kind}-export-tp{tp}")
                tp_cases += [
                    dict(name=f"{kind}/export_tp{tp}", model=stock, export=out),
                    dict(name=f"{kind}/fastckpt_export_tp{tp}", model=out, load_format="fastckpt"),
                ]
        if a.export:  # the TP=1 export under a TP=2 engine: refused
            tp_cases.append(
                dict(
                    name=f"error/export_tp1_under_tp{tp}",
                    model=os.path.join(a.workdir, f"{first}-export-tp1"),
                    load_format="fastckpt",
                )
            )
        for case in tp_cases:
            case["tp"] = tp
        tp_results, _ = run_cases(
            tp_cases,
            spawn=True,
            mem=a.mem,
            timeout_s=2400,
            env_extra={"VLLM_CPU_OMP_THREADS_BIND": cpu_bind(tp)},
        )
        results.update(tp_results)
    print("E2E_ALL " + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
