"""The GEMV / GEMM crossover of the quantized CPU linears: for int4 / int8 (quant_linear) and each ggml block
type (kquant_linear), the time of one x[m, K] @ W^T with its GEMV kernels and with the prefill GEMM (gemm.cpp) at
m = 1 .. 64 activation rows, and the smallest m from which the GEMM stays faster: the numbers behind
cpu::quant_gemm_from_rows (csrc/cpu/tuning.cpp, docs/KERNELS.md).

Each path runs in its own process, the choice forced with LLAMA_FAST_QUANT_GEMM_ROWS / LLAMA_FAST_KQUANT_GEMM_ROWS
(100000: the GEMV kernels wherever they take the rows; 1: the GEMM for every m). Beyond 64 rows (prefill) only the
ggml blocks' VNNI kernel is a GEMV: the int4 / int8 op runs the GEMM there in both processes. The weights are
several copies of one [N, K] matrix, cycled so that each call reads its weights from memory (more bytes than L3),
as a model's layers do.
Time: the median of --repeat calls per m, the best of --rounds rounds (rounds alternate the two processes; the
machine may be shared).

    OMP_NUM_THREADS=2 flock /work/notes/bench.lock python benchmarks/bench_quant_crossover.py

Writes benchmarks/results/quant_crossover_cpu.json with the CPU model, ISA and kernel tuning.
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

ROWS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256)
FORMATS = ("int4", "int8", "Q4_K", "Q5_K", "Q6_K", "Q2_K", "Q3_K", "Q5_0", "Q5_1", "Q8_0")
PATHS = {"gemv": "100000", "gemm": "1"}


def make_weights(fmt: str, n: int, k: int, copies: int):
    """`copies` weights of format `fmt` -> list of callables f(x) -> x @ W^T."""
    import torch

    from llama_fast import kquants, ops
    from llama_fast.ops import cpu  # noqa: F401  (loads the extension: torch.ops.llama_fast.quant_linear)
    g = torch.Generator().manual_seed(0)
    calls = []
    for c in range(copies):
        if fmt in ("int4", "int8"):
            bits, gs = (4, 32) if fmt == "int4" else (8, 32)   # int4: GGUF Q4_1's layout (offset), int8: Q8_0's
            q = (torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8) if bits == 4
                 else torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8))
            scale = (torch.rand(n, k // gs, generator=g) * 0.01).half()
            offset = (torch.rand(n, k // gs, generator=g) * -0.01).half() if bits == 4 else None
            calls.append(lambda x, q=q, s=scale, o=offset, b=bits: torch.ops.llama_fast.quant_linear(
                x, q, s, o, b, gs, None))
        else:
            from kquant_util import random_blocks
            w = kquants.KQuantWeight.single(fmt, random_blocks(fmt, n, k, seed=c), k)
            calls.append(lambda x, w=w: ops.kquant_linear(x, w, backend="cpu"))
    return calls


def worker(args) -> dict:
    import torch
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    out = {}
    for fmt in args.formats.split(","):
        bytes_per_weight = {"int4": 0.5 + 4 / 32, "int8": 1 + 2 / 32}.get(fmt)
        if bytes_per_weight is None:
            from llama_fast import kquants
            weights, nbytes = kquants.BLOCKS[fmt]
            bytes_per_weight = nbytes / weights
        copies = max(2, int(args.cycle_mib * 2**20 / (args.n * args.k * bytes_per_weight)) + 1)
        calls = make_weights(fmt, args.n, args.k, copies)
        times, turn = {}, 0
        for m in ROWS:
            x = torch.randn(m, args.k, generator=torch.Generator().manual_seed(m)).to(dtype)
            samples = []
            for i in range(args.repeat + 2):   # 2 warm-up calls (scratch buffers), then the timed ones
                f = calls[turn % len(calls)]   # the copy used longest ago: out of the caches
                turn += 1
                t0 = time.perf_counter()
                f(x)
                if i >= 2:
                    samples.append(time.perf_counter() - t0)
            times[m] = statistics.median(samples)
        out[fmt] = times
    return out


def crossover(gemv: dict, gemm: dict) -> int | None:
    """The smallest measured m up to 64 from which the GEMM is faster at every larger measured m up to 64 (None:
    never)."""
    best = None
    for m in sorted((m for m in gemv if m <= 64), reverse=True):
        if gemm[m] < gemv[m]:
            best = m
        else:
            break
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--k", type=int, default=2048)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--cycle-mib", type=float, default=64, help="weight bytes cycled through (more than L3)")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--out", default=os.path.join(HERE, "results", "quant_crossover_cpu.json"))
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    from _machine import cpu_record, write_result
    best: dict[str, dict[str, dict[int, float]]] = {path: {} for path in PATHS}
    for _ in range(args.rounds):
        for path, rows in PATHS.items():
            env = dict(os.environ, LLAMA_FAST_QUANT_GEMM_ROWS=rows, LLAMA_FAST_KQUANT_GEMM_ROWS=rows,
                       PYTHONPATH=os.pathsep.join(x for x in (ROOT, os.environ.get("PYTHONPATH")) if x))
            cmd = [sys.executable, __file__, "--worker", "--formats", args.formats, "--n", str(args.n), "--k",
                   str(args.k), "--dtype", args.dtype, "--cycle-mib", str(args.cycle_mib), "--repeat",
                   str(args.repeat), "--threads", str(args.threads)]
            res = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
            for fmt, times in res.items():
                cur = best[path].setdefault(fmt, {})
                for m, t in times.items():
                    cur[int(m)] = min(cur.get(int(m), float("inf")), t)
    result = {"machine": cpu_record(), "load_average": open("/proc/loadavg").read().split()[:3],
              "shape": {"n": args.n, "k": args.k}, "dtype": args.dtype, "threads": args.threads,
              "rows": list(ROWS), "formats": {}}
    print(f"{'format':6} {'crossover':>9}  " + " ".join(f"{m:>6}" for m in ROWS) + "  (GEMM / GEMV time)")
    for fmt in best["gemv"]:
        gv, gm = best["gemv"][fmt], best["gemm"][fmt]
        cross = crossover(gv, gm)
        result["formats"][fmt] = {"crossover_rows": cross, "gemv_ms": [gv[m] * 1e3 for m in ROWS],
                                  "gemm_ms": [gm[m] * 1e3 for m in ROWS]}
        print(f"{fmt:6} {str(cross):>9}  " + " ".join(f"{gm[m] / gv[m]:6.2f}" for m in ROWS))
    write_result(args.out, result)


if __name__ == "__main__":
    main()
