"""llama.cpp's decode speed in a process where llama_fast has run (issue 14: llama.cpp was once seen at 0.5 tok/s
after llama_fast in the same process): llama.cpp alone first, then right after a llama_fast decode, then 200 ms
after one (past the ~1 ms an idle llama_fast pool helper spins before it blocks), on the demo GGUF, both
engines with the same thread count. Per-token medians (`Llama.eval` per token), CPU model and load recorded.

    LLAMA_CPP_LIB_PATH=... PYTHONPATH=.:<llama-cpp-python> OMP_NUM_THREADS=2 \\
        python benchmarks/bench_coexist_llama_cpp.py [--out benchmarks/results/coexist_llama_cpp.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_decode_cpu as bench  # noqa: E402
from bench_isa_levels import cpu_info  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--note", default="")
    p.add_argument("--out", default=os.path.join(bench.RESULTS, "coexist_llama_cpp.json"))
    args = p.parse_args()
    threads = torch.get_num_threads()
    gguf = bench.demo_gguf()
    cpp = bench.LlamaCpp(gguf, threads, extra_buffers=False)
    prompt = torch.randint(100, 40000, (1, 16), generator=torch.Generator().manual_seed(0))

    def cpp_rate():
        return args.tokens / cpp.decode(prompt, args.tokens)

    runs = {"llama.cpp alone": [cpp_rate() for _ in range(args.rounds)]}
    fast = bench.int4_model(gguf)
    fast.decode(prompt, 4)
    for _ in range(args.rounds):
        fast.decode(prompt, 16)
        runs.setdefault("llama.cpp right after a llama_fast decode", []).append(cpp_rate())
        fast.decode(prompt, 16)
        time.sleep(0.2)
        runs.setdefault("llama.cpp 200 ms after a llama_fast decode", []).append(cpp_rate())
    runs["llama_fast int4"] = [16 / fast.decode(prompt, 16) for _ in range(args.rounds)]
    import llama_fast
    result = {"what": __doc__.splitlines()[0], "cpu": cpu_info(), "threads": threads, "note": args.note,
              "llama_fast": os.path.dirname(llama_fast.__file__), "llama_cpp_lib": os.environ.get("LLAMA_CPP_LIB_PATH"),
              "load_average_end": os.getloadavg(),
              "decode_tok_s": runs, "median": {k: statistics.median(v) for k, v in runs.items()}}
    for k, v in runs.items():
        print(f"{k:44s} median {statistics.median(v):6.1f} tok/s  {['%.1f' % x for x in v]}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
