"""Tensor parallelism on several GPUs (llama_fast.parallel over NCCL, one GPU per rank, under torchrun): the
multi-GPU step of `make gpu-check` (.ci/gpu_check.py runs it only where torch.cuda.device_count() >= 2).

For each world size W in 1 (the baseline: one GPU, no process group) and 2 / 4 / 8 (as many GPUs as there are),
on a random bf16 model of Llama-3-8B's layer shape (hidden 4096, 32 heads of 128, 8 KV heads, intermediate
14336; --layers of them, vocabulary 32000, written once to a temporary safetensors checkpoint):
  - decode tokens/s, batch 1, 16-token prompt, 32 new tokens: the median step, eager (cuda_graphs=False) and
    with CUDA graphs (generate's default, which captures the all-reduces too where torch allows it; an error
    there is recorded, not raised);
  - the measured NCCL all-reduce latency of one token's hidden state (bf16 [1, 4096], 8 KB) and of 1 MiB: the
    median of single synchronized calls (what a decode step waits) and the mean of 100 back-to-back calls.

    python benchmarks/bench_tp_gpu.py --out multi_gpu.json [--budget-s 60] [--layers 4]

Each world size runs under `python -m torch.distributed.run --standalone` with a time box (its process group
killed at the box); the JSON is rewritten after each one, so a run cut short keeps what finished.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
             num_key_value_heads=8, head_dim=128, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=500000.0,
             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16",
             architectures=["LlamaForCausalLM"], model_type="llama")
PROMPT_TOKENS, NEW_TOKENS = 16, 32
MIN_WORLD_S = 20          # do not start a world size with less time than this left


def world_sizes(gpus: int) -> list[int]:
    """The tensor-parallel world sizes to measure on a machine with `gpus` GPUs ([] below 2)."""
    return [w for w in (2, 4, 8) if w <= gpus] if gpus >= 2 else []


# ---- the checkpoint ---------------------------------------------------------------------------------------

def write_checkpoint(directory: str, layers: int) -> str:
    """A random bf16 Llama of SHAPE with `layers` layers, as config.json + model.safetensors."""
    import torch

    from llama_fast.formats import safetensors as safetensors_format

    c = SHAPE
    h, q, kv, inter = c["hidden_size"], c["num_attention_heads"] * c["head_dim"], \
        c["num_key_value_heads"] * c["head_dim"], c["intermediate_size"]
    # One random block tiled over every weight: decode speed depends on the bytes, not on their values, and
    # copying is far faster than drawing ~1e9 normals in the GPU step's time box.
    block = (torch.randn(1 << 20, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)

    def rand(*shape):
        numel = shape[0] * shape[1]
        return block.repeat(-(-numel // block.numel()))[:numel].reshape(shape).clone()

    tensors = [("model.embed_tokens.weight", rand(c["vocab_size"], h)), ("lm_head.weight", rand(c["vocab_size"], h)),
               ("model.norm.weight", torch.ones(h, dtype=torch.bfloat16))]
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors += [(p + "self_attn.q_proj.weight", rand(q, h)), (p + "self_attn.k_proj.weight", rand(kv, h)),
                    (p + "self_attn.v_proj.weight", rand(kv, h)), (p + "self_attn.o_proj.weight", rand(h, q)),
                    (p + "mlp.gate_proj.weight", rand(inter, h)), (p + "mlp.up_proj.weight", rand(inter, h)),
                    (p + "mlp.down_proj.weight", rand(h, inter)),
                    (p + "input_layernorm.weight", torch.ones(h, dtype=torch.bfloat16)),
                    (p + "post_attention_layernorm.weight", torch.ones(h, dtype=torch.bfloat16))]
    os.makedirs(directory, exist_ok=True)
    safetensors_format.write(os.path.join(directory, "model.safetensors"), tensors)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({**SHAPE, "num_hidden_layers": layers}, f)
    return directory


# ---- one rank ---------------------------------------------------------------------------------------------

def allreduce_latency(numel: int, dtype) -> dict:
    """Microseconds of one all-reduce of `numel` elements: the median of 50 synchronized calls, and the mean
    of 100 back-to-back calls (CUDA events)."""
    import torch
    import torch.distributed as dist

    t = torch.ones(numel, dtype=dtype, device="cuda")
    for _ in range(20):
        dist.all_reduce(t)
    torch.cuda.synchronize()
    single = []
    for _ in range(50):
        start = time.perf_counter()
        dist.all_reduce(t)
        torch.cuda.synchronize()
        single.append(time.perf_counter() - start)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(100):
        dist.all_reduce(t)
    end.record()
    torch.cuda.synchronize()
    return {"bytes": numel * t.element_size(), "synchronized_median_us": round(statistics.median(single) * 1e6, 1),
            "back_to_back_mean_us": round(begin.elapsed_time(end) * 1e3 / 100, 1)}


def decode_rate(model, cuda_graphs) -> dict:
    """Median decode step (after the prefill) of a 32-token greedy generation, after a warm-up."""
    import torch
    from _ranks import TokenStamps

    ids = torch.randint(3, SHAPE["vocab_size"], (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    ids = ids.to("cuda")

    try:
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, cuda_graphs=cuda_graphs)       # warm-up
        stamps = TokenStamps(sync=torch.cuda.synchronize)
        model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, streamer=stamps,
                       cuda_graphs=cuda_graphs)
    except Exception as e:  # noqa: BLE001  (recorded: e.g. a graph that cannot capture a collective)
        return {"error": f"{type(e).__name__}: {e}"[:500]}
    median = statistics.median(stamps.decode_steps())
    return {"decode_step_median_ms": round(median * 1e3, 3), "decode_tok_s": round(1 / median, 1)}


def worker(args) -> int:
    import torch
    import torch.distributed as dist
    from _ranks import finish_rank

    from llama_fast import LlamaForCausalLM

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    result = {"gpus": world, "device": torch.cuda.get_device_name(local)}
    kwargs = {}
    if args.tp:      # tensor parallel over the torchrun world (one rank: the collectives' cost alone)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        result["allreduce"] = [allreduce_latency(SHAPE["hidden_size"], torch.bfloat16),
                               allreduce_latency(1 << 19, torch.bfloat16)]
        kwargs["tp_plan"] = "auto"
    start = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(args.model, dtype="bfloat16", device="cuda", **kwargs)
    result["load_s"] = round(time.perf_counter() - start, 2)
    result["eager"] = decode_rate(model, cuda_graphs=False)
    result["cuda_graphs"] = decode_rate(model, cuda_graphs=None)
    result["memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    finish_rank(result, args.result)
    return 0


# ---- the driver -------------------------------------------------------------------------------------------

def run_world(world: int, model: str, result: str, timeout_s: float) -> dict:
    """One world size under torchrun (one process per GPU), its whole process group killed at the time box."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
            os.path.abspath(__file__), "--worker", "--model", model, "--result", result]
    argv += ["--tp"] if world > 1 else []
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    if os.path.exists(result):
        os.remove(result)
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return {"gpus": world, "error": f"killed after its time box of {timeout_s:.0f} s"}
    if rc != 0 or not os.path.exists(result):
        return {"gpus": world, "error": f"exit code {rc} (see the log)"}
    with open(result) as f:
        return json.load(f)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "tp_gpu.json"))
    p.add_argument("--budget-s", type=float, default=300.0, help="stop starting world sizes after this")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--tp", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    import torch

    end = time.monotonic() + args.budget_s
    gpus = torch.cuda.device_count()
    out = {"what": f"decode tok/s (batch 1, {PROMPT_TOKENS}-token prompt, median of {NEW_TOKENS} steps) of a random "
                   f"bf16 Llama with {args.layers} layers of Llama-3-8B's shape (vocabulary 32000), 1 GPU vs "
                   "tensor parallel over NCCL; measured NCCL all-reduce latency",
           "gpus": gpus, "torch": torch.__version__, "layers": args.layers, "results": []}

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)

    worlds = world_sizes(gpus)
    if not worlds:
        out["skipped"] = f"skipped: {gpus} GPU(s)"
        save()
        print(out["skipped"])
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_tp_gpu_") as tmp:
        start = time.perf_counter()
        model = write_checkpoint(os.path.join(tmp, "model"), args.layers)
        out["checkpoint_write_s"] = round(time.perf_counter() - start, 1)
        for world in [1, *worlds]:
            left = end - time.monotonic()
            if left < MIN_WORLD_S:
                out["results"].append({"gpus": world, "error": f"not run: {left:.0f} s left of the budget"})
                continue
            out["results"].append(run_world(world, model, os.path.join(tmp, "result.json"), left))
            print(json.dumps(out["results"][-1]), flush=True)
            save()
    save()
    return 0 if all("error" not in r for r in out["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
