"""Token steps of a replica beside the SSD tier's background conversion, on a busy machine.

A replica's process loads a stock safetensors model through a Loader with the SSD tier on (the
copy is then made in the background) and keeps taking first-token steps of another resident
model for ``--seconds``, while ``--hogs`` CPU-bound processes stand for the other replicas of
the node. Prints the median and slowest step, alone and beside the conversion, and whether the
conversion finished. Run it at the conversion thread's priority under test with ``--nice``
(default 0: what the Loader does; 19 was the earlier setting).

    python benchmarks/ssd_convert_priority.py --workdir /tmp/prio [--nice 19] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--nice", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--hogs", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=3.0)
    a = ap.parse_args()

    import torch

    import fastckpt
    from fastckpt.bench.serverless_prep import FULL_MODELS, _drop, make_models, prompt_of
    from fastckpt.integrations.ray_serve.catalog import ModelEntry
    from fastckpt.integrations.ray_serve.host import decode_step, load_transformers

    torch.set_num_threads(1)
    paths = make_models(os.path.join(a.workdir, "store"), FULL_MODELS)
    big, small = FULL_MODELS[0], FULL_MODELS[2]
    stepper = load_transformers(ModelEntry(small.name, paths[small.name], 1), "cpu", None)

    def step() -> float:
        t0 = time.perf_counter()
        decode_step(stepper, prompt_of(small, 0), None)
        return time.perf_counter() - t0

    for _ in range(3):
        step()
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.hogs)]
    ssd = os.path.join(a.workdir, "ssd")
    try:
        for rnd in range(a.rounds):
            shutil.rmtree(ssd, ignore_errors=True)
            _drop([paths[big.name]])
            alone = [step() for _ in range(10)]
            loader = fastckpt.Loader(
                dram_tier_bytes=600 * 10**6, ssd_tier_bytes=4 * 10**9, ssd_tier_dir=ssd
            )
            # the conversion thread is the Loader's one "fastckpt-ssd-convert" thread: renice it
            # once it exists (the load schedules it when its read ends)
            model = load_transformers(ModelEntry(big.name, paths[big.name], 1), "cpu", loader)
            for t in threading.enumerate():
                if t.name.startswith("fastckpt-ssd-convert") and t.native_id is not None:
                    os.setpriority(os.PRIO_PROCESS, t.native_id, a.nice)
            during: list[float] = []
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < a.seconds:
                during.append(step())
            done = loader.cache_info()["ssd"]["conversions"]["done"]
            loader.close()
            del model
            print(
                f"nice {a.nice} round {rnd}: step alone median {statistics.median(alone):.4f} s; "
                f"beside the conversion median {statistics.median(during):.4f} s, slowest "
                f"{max(during):.3f} s ({len(during)} steps); conversion done: {bool(done)}",
                flush=True,
            )
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
