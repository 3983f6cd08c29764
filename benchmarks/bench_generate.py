"""End-to-end prefill / decode tokens/s: llama_fast vs transformers (eager, sdpa) vs installed peers.

    python benchmarks/bench_generate.py                    # the full run: 512-token prompt, 128 new tokens,
                                                           # batch 1 and 8, float32 and bfloat16, 3 repeats
    python benchmarks/bench_generate.py --quick            # a smoke run
    python benchmarks/bench_generate.py --help

The harness lives in llama_fast/bench.py (so `llama-fast bench` runs the same code); results go to
benchmarks/results/<name>.json and .png.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llama_fast.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
