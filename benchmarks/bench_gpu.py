"""GPU decode speed: llama_fast (CUDA graphs on and off) against transformers on the same machine, in one run.

Random-weight models of real shapes (Llama-2-7B, Llama-3.2-1B), bf16 and int4 group 128, batch 1 and 8. For
each: decode tokens/s and the fraction of HBM bandwidth it reaches (bytes a decode step must read: every
weight once plus the KV cache, times steps/s, over the device-copy bandwidth measured in this same run and over
the nominal peak). Decode speed is differential, so prefill, allocation and graph capture do not count:
(t(generate long) - t(generate short)) over the extra steps.

    python benchmarks/bench_gpu.py --out benchmarks/results/gpu_decode.json [--budget-s 110] [--shapes 7b,1b]

`make gpu-check` runs it inside a time box: configurations run most important first, a new one starts only
while the budget lasts, and the JSON is rewritten after each, so a run cut short keeps what it measured.
`--device cpu --shapes tiny` runs the same code on a tiny model (what the unit test does).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

NOMINAL_HBM_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}

SHAPES = {
    "7b": dict(name="Llama-2-7B", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "1b": dict(name="Llama-3.2-1B", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096, tie_word_embeddings=True,
               rope_theta=500000.0),
    "tiny": dict(name="tiny", vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512),
}

PROMPT_TOKENS = 16


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "gpu_decode.json"))
    p.add_argument("--budget-s", type=float, default=600.0, help="start no configuration after this many seconds")
    p.add_argument("--shapes", default="7b,1b", help=f"comma list of {sorted(SHAPES)}")
    p.add_argument("--device", default="cuda")
    p.add_argument("--short", type=int, default=8, help="new tokens of the short generate")
    p.add_argument("--long", type=int, default=72, help="new tokens of the long generate")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--no-compile", action="store_true", help="skip transformers' static cache + torch.compile")
    args = p.parse_args(argv)
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown:
        p.error(f"unknown shapes {unknown}; known: {sorted(SHAPES)}")
    if not 0 < args.short < args.long:
        p.error("need 0 < --short < --long")
    return args


# ---- timing ---------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, mib: int = 2048, repeat: int = 10) -> float:
    """GB/s (bytes read + written) of a device-to-device copy of a buffer far larger than the L2."""
    n = mib * 2**20 // 4
    a = torch.ones(n, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        b.copy_(a)
        sync(device)
        times.append(time.perf_counter() - t0)
    del a, b
    return 2 * n * 4 / min(times) / 1e9


def decode_rate(generate, short: int, long: int, repeats: int, device) -> dict:
    """Steps/s of decode alone: the best of `repeats` long and short generate calls, differenced."""
    generate(short)      # warm-up: allocations, autotuning, graph capture for this batch size
    best = {}
    for n in (short, long):
        times = []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            out_len = generate(n)
            sync(device)
            times.append(time.perf_counter() - t0)
            if out_len != n:
                raise RuntimeError(f"generate made {out_len} new tokens instead of {n} (an eos stopped it?)")
        best[n] = min(times)
    seconds = best[long] - best[short]
    if seconds <= 0:
        raise RuntimeError(f"timing noise: the long generate ({best[long]:.4f} s) was not slower than the short "
                           f"({best[short]:.4f} s)")
    return {"steps_per_s": (long - short) / seconds, "step_ms": 1e3 * seconds / (long - short),
            "generate_short_s": best[short], "generate_long_s": best[long]}


# ---- models ---------------------------------------------------------------------------------------------

def llama_fast_model(shape: dict, dtype, device):
    from llama_fast import LlamaForCausalLM
    from llama_fast.config import LlamaConfig

    cfg = LlamaConfig(**{k: v for k, v in shape.items() if k != "name"})
    cfg.eos_token_id = None          # random weights may emit any id: never stop early
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg, dtype=dtype, device=device).eval()
    model.generation_config = {}
    return model


def quantize_int4(model, group_size: int) -> None:
    """Round-to-nearest int4 for every linear layer but the output head (what from_pretrained(quantize="int4")
    does), in place."""
    from llama_fast.linear import Linear

    for name, module in model.named_modules():
        if isinstance(module, Linear) and not module.quantized and not name.endswith("lm_head"):
            module.quantize_(4, group_size, name=name)


def transformers_model(shape: dict, dtype, device):
    import transformers

    cfg = transformers.LlamaConfig(**{k: v for k, v in shape.items() if k != "name"})
    cfg.eos_token_id = None
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM._from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def decode_bytes(model, batch: int, context: int) -> dict:
    """Bytes one decode step reads: each weight once (the embedding table only when it is also the output
    head), and the keys/values of `context` tokens per row."""
    seen, weights = set(), 0
    embed = model.get_input_embeddings().weight
    head = model.lm_head.weight if getattr(model.lm_head, "weight", None) is not None else None
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen or (t is embed and head is not embed):
            continue
        seen.add(id(t))
        weights += t.numel() * t.element_size()
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * context * batch * embed.element_size()
    return {"weights": weights, "kv_cache": kv}


def prompt(batch: int, vocab: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(1, vocab, (batch, PROMPT_TOKENS), generator=g).to(device)


def ours_generate(model, ids, graphs: bool):
    def run(n):
        kwargs = {} if graphs is None else {"cuda_graphs": graphs}
        out = model.generate(ids, max_new_tokens=n, do_sample=False, **kwargs)
        return out.shape[1] - ids.shape[1]
    return run


def hf_generate(model, ids, **extra):
    def run(n):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, **extra)
        return out.shape[1] - ids.shape[1]
    return run


# ---- the run --------------------------------------------------------------------------------------------

class Run:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.t0 = time.monotonic()
        self.doc = {"machine": machine(self.device), "settings": {k: v for k, v in vars(args).items()},
                    "results": [], "skipped": []}
        self.write()

    def time_left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.t0)

    def write(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.args.out)), exist_ok=True)
        tmp = self.args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.doc, f, indent=2, default=str)
        os.replace(tmp, self.args.out)

    def measure(self, label: dict, generate, model, batch: int, min_left: float = 5.0) -> None:
        """One configuration: decode steps/s, tok/s and the bandwidth fractions; errors are recorded, not raised."""
        if self.time_left() < min_left:
            self.doc["skipped"].append({**label, "why": f"budget: {self.time_left():.0f} s left"})
            self.write()
            return
        entry = dict(label, batch=batch)
        t0 = time.monotonic()
        try:
            rate = decode_rate(generate, self.args.short, self.args.long, self.args.repeats, self.device)
            context = PROMPT_TOKENS + (self.args.short + self.args.long) // 2
            nbytes = decode_bytes(model, batch, context)
            gbs = rate["steps_per_s"] * (nbytes["weights"] + nbytes["kv_cache"]) / 1e9
            entry.update(rate, tok_per_s=rate["steps_per_s"] * batch, bytes_per_step=nbytes, achieved_gbs=gbs)
            copy = self.doc["machine"].get("copy_gbs")
            if copy:
                entry["of_copy_bandwidth"] = gbs / copy
            nominal = self.doc["machine"].get("nominal_hbm_gbs")
            if nominal:
                entry["of_nominal_hbm"] = gbs / nominal
        except Exception as e:  # noqa: BLE001  (one failing engine must not lose the others)
            entry["error"] = f"{type(e).__name__}: {e}"[:2000]
        entry["seconds"] = time.monotonic() - t0
        self.doc["results"].append(entry)
        self.write()
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in entry.items()
                          if k not in ("bytes_per_step",)}), flush=True)


def machine(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        info["gpu"] = name
        info["nominal_hbm_gbs"] = next((bw for key, bw in NOMINAL_HBM_GBS.items() if key in name), None)
        info["copy_gbs"] = copy_bandwidth(device)
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["copy_gbs"] = copy_bandwidth(device, mib=64, repeat=3)
    try:
        from llama_fast.ops import default_backend
        info["llama_fast_backend"] = default_backend(device)
    except Exception as e:  # noqa: BLE001
        info["llama_fast_backend"] = f"error: {e}"
    return info


def bench_shape(run: Run, key: str) -> None:
    args, device = run.args, run.device
    shape = SHAPES[key]
    cuda = device.type == "cuda"
    for batch in (1, 8):
        ids = prompt(batch, shape["vocab_size"], device)
        if run.time_left() < 10:
            break
        model = llama_fast_model(shape, torch.bfloat16, device)
        for quant in ("bf16", "int4 g128"):
            if quant != "bf16":
                quantize_int4(model, 128)
            for graphs in ((True, False) if cuda else (None,)):
                label = {"model": shape["name"], "weights": quant, "engine": "llama_fast",
                         "cuda_graphs": graphs}
                run.measure(label, ours_generate(model, ids, graphs), model, batch)
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        if not args.no_transformers:
            try:
                hf = transformers_model(shape, torch.bfloat16, device)
            except Exception as e:  # noqa: BLE001
                run.doc["skipped"].append({"model": shape["name"], "engine": "transformers", "why": repr(e)[:500]})
                continue
            label = {"model": shape["name"], "weights": "bf16", "engine": "transformers sdpa eager"}
            run.measure(label, hf_generate(hf, ids), hf, batch)
            del hf
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()


def bench_transformers_compiled(run: Run, key: str) -> None:
    """transformers' static cache, which its generate compiles (torch.compile) on its own: slow to compile,
    hence last and only with time left."""
    shape = SHAPES[key]
    label = {"model": shape["name"], "weights": "bf16", "engine": "transformers sdpa static cache + compile"}
    if run.time_left() < 60:
        run.doc["skipped"].append({**label, "why": f"budget: {run.time_left():.0f} s left (needs ~60 to compile)"})
        run.write()
        return
    hf = transformers_model(shape, torch.bfloat16, run.device)
    hf.generation_config.cache_implementation = "static"
    ids = prompt(1, shape["vocab_size"], run.device)
    run.measure(label, hf_generate(hf, ids), hf, 1, min_left=60)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU here (torch.cuda.is_available() is False); nothing measured")
        return 0
    run = Run(args)
    print(json.dumps(run.doc["machine"]), flush=True)
    for key in args.shapes:
        bench_shape(run, key)
    if not args.no_transformers and not args.no_compile:
        bench_transformers_compiled(run, args.shapes[0])
    run.doc["total_s"] = time.monotonic() - run.t0
    run.write()
    errors = [r for r in run.doc["results"] if "error" in r]
    print(f"bench_gpu: {len(run.doc['results'])} results, {len(errors)} errors, {len(run.doc['skipped'])} skipped; "
          f"{args.out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
