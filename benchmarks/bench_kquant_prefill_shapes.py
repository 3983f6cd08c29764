"""kquant_linear at the 1B Llama's prefill shapes (hidden 2048, GQA 32/8, intermediate 8192) in Q4_K_M's types:
wall time and G multiply-adds/s of one x[M, K] fp32 @ W^T per weight, W random ggml blocks (tests/kquant_util.py).
The op-level view of benchmarks/bench_decode_separate.py's llama-1b Q4_K_M prefill (where the AMX K-quant GEMM,
csrc/cpu/gemm_amx_quant.cpp, spends it). Prints one line per case; compare two trees by PYTHONPATH, under the lock:

    PYTHONPATH=<tree> OMP_NUM_THREADS=2 flock /tmp/bench.lock python benchmarks/bench_kquant_prefill_shapes.py \
        --threads 2 [--rows 128] [--cases down_Q4K,qkv_mixed]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

# name: ([(type, rows)] fused along N, K); q/k/v with v in Q6_K as Q4_K_M's layers with more bits have it
CASES = {
    "qkv_mixed": ([("Q4_K", 2048), ("Q4_K", 512), ("Q6_K", 512)], 2048),
    "qkv_Q4K": ([("Q4_K", 2048), ("Q4_K", 512), ("Q4_K", 512)], 2048),
    "o_Q4K": ([("Q4_K", 2048)], 2048),
    "gate_up_Q4K": ([("Q4_K", 8192), ("Q4_K", 8192)], 2048),
    "down_Q4K": ([("Q4_K", 2048)], 8192),
    "down_Q6K": ([("Q6_K", 2048)], 8192),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--cases", default=",".join(CASES))
    args = p.parse_args()

    import torch
    from kquant_util import random_blocks

    import llama_fast
    from llama_fast import kquants
    from llama_fast.ops import cpu

    torch.set_num_threads(args.threads)
    print(f"llama_fast from {os.path.dirname(llama_fast.__file__)}, {args.threads} threads, {args.rows} rows")
    for name in args.cases.split(","):
        parts, k = CASES[name]
        w = kquants.concat_rows([kquants.KQuantWeight.single(t, random_blocks(t, n, k, seed=i), k)
                                 for i, (t, n) in enumerate(parts)])
        x = torch.randn(args.rows, k, generator=torch.Generator().manual_seed(0))
        cpu.kquant_linear(x, w)  # warm: thread-local buffers, weights in cache as far as they fit
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            cpu.kquant_linear(x, w)
            times.append(time.perf_counter() - t0)
        t = sorted(times)[len(times) // 2]
        print(f"{name:12s} {t * 1e3:8.2f} ms  {args.rows * w.shape[0] * k / t / 1e9:6.1f} G multiply-adds/s",
              flush=True)


if __name__ == "__main__":
    main()
