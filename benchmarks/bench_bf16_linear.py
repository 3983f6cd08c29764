"""bf16 dense linears, llama_fast's `cpu_linear` against ATen's `torch.nn.functional.linear`, op by op: prefill-sized
GEMMs (G multiply-adds/s) and batched-decode row counts (microseconds per linear, the weights cycled from memory
as a decode step reads them). On a CPU with AMX both run on the tile unit (ours: csrc/cpu/gemm_amx.cpp; ATen:
oneDNN), so this is the before / after check of that kernel and of the row count from which decode steps take it.

Each (engine, shape) is timed best-of within a time budget, the engines alternating; with one thread by the
process's CPU time (holds on a machine other processes load), with more by the wall clock. `--label` names the
build (run it with PYTHONPATH at another checkout for a "before"), `LLAMA_FAST_AMX_BF16_ROWS` moves the decode rows'
switch (see csrc/cpu/tuning.h).

    OMP_NUM_THREADS=1 flock /tmp/bench.lock python benchmarks/bench_bf16_linear.py --threads 1 \\
        [--gemms 128x1536x576,512x1536x576,2048x2048x2048] [--rows 2,4,8,16,32,64 --row-shapes 1536x576,576x1536] \\
        [--label after] [--out benchmarks/results/bf16_linear.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def best_seconds(fn, clock, budget: float, min_runs: int = 3) -> float:
    fn()    # warm-up: first-call buffers, the thread pool's start
    best, runs, end = float("inf"), 0, time.perf_counter() + budget
    while runs < min_runs or time.perf_counter() < end:
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
        runs += 1
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--gemms", default="128x1536x576,512x1536x576,512x576x1536,2048x2048x2048",
                   help="MxNxK prefill shapes (M activation rows, N weight rows, K)")
    p.add_argument("--rows", default="2,4,5,8,16,32,64", help="batched-decode row counts")
    p.add_argument("--row-shapes", default="1536x576,576x1536,192x576,49152x576", help="NxK weights for --rows")
    p.add_argument("--budget", type=float, default=0.5, help="seconds per (engine, shape) and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--label", default="")
    p.add_argument("--out", default="")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from bench_decode_separate import cpu_description

    import llama_fast
    from llama_fast.ops import cpu
    clock = time.process_time if args.threads == 1 else time.perf_counter
    engines = {"llama_fast": lambda x, w, b: torch.ops.llama_fast.cpu_linear(x, w, b),
               "aten": lambda x, w, b: torch.nn.functional.linear(x, w, b)}
    result = {"what": __doc__.splitlines()[0], "cpu": cpu_description(), "threads": args.threads,
              "clock": "process_time" if args.threads == 1 else "wall", "label": args.label,
              "llama_fast": os.path.dirname(llama_fast.__file__), "isa": cpu.set_isa(""), "tuning": cpu.tuning(),
              "amx_rows_env": os.environ.get("LLAMA_FAST_AMX_BF16_ROWS"), "torch": torch.__version__,
              "load_average": [os.getloadavg()[0]], "gemms": [], "rows": []}
    g = torch.Generator().manual_seed(0)
    for shape in filter(None, args.gemms.split(",")):
        m, n, k = (int(v) for v in shape.split("x"))
        x, w = torch.randn(m, k, generator=g).bfloat16(), torch.randn(n, k, generator=g).bfloat16()
        b = torch.randn(n, generator=g).bfloat16()
        best = {e: min(best_seconds(lambda: f(x, w, b), clock, args.budget) for _ in range(args.rounds))
                for e, f in engines.items()}
        entry = {"m": m, "n": n, "k": k, **{f"{e}_gmacs": m * n * k / s / 1e9 for e, s in best.items()}}
        result["gemms"].append(entry)
        print(json.dumps(entry), flush=True)
    for shape in filter(None, args.row_shapes.split(",")):
        n, k = (int(v) for v in shape.split("x"))
        # enough distinct weights that each call reads its own from memory (> 64 MB, past any one core's L2 / L3)
        ws = [torch.randn(n, k, generator=g).bfloat16() for _ in range(max(1, int(64e6 / (n * k * 2))))]
        for m in (int(v) for v in args.rows.split(",") if v):
            x = torch.randn(m, k, generator=g).bfloat16()
            entry = {"m": m, "n": n, "k": k}
            for e, f in engines.items():
                def cycle():
                    for w in ws:
                        f(x, w, None)
                per_call = min(best_seconds(cycle, clock, args.budget) for _ in range(args.rounds)) / len(ws)
                entry[f"{e}_us"] = per_call * 1e6
            result["rows"].append(entry)
            print(json.dumps(entry), flush=True)
    result["load_average"].append(os.getloadavg()[0])
    if args.out:
        from _machine import write_result
        write_result(args.out, result)


if __name__ == "__main__":
    main()
