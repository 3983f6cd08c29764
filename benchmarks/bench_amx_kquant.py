"""The ggml block linear (kquant_linear) on the AMX tile GEMM (csrc/cpu/gemm_amx_quant.cpp, GgmlCodes) against the
paths it replaces (the VNNI GEMV below cpu::quant_gemm_from_rows, the fp32 GEMM on dequantized tiles from there),
op level: G multiply-adds/s of one x[m, K] @ W^T per activation row count m, shape, block type and activation dtype:
the numbers behind cpu::amx_kquant_from_rows (csrc/cpu/tuning.cpp) and docs/KERNELS.md.

Each path runs in its own process: "old" with LLAMA_FAST_AMX=0, "amx" with LLAMA_FAST_AMX_KQUANT_ROWS=1 (the tile
GEMM for every m). Random blocks (tests/kquant_util.py), several copies of one [N, K] weight cycled so that each call
reads its weights from memory, as a model's layers do. Time: CPU time of the process (time.process_time: the
machine is shared, and with 1 thread it is the work done), the median of --repeat calls per m, the best of --rounds
rounds (alternating the two processes).

    flock /tmp/bench.lock python benchmarks/bench_amx_kquant.py --threads 1

Writes benchmarks/results/amx_kquant_ops_<threads>thread_intel_amx.json with the CPU model and load.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

ROWS = (1, 4, 8, 12, 16, 32, 128, 512)
# (type, K, N): Q8_0 at SmolLM2's MLP up / down shapes, Q4_K at a square 2048 (576 is no multiple of 256)
CASES = (("Q8_0", 576, 1536), ("Q8_0", 1536, 576), ("Q4_K", 2048, 2048))
DTYPES = ("float32", "bfloat16")
PATHS = {"old": {"LLAMA_FAST_AMX": "0"}, "amx": {"LLAMA_FAST_AMX_KQUANT_ROWS": "1"}}


def worker(args) -> dict:
    import torch
    from kquant_util import random_blocks

    from llama_fast import kquants
    from llama_fast.ops import cpu

    torch.set_num_threads(args.threads)
    out = {}
    for kind, k, n in CASES:
        copy_bytes = n * kquants.row_bytes(kind, k)
        copies = max(2, int(args.cycle_mib * 2**20 / copy_bytes) + 1)
        weights = [kquants.KQuantWeight.single(kind, random_blocks(kind, n, k, seed=i), k) for i in range(copies)]
        turn = 0
        for dtype in DTYPES:
            for m in ROWS:
                x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(getattr(torch, dtype))
                samples = []
                for i in range(args.repeat + 2):  # 2 warm-up calls (scratch buffers), then the timed ones
                    w = weights[turn % len(weights)]
                    turn += 1
                    t0 = time.process_time()
                    cpu.kquant_linear(x, w)
                    if i >= 2:
                        samples.append(time.process_time() - t0)
                out[f"{kind}/{k}x{n}/{dtype}/{m}"] = statistics.median(samples)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cycle-mib", type=float, default=48, help="weight bytes cycled through (more than L3)")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    from _machine import cpu_record, write_result

    best: dict[str, dict[str, float]] = {path: {} for path in PATHS}
    load_before = open("/proc/loadavg").read().split()[:3]
    for _ in range(args.rounds):
        for path, env_add in PATHS.items():
            env = dict(os.environ, **env_add,
                       PYTHONPATH=os.pathsep.join(x for x in (ROOT, os.environ.get("PYTHONPATH")) if x))
            env.pop("LLAMA_FAST_AMX" if path == "amx" else "LLAMA_FAST_AMX_KQUANT_ROWS", None)
            cmd = [sys.executable, __file__, "--worker", "--cycle-mib", str(args.cycle_mib), "--repeat",
                   str(args.repeat), "--threads", str(args.threads)]
            res = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
            for key, t in res.items():
                best[path][key] = min(best[path].get(key, float("inf")), t)
    result = {"machine": cpu_record(), "load_average_before_after": [load_before,
                                                                     open("/proc/loadavg").read().split()[:3]],
              "threads": args.threads, "rows": list(ROWS), "condition": "random blocks, weights cycled from memory "
              f"({args.cycle_mib} MiB), CPU time (process_time), median of {args.repeat} calls, best of "
              f"{args.rounds} rounds; old = LLAMA_FAST_AMX=0, amx = LLAMA_FAST_AMX_KQUANT_ROWS=1", "gmacs": {}}
    print(f"{'type / shape / dtype':28} " + " ".join(f"{m:>11}" for m in ROWS) + "   (G MAC/s old -> amx)")
    for key in sorted({k.rsplit('/', 1)[0] for k in best['old']}):
        k, n = (int(v) for v in key.split("/")[1].split("x"))
        row = {}
        for m in ROWS:
            old, amx = best["old"][f"{key}/{m}"], best["amx"][f"{key}/{m}"]
            row[m] = {"old": m * n * k / old / 1e9, "amx": m * n * k / amx / 1e9}
        result["gmacs"][key] = row
        print(f"{key:28} " + " ".join(f"{row[m]['old']:5.0f}>{row[m]['amx']:<5.0f}" for m in ROWS))
    out = args.out or os.path.join(HERE, "results", f"amx_kquant_ops_{args.threads}thread_intel_amx.json")
    write_result(out, result)


if __name__ == "__main__":
    main()
