"""K-quant GGUF files on the CPU: decode and prefill tokens/s and top-1 agreement with the F32 model, for
llama_fast (the file's blocks read natively by kquant_linear) and, when llama-cpp-python is installed,
llama.cpp on the same files (2 threads, batch 1, each engine in its own process, per-token Llama.eval timing).

Models: the fixture shape of tests/data (hidden 256, 2 layers) and, with --big, a bigger random model written
the same way (tests/data/make_kquant_fixtures.py; hidden 1024, intermediate 2816, 4 layers, vocab 4096). Each
is written as F32 and quantized to Q4_K_M / Q5_K_M / Q6_K, by llama.cpp when llama-cpp-python is installed,
else by tests/kquant_quantize.py (recorded in the JSON).

    OMP_NUM_THREADS=2 python benchmarks/bench_kquant.py [--big] [--tokens 32] [--out benchmarks/results/kquant_cpu.json]

Top-1 agreement: a fixed pseudo-random sequence of token ids (the fixtures' vocabulary is made up, so there is
no text to tokenize) is run teacher-forced; the share of positions whose argmax equals the F32 model's.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "tests", "data"))

FTYPES = ("Q4_K_M", "Q5_K_M", "Q6_K")
SHAPES = {"fixture": dict(hidden=256, intermediate=512, layers=2, vocab=512, heads=4, kv_heads=2),
          "big": dict(hidden=1024, intermediate=2816, layers=4, vocab=4096, heads=16, kv_heads=4)}


def _ids(vocab: int, n: int, seed: int = 0) -> list[int]:
    import torch
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run_llama_fast(path: str, f32_path: str, tokens: int, prompt: int, threads: int, vocab: int) -> dict:
    import torch

    from llama_fast import LlamaForCausalLM
    torch.set_num_threads(threads)
    model = LlamaForCausalLM.from_pretrained(path, backend="cpu")
    ids = torch.tensor([_ids(vocab, prompt)])
    with torch.no_grad():
        model(ids[:, :8])   # warm up
        t = time.perf_counter()
        logits = model(ids).logits
        prefill = prompt / (time.perf_counter() - t)
        out = model.generate(ids[:, :8], max_new_tokens=4, do_sample=False)   # warm up decode
        t = time.perf_counter()
        # eos_token_id = vocab: an id never generated, so every run decodes `tokens` tokens
        out = model.generate(ids[:, :8], max_new_tokens=tokens, do_sample=False, eos_token_id=vocab)
        decode = (out.shape[1] - 8) / (time.perf_counter() - t)
        ref = LlamaForCausalLM.from_pretrained(f32_path, backend="cpu")(ids).logits
    agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return {"decode_tok_s": decode, "prefill_tok_s": prefill, "top1_vs_f32": agree, "new_tokens": out.shape[1] - 8}


def run_llama_cpp(path: str, f32_path: str, tokens: int, prompt: int, threads: int, vocab: int) -> dict:
    import llama_cpp
    import numpy as np

    def load(p):
        return llama_cpp.Llama(model_path=p, n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads,
                               logits_all=True, verbose=False)
    llm = load(path)
    ids = _ids(vocab, prompt)
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids)
    prefill = prompt / (time.perf_counter() - t)
    logits = np.array(llm.scores[:prompt])
    llm.reset()
    llm.eval(ids[:8])
    times = []
    token = int(np.argmax(llm.scores[7]))
    for _ in range(tokens):      # per-token eval, greedy
        t = time.perf_counter()
        llm.eval([token])
        times.append(time.perf_counter() - t)
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    ref = load(f32_path)
    ref.reset()
    ref.eval(ids)
    agree = float((logits.argmax(-1) == np.array(ref.scores[:prompt]).argmax(-1)).mean())
    return {"decode_tok_s": tokens / sum(times), "prefill_tok_s": prefill, "top1_vs_f32": agree}


def _child(engine: str, path: str, f32: str, tokens: int, prompt: int, threads: int, vocab: int) -> dict:
    """One engine on one file in its own process (no shared thread pools or caches)."""
    code = (f"import json, sys; sys.path.insert(0, {os.path.join(ROOT, 'benchmarks')!r}); import bench_kquant as b; "
            f"print(json.dumps(b.run_{engine}({path!r}, {f32!r}, {tokens}, {prompt}, {threads}, {vocab})))")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--big", action="store_true", help="also the bigger random model")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "kquant_cpu.json"))
    args = p.parse_args()
    import make_kquant_fixtures as fx

    have_llama_cpp = importlib.util.find_spec("llama_cpp") is not None
    results = {"machine_note": "2-core shared machine under load from other jobs: numbers are indicative only",
               "threads": args.threads, "tokens": args.tokens, "prompt": args.prompt,
               "quantizer": "llama.cpp" if have_llama_cpp else "tests/kquant_quantize.py (llama-cpp-python absent)",
               "llama_cpp": "run" if have_llama_cpp else "not installed: not measured", "models": {}}
    shapes = ["fixture"] + (["big"] if args.big else [])
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            s = SHAPES[shape]
            config = fx.fixture_config(s["hidden"], s["intermediate"], s["layers"], s["vocab"], s["heads"],
                                       s["kv_heads"])
            f32 = os.path.join(tmp, f"{shape}_F32.gguf")
            fx.write_f32(f32, config)
            for ftype in FTYPES:
                path = os.path.join(tmp, f"{shape}_{ftype}.gguf")
                if have_llama_cpp:
                    fx.quantize(f32, path, ftype)
                else:
                    fx.quantize_own(path, config, ftype)
                row = {"file_bytes": os.path.getsize(path),
                       "llama_fast": _child("llama_fast", path, f32, args.tokens, args.prompt, args.threads,
                                            s["vocab"])}
                if have_llama_cpp:
                    row["llama_cpp"] = _child("llama_cpp", path, f32, args.tokens, args.prompt, args.threads,
                                              s["vocab"])
                results["models"][f"{shape}/{ftype}"] = row
                print(f"{shape}/{ftype}: {json.dumps(row)}", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
