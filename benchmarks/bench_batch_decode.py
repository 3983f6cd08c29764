"""Batched CPU decode throughput of the demo model (SmolLM2-135M): total tokens/s over the rows at batch
1, 2, 4, 8, 16 for fp32, bf16 and int4 (the GGUF's Q4_1 layers + Q8_0 head, kept native), as issue 14 item 5
asks (goal: batch 8 >= 5x batch 1 in each dtype).

Each dtype runs in its own process (so no two engines' thread pools meet); within it the batch sizes
alternate over `--repeat` rounds. Every decode step (forward of one token per row + greedy pick) is timed on
its own; a round's figure is rows / median step time, the result the best round.

    OMP_NUM_THREADS=2 flock /work/notes/bench.lock python benchmarks/bench_batch_decode.py [--steps 24]

Writes benchmarks/results/batch_decode_cpu.json and .png with the CPU model, `uptime` load and the read
bandwidth measured in the same run. The machine may be shared: compare ratios within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

# this checkout's llama_fast (not an installed one), also in the child processes
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import cpu_model, cpu_read_bandwidth  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PROMPT_TOKENS = 32
VARIANTS = {"fp32": ("float32", False), "bf16": ("bfloat16", False), "int4": ("float32", True)}


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def load(variant: str):
    import llama_fast
    from llama_fast.tools.demo import demo_model_dir
    dtype, native = VARIANTS[variant]
    return llama_fast.LlamaForCausalLM.from_pretrained(demo_model_dir(progress=False, native=native), dtype=dtype)


@torch.inference_mode()
def step_times(model, batch: int, steps: int, clock=time.perf_counter) -> list[float]:
    """Seconds of each of `steps` decode steps (after 3 unmeasured ones) of `batch` rows, by `clock` (wall
    time, or time.process_time: the CPU time of this process, which on a shared machine counts the work done
    rather than the waits for a core; meaningful with one thread). The pick is generate()'s (greedy_choice: on the
    CPU llama_fast's argmax kernel; ATen's argmax took ~1 ms of an 8-row step and left its OpenMP threads spinning
    into the next one)."""
    from llama_fast.cuda_graphs import greedy_choice
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(100, 10000, (batch, PROMPT_TOKENS), generator=gen)
    cache = model.model.new_cache(batch, PROMPT_TOKENS + steps + 4)
    tok = greedy_choice(model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1])[:, None]
    times = []
    for i in range(steps + 3):
        t0 = clock()
        tok = greedy_choice(model(tok, past_key_values=cache, use_cache=True).logits[:, -1])[:, None]
        if i >= 3:
            times.append(clock() - t0)
    return times


def run_variant(variant: str, batches: list[int], steps: int, repeat: int, cpu_time: bool) -> dict:
    model = load(variant)
    clock = time.process_time if cpu_time else time.perf_counter
    best = {b: 0.0 for b in batches}
    for _ in range(repeat):
        for b in batches:
            best[b] = max(best[b], b / statistics.median(step_times(model, b, steps, clock)))
    return {str(b): round(v, 1) for b, v in best.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="fp32,bf16,int4")
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(RESULTS, "batch_decode_cpu"))
    ap.add_argument("--one", help=argparse.SUPPRESS)     # child process: one variant, prints JSON
    ap.add_argument("--cpu-time", action="store_true",
                    help="time steps by the process's CPU time instead of wall time (use with OMP_NUM_THREADS=1 "
                         "on a shared machine: it counts the work, not the waits for a core)")
    ap.add_argument("--note", default="", help="free text stored in the JSON (e.g. which commit / change)")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.one:
        print(json.dumps(run_variant(args.one, batches, args.steps, args.repeat, args.cpu_time)))
        return
    result = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "load_before": load_average(),
              "read_bandwidth_gbs": round(cpu_read_bandwidth(), 1), "steps": args.steps, "repeat": args.repeat,
              "prompt_tokens": PROMPT_TOKENS, "clock": "process CPU time" if args.cpu_time else "wall",
              "note": args.note, "tok_s": {}}
    for variant in args.variants.split(","):
        command = [sys.executable, __file__, "--one", variant, "--batches", args.batches, "--steps", str(args.steps),
                   "--repeat", str(args.repeat)] + (["--cpu-time"] if args.cpu_time else [])
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        tok_s = json.loads(out.stdout.strip().splitlines()[-1])
        result["tok_s"][variant] = tok_s
        ratios = {b: round(v / tok_s["1"], 2) for b, v in tok_s.items()} if "1" in tok_s else {}
        result.setdefault("ratio_to_batch1", {})[variant] = ratios
        print(variant, tok_s, "ratio", ratios, flush=True)
    result["load_after"] = load_average()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for variant, tok_s in result["tok_s"].items():
            ax.plot([int(b) for b in tok_s], list(tok_s.values()), marker="o", label=variant)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (rows)")
        ax.set_ylabel("decode tok/s (all rows)")
        ax.set_title(f"SmolLM2-135M batched decode, {result['threads']} threads, {result['clock']}, "
                     f"load {result['load_before']}", fontsize=9)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out + ".png", dpi=100)
    except ImportError:
        pass
    print("load", result["load_before"], "->", result["load_after"], "bandwidth", result["read_bandwidth_gbs"])


if __name__ == "__main__":
    main()
