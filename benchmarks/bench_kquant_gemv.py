"""Batch-1 GEMV of ggml blocks (kquant_linear, read as stored) per block type and decode shape, at 1 and 2 threads,
against the machine's read bandwidth (issue 15: K-quant decode faster than llama.cpp).

Decode reads every weight once per token from DRAM (a model's weights do not stay in the caches between tokens),
so each call here reads a different copy of the weight, cycled over --cold-mib (larger than the caches). Shapes
are SmolLM2-135M's (hidden 576, intermediate 1536, vocab 49152: q/o [576, 576], k/v [192, 576], gate_up
[3072, 576], down [576, 1536], the tied token table [49152, 576]) and, for the K-quants, which need K % 256 == 0,
bench_kquant.py's model (hidden 512, intermediate 1536). GB/s counts the bytes the blocks store, us the time of
one call: the small matrices of a 135M model take tens of microseconds, so fork/join and activation preparation
count as much as the stream rate.

    python benchmarks/bench_kquant_gemv.py [--threads 1,2] [--types Q5_0,Q6_K] [--out ...]

Wall time, best of --repeat passes over the copies; record the load (it is saved) and compare within one run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from kquant_util import random_blocks  # noqa: E402

from llama_fast import kquants  # noqa: E402
from llama_fast.ops import cpu  # noqa: E402

from _machine import cpu_read_bandwidth, cpu_record, write_result  # noqa: E402

# [N, K] per role; the 32-weight blocks take SmolLM2's shapes, the super-blocks the 512 / 1536 model's as well
SHAPES_B32 = {"q_o": (576, 576), "k_v": (192, 576), "gate_up": (3072, 576), "down": (576, 1536),
              "lm_head": (49152, 576)}
SHAPES_SUPER = {"q_o_512": (512, 512), "gate_up_512": (3072, 512), "down_512": (512, 1536), "down": (576, 1536),
                "lm_head_512": (49152, 512)}
TYPES = ("Q8_0", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K")


def measure(kind: str, n: int, k: int, cold_mib: int, repeat: int) -> tuple[float, float]:
    """(GB/s of stored weight bytes, us per call) over copies of one random weight cycled past the caches."""
    blocks = random_blocks(kind, n, k)
    stored = blocks.numel()
    copies = max(2, (cold_mib << 20) // stored)
    weights = [kquants.KQuantWeight.single(kind, blocks.clone(), k) for _ in range(copies)]
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(1))
    for w in weights[:4]:
        cpu.kquant_linear(x, w)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for w in weights:
            cpu.kquant_linear(x, w)
        best = min(best, time.perf_counter() - t0)
    return stored * copies / best / 1e9, best / copies * 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2")
    p.add_argument("--types", default=",".join(TYPES))
    p.add_argument("--cold-mib", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--shapes", default="", help="roles to run (e.g. lm_head,gate_up); all by default")
    p.add_argument("--isa", default="", help="lower the kernels' instruction set (ops.cpu.set_isa)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "kquant_gemv.json"))
    args = p.parse_args()
    types = [t for t in args.types.split(",") if t]
    unknown = set(types) - set(TYPES)
    if unknown:
        raise SystemExit(f"unknown types {sorted(unknown)}; choose from {TYPES}")
    if args.isa:
        cpu.set_isa(args.isa)
    result = {"machine": cpu_record(), "load_average_before": os.getloadavg()[0], "cold_mib": args.cold_mib,
              "read_bandwidth_GBps": {}, "gemv": {}}
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        dram = result["read_bandwidth_GBps"][threads] = cpu_read_bandwidth(mib=1024, repeat=5)
        print(f"{threads} thread(s): read bandwidth {dram:.1f} GB/s", flush=True)
        for kind in types:
            shapes = SHAPES_B32 if kquants.BLOCKS[kind][0] == 32 else SHAPES_SUPER
            for role, (n, k) in shapes.items():
                if args.shapes and role not in args.shapes.split(","):
                    continue
                g, us = measure(kind, n, k, args.cold_mib, args.repeat)
                result["gemv"].setdefault(str(threads), {}).setdefault(kind, {})[role] = {
                    "shape": [n, k], "GBps": g, "of_read_bandwidth": g / dram, "us_per_call": us}
                print(f"  {kind:5s} {role:12s} [{n:5d}, {k:4d}] {g:6.1f} GB/s ({g / dram:4.0%}) {us:8.1f} us",
                      flush=True)
    result["load_average_after"] = os.getloadavg()[0]
    write_result(args.out, result)


if __name__ == "__main__":
    main()
