"""The int4 / int8 linear on the AMX tile GEMM (csrc/cpu/gemm_amx_quant.cpp) against the paths it replaces (the VNNI
GEMV / dequantized tiles up to 64 rows, the fp32 prefill GEMM beyond), op level: G multiply-adds/s of one
x[m, K] @ W^T per activation row count m, shape, format and activation dtype: the numbers behind
cpu::amx_quant_from_rows (csrc/cpu/tuning.cpp) and docs/KERNELS.md.

Each path runs in its own process: "old" with LLAMA_FAST_AMX=0 (no AMX at all), "amx" with
LLAMA_FAST_AMX_QUANT_ROWS=1 (the tile GEMM for every m). The weights are several copies of one [N, K] matrix cycled
so that each call reads its weights from memory, as a model's layers do. Time: the median of --repeat calls per m,
the best of --rounds rounds (rounds alternate the two processes; the machine may be shared).

    flock /tmp/bench.lock python benchmarks/bench_amx_quant.py --threads 1

Writes benchmarks/results/amx_quant_ops_<threads>thread_intel_amx.json with the CPU model and load.
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from _old_vs_amx import median_times, run  # noqa: E402

ROWS = (1, 2, 4, 6, 8, 16, 64, 128, 512)
SHAPES = ((576, 1536), (1536, 576), (2048, 2048))   # (K, N): SmolLM2's MLP up / down, a square one
FORMATS = ("int4", "int8")                         # int4: groups of 32 with offsets (Q4_1-like); int8: Q8_0-like
DTYPES = ("float32", "bfloat16")
PATHS = {"old": {"LLAMA_FAST_AMX": "0"}, "amx": {"LLAMA_FAST_AMX_QUANT_ROWS": "1"}}


def make_weights(fmt: str, n: int, k: int, copies: int):
    import torch

    from llama_fast.ops import cpu  # noqa: F401  (loads the extension: torch.ops.llama_fast.quant_linear)
    g = torch.Generator().manual_seed(0)
    bits, gs = (4, 32) if fmt == "int4" else (8, 32)
    calls = []
    for _ in range(copies):
        q = (torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8) if bits == 4
             else torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8))
        scale = (torch.rand(n, k // gs, generator=g) * 0.01).half()
        offset = (torch.rand(n, k // gs, generator=g) * -0.01).half() if bits == 4 else None
        calls.append(lambda x, q=q, s=scale, o=offset, b=bits: torch.ops.llama_fast.quant_linear(x, q, s, o, b, gs,
                                                                                                  None))
    return calls


def worker(args) -> dict:
    import torch
    torch.set_num_threads(args.threads)
    out = {}
    for k, n in SHAPES:
        for fmt in FORMATS:
            bytes_per_weight = 0.5 + 4 / 32 if fmt == "int4" else 1 + 2 / 32
            calls = make_weights(fmt, n, k, max(2, int(args.cycle_mib * 2**20 / (n * k * bytes_per_weight)) + 1))
            times = median_times(calls, lambda m, k=k: torch.randn(m, k, generator=torch.Generator().manual_seed(m)),
                                 ROWS, DTYPES, args.repeat)
            out.update({f"{k}x{n}/{fmt}/{case}": t for case, t in times.items()})
    return out


def main() -> None:
    run(__file__, __doc__, worker, PATHS, ROWS,
        k_n_of=lambda key: tuple(int(v) for v in key.split("/")[0].split("x")), title="shape / format / dtype",
        condition="weights cycled from memory ({cycle_mib} MiB), median of {repeat} calls, best of {rounds} "
                  "rounds, wall time",
        out_name="amx_quant_ops", default_cycle_mib=64)


if __name__ == "__main__":
    main()
