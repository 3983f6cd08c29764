"""Batch-1 GEMV speed against the machine's read bandwidth, per weight form, and how much of a model this
machine's caches actually hold (issue 14, item 2: decode at the memory limit).

Decode reads every weight once per token, so a model whose weights do not stay in the caches between tokens is
bounded by the DRAM read bandwidth, and one that does by the kernels' compute. This measures, in one process
and at the threads torch uses:
- the read bandwidth (a sum over a buffer) at working sets from 16 MiB to 1 GiB on one thread: where it drops
  to the 1 GiB value the caches stop holding the data, whatever L3 size the CPU reports; and on all threads
  over 1 GiB (DRAM, the roofline of the GEMVs below);
- one-row linears (llama_fast's CPU kernels: fp32, bf16, int8 g32 = GGUF Q8_0, int4 g32 symmetric = Q4_0,
  asymmetric = Q4_1) at SmolLM2's gate_up shape (3072 x 576), and ggml blocks read as stored (kquant_linear:
  Q8_0, Q5_0, Q5_1 and the K-quants) at its down_proj shape (576 x 1536), over many copies of the weights cycled
  (`--cold-mib`, larger than the caches: the decode regime) and over a few (16 MiB: in cache, the kernel's
  compute rate); GB/s counts the bytes each form stores (codes + scales + offsets);
- the CPU model, ISA level and the kernels' run-time tuning (benchmarks/_machine.py cpu_record).

    OMP_NUM_THREADS=2 python benchmarks/bench_gemv_bandwidth.py [--out benchmarks/results/gemv_bandwidth.json]

Times are wall time (best of --repeat passes over the copies); on a shared machine record the load (it is
saved) and compare the forms within one run only.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llama_fast import quant  # noqa: E402
from llama_fast.ops import cpu  # noqa: E402

from _machine import cpu_cache_read_bandwidth, cpu_read_bandwidth, cpu_record, write_result  # noqa: E402

N, K = 3072, 576  # SmolLM2-135M's gate_up_proj: [2 x 1536, 576]
# ggml blocks (llama_fast.kquants, read as stored): the K-quants need K % 256 == 0, so all of them take SmolLM2's
# down_proj shape [576, 1536] (about as many weights as gate_up).
KQ_N, KQ_K = 576, 1536
KQUANT_FORMS = ("q8_0", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k", "q2_k", "q3_k")
FORMS = ("fp32", "bf16", "int8_g32", "int4_g32_sym", "int4_g32_asym") + KQUANT_FORMS


def kquant_weight_and_call(form: str):
    """weight_and_call for a ggml block type: random blocks (fp16 fields small and finite), x [1, KQ_K]."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from kquant_util import random_blocks

    from llama_fast import kquants
    kind = form.upper()
    blocks = random_blocks(kind, KQ_N, KQ_K)
    x = torch.randn(1, KQ_K, generator=torch.Generator().manual_seed(1))
    return blocks.numel(), lambda: (lambda c: lambda: cpu.kquant_linear(x, c))(
        kquants.KQuantWeight.single(kind, blocks.clone(), KQ_K))


def weight_and_call(form: str, x: torch.Tensor):
    """(bytes the weight stores, a callable making a fresh copy -> a zero-argument call of the linear)."""
    if form in KQUANT_FORMS:
        return kquant_weight_and_call(form)
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(0))
    if form in ("fp32", "bf16"):
        dense = w if form == "fp32" else w.bfloat16()
        xin = x if form == "fp32" else x.bfloat16()
        return dense.numel() * dense.element_size(), lambda: (lambda c: lambda: cpu.linear(xin, c))(dense.clone())
    bits = 8 if form.startswith("int8") else 4
    q = quant.quantize(w, bits=bits, group_size=32, symmetric=not form.endswith("asym"), scale_dtype=torch.float16)
    stored = q.qweight.numel() + q.scale.numel() * 2 + (q.offset.numel() * 2 if q.offset is not None else 0)
    return stored, lambda: (lambda c: lambda: cpu.quant_linear(x, c))(copy.deepcopy(q))


def gbps(form: str, x: torch.Tensor, working_set_mib: int, repeat: int) -> float:
    stored, make = weight_and_call(form, x)
    calls = [make() for _ in range(max(1, (working_set_mib << 20) // stored))]
    for call in calls[:4]:
        call()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for call in calls:
            call()
        best = min(best, time.perf_counter() - t0)
    return stored * len(calls) / best / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cold-mib", type=int, default=600)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--forms", default=",".join(FORMS))
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "gemv_bandwidth.json"))
    args = p.parse_args()
    forms = [f for f in args.forms.split(",") if f]
    unknown = set(forms) - set(FORMS)
    if unknown:
        raise SystemExit(f"unknown forms {sorted(unknown)}; choose from {FORMS}")
    result = {"machine": cpu_record(), "threads": torch.get_num_threads(), "shape": [N, K],
              "kquant_shape": [KQ_N, KQ_K], "load_average_before": os.getloadavg()[0]}
    result["one_thread_read_bandwidth_GBps_by_working_set_MiB"] = {
        mib: cpu_cache_read_bandwidth(mib, repeat=max(5, 2048 // mib)) for mib in (16, 32, 64, 128, 256, 1024)}
    dram = result["read_bandwidth_GBps"] = cpu_read_bandwidth(mib=1024, repeat=5)
    x = torch.randn(1, K)
    result["gemv"] = {}
    for form in forms:
        cold = gbps(form, x, args.cold_mib, args.repeat)
        warm = gbps(form, x, 16, args.repeat)
        result["gemv"][form] = {"cold_GBps": cold, "cold_of_read_bandwidth": cold / dram, "in_cache_16MiB_GBps": warm}
        print(f"{form:14s} cold {cold:6.1f} GB/s ({cold / dram:4.0%} of {dram:.1f}), in cache {warm:6.1f} GB/s",
              flush=True)
    result["load_average_after"] = os.getloadavg()[0]
    curve = result["one_thread_read_bandwidth_GBps_by_working_set_MiB"]
    print("one thread, GB/s by working set (MiB):", json.dumps(curve))
    write_result(args.out, result)


if __name__ == "__main__":
    main()
