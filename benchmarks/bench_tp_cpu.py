"""Tensor parallelism on the CPU (llama_fast.parallel over gloo), and a paper estimate for GPUs.

Measured here, on a random model of SmolLM2-135M's shape (hidden 576, intermediate 1536, 30 layers, vocabulary
49152, fp32) except its attention: 8 heads of 72 with 2 KV heads instead of 9 of 64 with 3, because 9 heads
do not split over 2 ranks (the weight bytes differ by 1.4 %):

  - decode tokens/s of: one process with 2 threads (the fused C++ decode stack), one process with 1 thread,
    2 ranks x 1 thread (vocab sharded, the default; and vocab replicated), and one process with 2 threads
    decoding op by op as a tensor-parallel rank does (the fused stack turned off), which separates the cost
    of leaving the fused stack from the cost of the collectives;
  - inside the 2-rank runs: the time each rank spends in all-reduce / all-gather per decoded token (their
    wall time, waiting for the slower rank included), and a standalone latency fit of gloo's all-reduce,
    t(n bytes) = alpha + n / beta, over message sizes around the hidden state's.

Estimated, not measured (no multi-GPU machine was available): decode tokens/s of Llama-2-70B (bf16) on 2 / 4 /
8 GPUs, per token = the weight bytes a GPU reads / (HBM bandwidth x efficiency) + 2 all-reduces per layer x
the all-reduce latency + the logit gather. The GPU all-reduce latencies are assumptions (swept), not
measurements; the issue's gpt-fast figures (21 / 38 / 62 tok/s on 2 / 4 / 8 A100s) are listed beside them.

Each variant runs in its own processes (started by llama_fast.parallel.launch.run_ranks), the variants
alternating round by round; a variant's number is the best round's median step time. Take the benchmark lock
so that no two benchmarks overlap:

    flock /work/notes/bench.lock python benchmarks/bench_tp_cpu.py [--tokens 32] [--rounds 2]

Writes benchmarks/results/tp_cpu.json. The machine is shared: numbers carry the load average they ran under.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
CACHE = os.path.join(RESULTS, ".cache")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=8,
             num_key_value_heads=2, head_dim=72, max_position_embeddings=2048, rms_norm_eps=1e-5,
             tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
PROMPT_TOKENS = 16
# name -> (ranks, threads per rank, from_pretrained extras)
VARIANTS = {
    "1 rank x 2 threads (fused decode stack)": (1, 2, {}),
    "1 rank x 1 thread (fused decode stack)": (1, 1, {}),
    "2 ranks x 1 thread (TP, vocab sharded)": (2, 1, {"tp_plan": "auto"}),
    "2 ranks x 1 thread (TP, vocab replicated)": (2, 1, {"tp_plan": "auto", "tp_vocab": "replicated"}),
    "1 rank x 2 threads (op by op, as a TP rank decodes)": (1, 2, {"op_by_op": True}),
}

# ---- the paper estimate ----------------------------------------------------------------------------------
LLAMA2_70B = dict(hidden=8192, layers=80, heads=64, kv_heads=8, head_dim=128, intermediate=28672, vocab=32000)
GPUS = {"A100-80GB": 2039e9, "H100-SXM": 3350e9}
HBM_EFFICIENCY = 0.75          # assumed fraction of HBM bandwidth a decode step reaches (not measured here)
ASSUMED_ALLREDUCE_US = (10.0, 20.0, 40.0)   # assumed NCCL small-message all-reduce latency on NVLink, swept
GPT_FAST_70B = {2: 21, 4: 38, 8: 62}        # tok/s on A100s, as the issue quotes gpt-fast


def weight_bytes_70b(bytes_per_weight: float = 2.0) -> float:
    c = LLAMA2_70B
    q, kv = c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"]
    per_layer = c["hidden"] * (q + 2 * kv) + q * c["hidden"] + 3 * c["hidden"] * c["intermediate"]
    return (c["layers"] * per_layer + c["vocab"] * c["hidden"]) * bytes_per_weight   # + the head (the lookup
    # reads one row per token)


def estimate_70b() -> list[dict]:
    rows = []
    for gpu, hbm in GPUS.items():
        for world in (2, 4, 8):
            read_s = weight_bytes_70b() / world / (hbm * HBM_EFFICIENCY)
            for latency_us in ASSUMED_ALLREDUCE_US:
                # 2 all-reduces per layer of a [1, hidden] bf16 state (16 KB: latency-bound), one logit gather
                comm_s = (2 * LLAMA2_70B["layers"] + 1) * latency_us * 1e-6
                rows.append({"gpu": gpu, "gpus": world, "assumed_allreduce_us": latency_us,
                             "weight_read_ms": round(read_s * 1e3, 2), "collectives_ms": round(comm_s * 1e3, 2),
                             "estimated_tok_s": round(1 / (read_s + comm_s), 1),
                             "gpt_fast_reported_a100_tok_s": GPT_FAST_70B[world] if gpu.startswith("A100") else None})
    return rows


# ---- one variant's process ------------------------------------------------------------------------------

class TimedCollectives:
    """Stands in for torch.distributed inside llama_fast.parallel.runtime: times each collective call."""

    def __init__(self, real):
        self.real, self.seconds, self.calls = real, {}, {}

    def __getattr__(self, name):
        return getattr(self.real, name)

    def _timed(self, name, *args, **kwargs):
        start = time.perf_counter()
        out = getattr(self.real, name)(*args, **kwargs)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        self.calls[name] = self.calls.get(name, 0) + 1
        return out

    def all_reduce(self, *args, **kwargs):
        return self._timed("all_reduce", *args, **kwargs)

    def all_gather(self, *args, **kwargs):
        return self._timed("all_gather", *args, **kwargs)

    def reset(self):
        self.seconds, self.calls = {}, {}


def allreduce_latency_fit(sizes=(576, 2304, 9216, 36864), repeat: int = 200) -> dict:
    """Median all-reduce time of fp32 tensors of `sizes` elements over the default group, and the least-squares
    fit t = alpha + bytes / beta."""
    import torch.distributed as dist

    points = []
    for n in sizes:
        t = torch.ones(n)
        for _ in range(20):
            dist.all_reduce(t)
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            dist.all_reduce(t)
            times.append(time.perf_counter() - start)
        points.append((n * 4, statistics.median(times)))
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
    return {"points_bytes_s": points, "alpha_us": round((my - slope * mx) * 1e6, 2),
            "beta_GB_s": round(1 / slope / 1e9, 3) if slope > 0 else None}


def worker(args) -> int:
    import torch.distributed as dist

    from llama_fast import LlamaForCausalLM
    from llama_fast.ops import cpu_decode
    from llama_fast.parallel import runtime

    world, threads, extra = VARIANTS[args.variant]
    extra = dict(extra)
    if extra.pop("op_by_op", False):
        cpu_decode.can_run = lambda *a, **k: False
    torch.set_num_threads(threads)
    result = {"variant": args.variant, "ranks": world, "threads": threads}
    tensor_parallel = world > 1
    if tensor_parallel:
        dist.init_process_group("gloo")
        result["allreduce_fit"] = allreduce_latency_fit()
        timed = TimedCollectives(dist)
        runtime.dist = timed
    model = LlamaForCausalLM.from_pretrained(args.model, dtype="float32", **extra)
    ids = torch.randint(3, SHAPE["vocab_size"], (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))

    class Stamps:
        """A streamer (put / end) that notes when each token arrives."""

        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    model.generate(ids, max_new_tokens=4, min_new_tokens=4)      # warm-up
    if tensor_parallel:
        timed.reset()
    stamps = Stamps()
    model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, streamer=stamps)
    steps = [b - a for a, b in zip(stamps.times[1:], stamps.times[2:])]     # decode steps (after the prefill)
    result["decode_step_median_ms"] = statistics.median(steps) * 1e3
    result["decode_tok_s"] = 1 / statistics.median(steps)
    if tensor_parallel:
        tokens = args.tokens   # the prefill's collectives are in the totals too; per token is an upper bound
        result["collectives_per_token"] = {name: {"calls": timed.calls[name] / tokens,
                                                  "ms": timed.seconds[name] / tokens * 1e3} for name in timed.calls}
    if int(os.environ.get("RANK", "0")) == 0:
        with open(args.result, "w") as f:
            json.dump(result, f)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


# ---- the driver -----------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def checkpoint(layers: int) -> str:
    from llama_fast import LlamaConfig, LlamaForCausalLM

    path = os.path.join(CACHE, f"tp_smollm2_shaped_{layers}l")
    if not os.path.exists(os.path.join(path, "config.json")):
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**{**SHAPE, "num_hidden_layers": layers})).save_pretrained(path)
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"])
    p.add_argument("--out", default=os.path.join(RESULTS, "tp_cpu.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    from llama_fast.parallel.launch import run_ranks

    from _machine import cpu_read_bandwidth

    model = checkpoint(args.layers)
    load_start = os.getloadavg()
    bandwidth = cpu_read_bandwidth()
    rounds: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    env = dict(os.environ, PYTHONPATH=ROOT)
    for _ in range(args.rounds):
        for name, (world, threads, _) in VARIANTS.items():
            result = os.path.join(CACHE, "tp_variant.json")
            argv = [sys.executable, os.path.abspath(__file__), "--worker", "--variant", name, "--model", model,
                    "--tokens", str(args.tokens), "--result", result]
            ranks = run_ranks(argv, world, timeout=300, threads=threads, env=env)
            for r in ranks:
                if r.returncode != 0:
                    raise SystemExit(f"{name}: rank {r.rank} failed:\n{r.output[-3000:]}")
            with open(result) as f:
                rounds[name].append(json.load(f))
            print(f"{name}: {rounds[name][-1]['decode_tok_s']:.1f} tok/s", file=sys.stderr)
    best = {name: min(rs, key=lambda r: r["decode_step_median_ms"]) for name, rs in rounds.items()}
    out = {
        "what": "decode tok/s of a SmolLM2-135M-shaped random fp32 model (8 heads x 72, 2 KV heads: 9 heads do not "
                "split over 2 ranks), batch 1, 16-token prompt; best round's median step",
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "read_bandwidth_GB_s": round(bandwidth, 1),
                    "torch": torch.__version__, "load_average_start": load_start,
                    "load_average_end": os.getloadavg()},
        "tokens": args.tokens, "rounds": args.rounds, "layers": args.layers,
        "variants": best, "all_rounds": rounds,
        "estimate_llama2_70b_bf16": {
            "note": "ESTIMATED, not measured: per token = weight bytes per GPU / (HBM bandwidth x "
                    f"{HBM_EFFICIENCY}) + (2 x layers + 1) x an ASSUMED all-reduce latency; bf16 weights "
                    f"{weight_bytes_70b() / 1e9:.1f} GB",
            "rows": estimate_70b()},
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: round(v["decode_tok_s"], 1) for k, v in best.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
