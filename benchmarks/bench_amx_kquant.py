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

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from _old_vs_amx import median_times, run  # noqa: E402

ROWS = (1, 4, 8, 12, 16, 32, 128, 512)
# (type, K, N): Q8_0 at SmolLM2's MLP up / down shapes, Q4_K and Q6_K / Q3_K / Q2_K (groups of 16) at a square 2048 (576
# is no multiple of 256)
CASES = (("Q8_0", 576, 1536), ("Q8_0", 1536, 576), ("Q4_K", 2048, 2048), ("Q6_K", 2048, 2048), ("Q3_K", 2048, 2048),
         ("Q2_K", 2048, 2048))
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
        calls = [lambda x, w=w: cpu.kquant_linear(x, w) for w in weights]
        times = median_times(calls, lambda m, k=k: torch.randn(m, k, generator=torch.Generator().manual_seed(m)),
                             ROWS, DTYPES, args.repeat, clock=time.process_time)
        out.update({f"{kind}/{k}x{n}/{case}": t for case, t in times.items()})
    return out


def main() -> None:
    run(__file__, __doc__, worker, PATHS, ROWS,
        k_n_of=lambda key: tuple(int(v) for v in key.split("/")[1].split("x")), title="type / shape / dtype",
        condition="random blocks, weights cycled from memory ({cycle_mib} MiB), CPU time (process_time), median "
                  "of {repeat} calls, best of {rounds} rounds; old = LLAMA_FAST_AMX=0, amx = "
                  "LLAMA_FAST_AMX_KQUANT_ROWS=1",
        out_name="amx_kquant_ops", default_cycle_mib=48)


if __name__ == "__main__":
    main()
