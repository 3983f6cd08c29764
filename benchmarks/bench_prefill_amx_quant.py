"""Prefill of the int4 demo model (SmolLM2-135M, the GGUF's Q4_1 layers kept native: int4 groups of 32 with offsets,
and its Q8_0 token table) with and without the AMX quantized GEMM (csrc/cpu/gemm_amx_quant.cpp): tokens/s of one
prompt of each length, fp32 activations, each path in its own process (LLAMA_FAST_AMX=1 / 0: the switch is read
once per process). Time: the calling thread's CPU time with --threads 1 (the engine's whole work, robust to other
processes on a shared machine) and the wall clock; best of --repeats after a warm-up prefill of the same length.

    OMP_NUM_THREADS=1 flock /tmp/bench.lock python benchmarks/bench_prefill_amx_quant.py

Writes benchmarks/results/prefill_int4_amx_quant_intel_amx.json with the CPU model and load. --gguf FILE runs that
file instead (e.g. a K-quant one: its Q8_0 / Q4_K / Q5_K / Q6_K / Q2_K / Q3_K / Q5_0 / Q5_1 linears take the AMX
GEMM).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)


def worker(contexts: list[int], repeats: int, threads: int, gguf: str | None = None) -> dict:
    import torch

    import llama_fast
    from llama_fast.tools.demo import demo_model_dir
    torch.set_num_threads(threads)
    path = gguf or demo_model_dir(progress=False, native=True)
    model = llama_fast.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    out = {}
    for context in contexts:
        ids = torch.randint(100, 20000, (1, context), generator=torch.Generator().manual_seed(context))

        def run():
            with torch.inference_mode():
                cache = model.model.new_cache(1, context + 8)
                model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        run()
        best_wall = best_cpu = float("inf")
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.thread_time()
            run()
            best_wall, best_cpu = min(best_wall, time.perf_counter() - t0), min(best_cpu, time.thread_time() - c0)
        out[context] = {"tok_s_wall": context / best_wall, "tok_s_thread_cpu": context / best_cpu}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--contexts", default="128,512")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--gguf", default=None, help="a GGUF file instead of the int4 demo model")
    p.add_argument("--out", default=os.path.join(HERE, "results", "prefill_int4_amx_quant_intel_amx.json"))
    args = p.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    if args.worker:
        print(json.dumps(worker(contexts, args.repeats, args.threads, args.gguf)))
        return
    from _machine import cpu_record, write_result
    result = {"machine": cpu_record(), "threads": args.threads, "load_before": open("/proc/loadavg").read().split()[:3],
              "model": (f"{os.path.basename(args.gguf)}, fp32 activations" if args.gguf else
                        "SmolLM2-135M-Instruct demo GGUF, Q4_1 layers native (int4 g32 + offsets), fp32 activations"),
              "tok_s": {}}
    for amx in ("1", "0"):
        env = dict(os.environ, LLAMA_FAST_AMX=amx, OMP_NUM_THREADS=str(args.threads),
                   PYTHONPATH=os.pathsep.join(x for x in (ROOT, os.environ.get("PYTHONPATH")) if x))
        cmd = [sys.executable, __file__, "--worker", "--contexts", args.contexts, "--repeats", str(args.repeats),
               "--threads", str(args.threads)] + (["--gguf", args.gguf] if args.gguf else [])
        res = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
                         .strip().splitlines()[-1])
        result["tok_s"]["amx" if amx == "1" else "no_amx"] = res
        print("LLAMA_FAST_AMX=" + amx, json.dumps(res))
    result["load_after"] = open("/proc/loadavg").read().split()[:3]
    write_result(args.out, result)


if __name__ == "__main__":
    main()
