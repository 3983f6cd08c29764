"""Multi-row (batched decode) CPU linears op by op: microseconds and G multiply-adds/s of one x[m, K] @ W^T at the
demo model's (SmolLM2-135M) layer shapes, for m = 1 .. 16 activation rows, dense fp32 / bf16 (`cpu_linear`) and
int4 (GGUF Q4_1's layout: groups of 32, fp16 scale and offset) / int8 (Q8_0's) with fp32 activations
(`quant_linear`): the kernels of csrc/cpu/linear.cpp, quant_linear.cpp and row_tiles.h that a batched decode step
runs. The weights are several copies of each matrix, cycled so that each call reads its weights from memory (more
bytes than L3), as a model's layers do.

Each build runs in its own process (`--builds label=checkout,...`: the checkout whose llama_fast, and so whose
_C extension, the worker imports), the builds alternating over `--rounds`; a figure is the median of `--repeat`
calls, the best round. One thread, timed by the process's CPU time (holds on a machine other processes load).

    OMP_NUM_THREADS=1 flock /tmp/bench.lock python benchmarks/bench_multirow_linear.py \\
        --builds before=/path/to/main,after=. [--out benchmarks/results/multirow_linear.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# N x K: q/k/v fused, o_proj, gate/up fused, down_proj (the lm_head, 49152 x 576, with --shapes)
SHAPES = "960x576,576x576,3072x576,576x1536"
ROWS = "1,2,4,8,16"
KINDS = "fp32,bf16,int4,int8"


def make_calls(kind: str, n: int, k: int, copies: int):
    import torch
    g = torch.Generator().manual_seed(n * 7 + k)
    calls = []
    for _ in range(copies):
        if kind in ("fp32", "bf16"):
            dtype = torch.float32 if kind == "fp32" else torch.bfloat16
            w = torch.randn(n, k, generator=g).to(dtype)
            calls.append(lambda x, w=w: torch.ops.llama_fast.cpu_linear(x, w, None))
        else:
            bits, gs = (4, 32) if kind == "int4" else (8, 32)
            q = (torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8) if bits == 4
                 else torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8))
            scale = (torch.rand(n, k // gs, generator=g) * 0.01).half()
            offset = (torch.rand(n, k // gs, generator=g) * -0.01).half() if bits == 4 else None
            calls.append(lambda x, q=q, s=scale, o=offset, b=bits: torch.ops.llama_fast.quant_linear(
                x, q, s, o, b, gs, None))
    return calls


def worker(args) -> dict:
    sys.path.insert(0, args.root)
    import torch

    import llama_fast.ops.cpu  # noqa: F401  (loads the extension)
    torch.set_num_threads(1)
    rows = [int(r) for r in args.rows.split(",")]
    out = {}
    for kind in args.kinds.split(","):
        act = torch.bfloat16 if kind == "bf16" else torch.float32
        bytes_per_weight = {"fp32": 4, "bf16": 2, "int4": 0.5 + 4 / 32, "int8": 1 + 2 / 32}[kind]
        for shape in args.shapes.split(","):
            n, k = (int(v) for v in shape.split("x"))
            copies = max(2, int(args.cycle_mib * 2**20 / (n * k * bytes_per_weight)) + 1)
            calls = make_calls(kind, n, k, copies)
            times, turn = {}, 0
            for m in rows:
                x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(act)
                samples = []
                for i in range(args.repeat + 2):  # 2 warm-up calls (scratch buffers), then the timed ones
                    f = calls[turn % len(calls)]  # the copy used longest ago: out of the caches
                    turn += 1
                    t0 = time.process_time()
                    f(x)
                    if i >= 2:
                        samples.append(time.process_time() - t0)
                times[m] = statistics.median(samples)
            out[f"{kind} {shape}"] = times
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--root", default=ROOT, help=argparse.SUPPRESS)
    p.add_argument("--builds", default=f"this={ROOT}", help="label=checkout,... (each a llama_fast checkout)")
    p.add_argument("--kinds", default=KINDS)
    p.add_argument("--shapes", default=SHAPES)
    p.add_argument("--rows", default=ROWS)
    p.add_argument("--cycle-mib", type=float, default=64, help="weight bytes cycled through (more than L3)")
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--note", default="")
    p.add_argument("--out", default="")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    sys.path.insert(0, HERE)
    builds = dict(b.split("=", 1) for b in args.builds.split(","))
    best: dict[str, dict[str, dict[int, float]]] = {label: {} for label in builds}
    for _ in range(args.rounds):
        for label, root in builds.items():
            env = dict(os.environ, OMP_NUM_THREADS="1")
            env.pop("PYTHONPATH", None)
            cmd = [sys.executable, __file__, "--worker", "--root", os.path.abspath(root), "--kinds", args.kinds,
                   "--shapes", args.shapes, "--rows", args.rows, "--cycle-mib", str(args.cycle_mib),
                   "--repeat", str(args.repeat)]
            res = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True,
                                            cwd=os.path.abspath(root)).stdout)
            for case, times in res.items():
                cur = best[label].setdefault(case, {})
                for m, t in times.items():
                    cur[int(m)] = min(cur.get(int(m), float("inf")), t)
    rows = [int(r) for r in args.rows.split(",")]
    result = {"what": __doc__.splitlines()[0], "note": args.note, "threads": 1, "clock": "process CPU time",
              "load_average": open("/proc/loadavg").read().split()[:3], "rows": rows, "builds": {}}
    try:
        from _machine import cpu_model
        result["cpu"] = cpu_model()
    except Exception:  # noqa: BLE001  (the record without the CPU name rather than no record)
        pass
    print(f"{'case':22} {'build':8} " + " ".join(f"{'m=' + str(m):>13}" for m in rows) + "   (us, GMAC/s)")
    for case in best[next(iter(builds))]:
        n, k = (int(v) for v in case.split()[1].split("x"))
        for label in builds:
            t = best[label][case]
            result["builds"].setdefault(label, {})[case] = {
                "us": [round(t[m] * 1e6, 1) for m in rows],
                "gmac_per_s": [round(m * n * k / t[m] / 1e9, 2) for m in rows]}
            print(f"{case:22} {label:8} " + " ".join(f"{t[m] * 1e6:7.0f} {m * n * k / t[m] / 1e9:5.1f}" for m in rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
