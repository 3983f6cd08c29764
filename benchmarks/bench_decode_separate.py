"""CPU decode and prefill, llama_fast against llama.cpp on the same GGUF files, each engine in its own process.

Issue 14: one process holding two runtimes' thread pools distorts both, so every measurement here is a fresh
process that loads one file in one engine, prefills a prompt of the given context length, then times each decode
step on its own (llama.cpp: `Llama.eval` of one token, not create_completion's sampling and detokenizing;
llama_fast: one `forward` of one token through its cache). Engines alternate within each round, rounds repeat,
and the result keeps every per-step median, the best round, the read bandwidth measured before each round, the
CPU model and family, the kernels' run-time tuning, the load average and, per file, whether the caches hold a
buffer of its size (one thread's read bandwidth over it against a 1 GiB one). Each step's process CPU time is kept
too: with --threads 1 it is what other processes' load disturbs least (a preempted step loses wall time, not CPU
time), so on a shared machine `decode_cpu_time_ratio` (llama.cpp's CPU ms per token over ours) is the steadier
comparison.

    OMP_NUM_THREADS=2 python benchmarks/bench_decode_separate.py [--models smollm2,llama-1b]
        [--formats F32,F16,Q8_0,Q4_0,Q4_1] [--contexts 128,4096] [--steps 32] [--rounds 3] [--threads 2]
        [--kv-cache-dtype float16]

Files: the demo model (SmolLM2-135M, Q4_1 as shipped; F32 / F16 dense copies; Q8_0 / Q4_0 made from the F32 copy by
llama.cpp's quantizer), a random 1B-shaped Llama (benchmarks/_random_gguf.py; F16, quantized by llama.cpp) and a
random 8B-shaped one (`--models llama-8b`: random Q4_0 / Q8_0 blocks written directly, since speed does not depend on
the values and a 15 GB F16 file is not needed), cached in benchmarks/results/.cache.
llama_fast runs F32 files in fp32, F16 files in bf16 (the same two bytes per weight: its CPU kernels take bf16, and
an fp16 model bound for them is widened to fp32 at load) and quantized files natively with fp32 activations.
Writes benchmarks/results/decode_separate.json.
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

HERE = os.path.dirname(os.path.abspath(__file__))
# this checkout's llama_fast, not whichever one is installed (the workers run this file as a script, whose
# sys.path starts at benchmarks/)
sys.path.insert(0, os.path.dirname(HERE))
RESULTS = os.path.join(HERE, "results")
CACHE = os.path.join(RESULTS, ".cache")
ENGINES = ("llama_fast", "llama.cpp")


# ---- one measurement, in its own process -----------------------------------------------------------------

def prompt_ids(n: int) -> list[int]:
    import random
    rng = random.Random(n)
    return [rng.randrange(100, 20000) for _ in range(n)]


def measure_llama_fast(path: str, fmt: str, context: int, steps: int, kv_cache_dtype: str | None = None) -> dict:
    import torch

    import llama_fast
    from llama_fast.cuda_graphs import greedy_choice  # generate()'s greedy pick (the CPU argmax kernel)
    dtype = {"F32": torch.float32, "F16": torch.bfloat16}.get(fmt, torch.float32)
    t0 = time.perf_counter()
    model = llama_fast.LlamaForCausalLM.from_pretrained(path, dtype=dtype, device="cpu", kv_cache_dtype=kv_cache_dtype)
    load_s = time.perf_counter() - t0
    ids = torch.tensor([prompt_ids(context)])
    with torch.inference_mode():
        cache = model.model.new_cache(1, context + steps + 8)
        t0 = time.perf_counter()
        out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        prefill_s = time.perf_counter() - t0
        tok = greedy_choice(out.logits[:, -1])[:, None]
        step_s, step_cpu_s = [], []
        for _ in range(steps):
            t0, c0 = time.perf_counter(), time.process_time()
            out = model(tok, past_key_values=cache, use_cache=True)
            tok = greedy_choice(out.logits[:, -1])[:, None]
            step_s.append(time.perf_counter() - t0)
            step_cpu_s.append(time.process_time() - c0)
    return {"load_s": load_s, "prefill_s": prefill_s, "step_s": step_s, "step_cpu_s": step_cpu_s,
            "dtype": str(dtype).replace("torch.", "")}


def last_token_argmax(llm) -> int:
    """The greedy next token after llama.cpp's last eval. Read from the context's last logits row: with
    logits_all=False llama-cpp-python's `scores` holds n_batch rows, so scores[n_tokens - 1] is out of range once the
    context passes n_batch (it failed at 4096)."""
    import llama_cpp
    import numpy as np
    row = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return int(np.argmax(np.ctypeslib.as_array(row, shape=(llm.n_vocab(),))))


def measure_llama_cpp(path: str, fmt: str, context: int, steps: int, threads: int) -> dict:
    import llama_cpp

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=path, n_ctx=context + steps + 16, n_batch=512, n_ubatch=512,
                          n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    llm.eval(prompt_ids(context))
    prefill_s = time.perf_counter() - t0
    step_s, step_cpu_s = [], []
    for _ in range(steps):
        tok = last_token_argmax(llm)
        t0, c0 = time.perf_counter(), time.process_time()
        llm.eval([tok])
        step_s.append(time.perf_counter() - t0)
        step_cpu_s.append(time.process_time() - c0)
    return {"load_s": load_s, "prefill_s": prefill_s, "step_s": step_s, "step_cpu_s": step_cpu_s,
            "system_info": llama_cpp.llama_print_system_info().decode()}


def next_token_ids(spec: dict) -> dict:
    """Teacher-forced argmax next token at every position of spec["ids"] (for top-1 agreement)."""
    ids = spec["ids"]
    if spec["engine"] == "llama_fast":
        import torch

        import llama_fast
        dtype = {"F32": torch.float32, "F16": torch.bfloat16}.get(spec["format"], torch.float32)
        model = llama_fast.LlamaForCausalLM.from_pretrained(spec["path"], dtype=dtype, device="cpu")
        with torch.inference_mode():
            return {"argmax": model(torch.tensor([ids])).logits[0].argmax(-1).tolist()}
    import llama_cpp
    import numpy as np
    llm = llama_cpp.Llama(model_path=spec["path"], n_ctx=len(ids) + 16, n_batch=512, n_threads=spec["threads"],
                          n_threads_batch=spec["threads"], logits_all=True, verbose=False)
    llm.eval(ids)
    return {"argmax": np.argmax(llm.scores[: len(ids)], axis=-1).tolist()}


def worker(spec: dict) -> dict:
    if "ids" in spec:
        return next_token_ids(spec)
    if spec["engine"] == "llama_fast":
        return measure_llama_fast(spec["path"], spec["format"], spec["context"], spec["steps"],
                                  spec.get("kv_cache_dtype"))
    return measure_llama_cpp(spec["path"], spec["format"], spec["context"], spec["steps"], spec["threads"])


def run_in_process(spec: dict, timeout: float, script: str = __file__) -> dict:
    """`script --worker spec` in a fresh process (OMP_NUM_THREADS = spec["threads"]): its last stdout line, parsed."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    proc = subprocess.run([sys.executable, os.path.abspath(script), "--worker", json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"error": f"exit status {proc.returncode}: {proc.stderr.strip().splitlines()[-1:] }"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- files -----------------------------------------------------------------------------------------------

def model_files(model: str, formats: list[str]) -> dict:
    from _random_gguf import RANDOM_BLOCKS, quantize_with_llama_cpp, write_random_blocks, write_random_f16

    from llama_fast.tools.demo import find_demo_gguf

    from _gguf_dense import write_dense_gguf

    os.makedirs(CACHE, exist_ok=True)
    demo = find_demo_gguf()
    files = {}
    if model == "smollm2":
        f32 = write_dense_gguf(demo, os.path.join(CACHE, "smollm2-F32.gguf"), "F32")
        for fmt in formats:
            if fmt == "F32":
                files[fmt] = f32
            elif fmt == "F16":
                files[fmt] = write_dense_gguf(demo, os.path.join(CACHE, "smollm2-F16.gguf"), "F16")
            elif fmt == "Q4_1":
                files[fmt] = demo    # as shipped (Q4_1 layers, Q8_0 token table)
            else:
                files[fmt] = quantize_with_llama_cpp(f32, os.path.join(CACHE, f"smollm2-{fmt}.gguf"), fmt)
        return files
    if model == "llama-8b":
        # Random Q4_0 / Q8_0 blocks written directly: a 15 GB F16 file to quantize from is not needed for speed.
        for fmt in formats:
            if fmt in RANDOM_BLOCKS:
                files[fmt] = write_random_blocks(demo, os.path.join(CACHE, f"{model}-{fmt}-random.gguf"), model, fmt)
            else:
                print(f"llama-8b: skipping {fmt} (only {', '.join(RANDOM_BLOCKS)} are written for the 8B shape)")
        return files
    for fmt in [f for f in formats if f.endswith("-random")]:   # e.g. Q4_K_M-random: no llama.cpp quantizer needed
        files[fmt] = write_random_blocks(demo, os.path.join(CACHE, f"{model}-{fmt}.gguf"), model, fmt[:-len("-random")])
    formats = [f for f in formats if not f.endswith("-random")]
    if not formats:
        return files
    f16 = write_random_f16(demo, os.path.join(CACHE, f"{model}-F16.gguf"), model)
    for fmt in formats:
        if fmt == "F32":
            continue      # a 1B model in F32 is not what anyone runs on a CPU; F16 and the quantized types are
        files[fmt] = f16 if fmt == "F16" else quantize_with_llama_cpp(f16, os.path.join(CACHE, f"{model}-{fmt}.gguf"),
                                                                      fmt)
    return files


# ---- the machine -----------------------------------------------------------------------------------------

def cpu_description() -> dict:
    info = {"machine": platform.machine(), "logical_cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key in ("model name", "cpu family", "model", "stepping") and key not in info:
                    info[key] = value
                if key == "flags" and "flags" not in info:
                    info["flags"] = " ".join(x for x in value.split() if x.startswith(("avx", "amx", "f16c", "fma")))
    except OSError:
        pass
    return info


def read_bandwidth() -> float:
    sys.path.insert(0, HERE)
    from _machine import cpu_read_bandwidth
    return cpu_read_bandwidth(mib=1024, repeat=5)


def cache_holds(file_bytes: int) -> dict:
    """Whether this machine's caches hold a model of this size: one thread's read bandwidth over a buffer of the
    file's size, read again and again as decode reads its weights, over its bandwidth from a 1 GiB one (DRAM).
    A CPU that reports a large L3 (260 MiB on the Intel Xeon) may still not keep the model in it (other tenants
    share it). Files over 1 GiB (larger than any CPU cache) are not probed."""
    if file_bytes > 1 << 30:
        return {"one_thread_read_bandwidth_at_file_size_GBps": None, "over_1GiB": None}
    sys.path.insert(0, HERE)
    from _machine import cpu_cache_read_bandwidth
    gbps = cpu_cache_read_bandwidth(max(1, file_bytes >> 20))
    return {"one_thread_read_bandwidth_at_file_size_GBps": gbps, "over_1GiB": gbps / cpu_cache_read_bandwidth(1024)}


# ---- main ------------------------------------------------------------------------------------------------

def summarize(runs: list[dict]) -> dict:
    ok = [r for r in runs if "step_s" in r]
    if not ok:
        return {"error": runs[-1].get("error") if runs else "no run"}
    medians = [statistics.median(r["step_s"]) for r in ok]
    cpu = [statistics.median(r["step_cpu_s"]) for r in ok]
    return {"decode_tok_s_per_round": [1 / m for m in medians], "decode_tok_s_best": 1 / min(medians),
            "decode_cpu_ms_per_tok_per_round": [1e3 * c for c in cpu], "decode_cpu_ms_per_tok_best": 1e3 * min(cpu),
            "prefill_tok_s_best": max(r["context"] / r["prefill_s"] for r in ok),
            "load_s_best": min(r["load_s"] for r in ok),
            **{k: ok[0][k] for k in ("dtype", "system_info") if k in ok[0]}}


def top1_agreement(args, formats: list[str]) -> dict:
    """For each engine and SmolLM2 file: the fraction of positions whose greedy next token equals the same
    engine's on the F32 file (quantization error only, each engine against itself)."""
    from llama_fast import AutoTokenizer
    from llama_fast.tools.demo import find_demo_gguf

    text = open(os.path.join(os.path.dirname(HERE), "tests", "data", "public_domain_english.txt")).read()
    ids = AutoTokenizer.from_pretrained(find_demo_gguf())(text)["input_ids"][: args.agreement_tokens]
    files = model_files("smollm2", sorted(set(formats) | {"F32"}))
    out = {"tokens": len(ids)}
    for engine in ENGINES:
        argmax = {fmt: run_in_process(dict(engine=engine, path=path, format=fmt, ids=ids, threads=args.threads),
                                      args.timeout).get("argmax") for fmt, path in files.items()}
        ref = argmax["F32"]
        out[engine] = {fmt: (sum(a == b for a, b in zip(got, ref)) / len(ref) if got and ref else None)
                       for fmt, got in argmax.items() if fmt != "F32"}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--models", default="smollm2,llama-1b")
    p.add_argument("--formats", default="F32,F16,Q8_0,Q4_0,Q4_1")
    p.add_argument("--contexts", default="128,4096")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--agreement-tokens", type=int, default=0,
                   help="also: top-1 agreement of each file with the same engine's F32 file over this many tokens of "
                        "tests/data/public_domain_english.txt (SmolLM2 only: the random model's is meaningless)")
    p.add_argument("--kv-cache-dtype", default=None, choices=["bfloat16", "float16", "float32", "int8"],
                   help="llama_fast's KV cache storage (default: the model dtype, as transformers). llama.cpp keeps "
                        "F16 keys and values whatever the weights, so at long contexts float16 compares the same bytes")
    p.add_argument("--out", default=os.path.join(RESULTS, "decode_separate.json"))
    args = p.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(worker(spec)))
        return
    sys.path.insert(0, HERE)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    contexts = [int(c) for c in args.contexts.split(",")]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    from _random_gguf import SHAPES
    unknown = [m for m in models if m != "smollm2" and m not in SHAPES]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}: choose from smollm2, {', '.join(SHAPES)}")
    cases = []
    for model in models:
        for fmt, path in model_files(model, formats).items():
            for context in contexts:
                cases.append({"model": model, "format": fmt, "path": path, "context": context})
    from _machine import cpu_record, write_result
    machine = cpu_record()
    results = {"cpu": cpu_description(), "isa": machine.get("isa"), "kernel_tuning": machine.get("kernel_tuning"),
               "threads": args.threads, "steps": args.steps, "rounds": args.rounds,
               "kv_cache": {"llama_fast": args.kv_cache_dtype or "model dtype", "llama.cpp": "f16 (its default)"},
               "read_bandwidth_GBps": [],
               "load_average": [], "cases": []}
    runs = {(c["model"], c["format"], c["context"], e): [] for c in cases for e in ENGINES}
    for r in range(args.rounds):
        results["read_bandwidth_GBps"].append(read_bandwidth())
        results["load_average"].append(os.getloadavg()[0])
        for i, case in enumerate(cases):
            order = ENGINES if (r + i) % 2 == 0 else ENGINES[::-1]     # alternate which engine goes first
            for engine in order:
                spec = dict(case, engine=engine, steps=args.steps, threads=args.threads,
                            kv_cache_dtype=args.kv_cache_dtype)
                out = run_in_process(spec, args.timeout)
                out["context"] = case["context"]
                runs[(case["model"], case["format"], case["context"], engine)].append(out)
                line = out.get("error") or (f"decode {1 / statistics.median(out['step_s']):7.1f} tok/s  prefill "
                                            f"{case['context'] / out['prefill_s']:7.1f} tok/s")
                print(f"round {r} {case['model']:9s} {case['format']:5s} ctx {case['context']:5d} {engine:10s} {line}",
                      flush=True)
    for case in cases:
        entry = {k: case[k] for k in ("model", "format", "context")}
        entry["file_bytes"] = os.path.getsize(case["path"])
        entry["cache"] = cache_holds(entry["file_bytes"])
        for engine in ENGINES:
            entry[engine] = summarize(runs[(case["model"], case["format"], case["context"], engine)])
        ours, peer = entry["llama_fast"], entry["llama.cpp"]
        if "decode_tok_s_best" in ours and "decode_tok_s_best" in peer:
            entry["decode_ratio"] = ours["decode_tok_s_best"] / peer["decode_tok_s_best"]
            entry["prefill_ratio"] = ours["prefill_tok_s_best"] / peer["prefill_tok_s_best"]
            entry["decode_cpu_time_ratio"] = peer["decode_cpu_ms_per_tok_best"] / ours["decode_cpu_ms_per_tok_best"]
            bw = max(results["read_bandwidth_GBps"]) * 1e9
            entry["llama_fast_file_bytes_x_tok_s_over_bandwidth"] = entry["file_bytes"] * ours["decode_tok_s_best"] / bw
        results["cases"].append(entry)
        nan = float("nan")
        print(f"{entry['model']:9s} {entry['format']:5s} ctx {entry['context']:5d}: decode ratio "
              f"{entry.get('decode_ratio', nan):.2f}, prefill ratio {entry.get('prefill_ratio', nan):.2f}, "
              f"decode CPU-time ratio {entry.get('decode_cpu_time_ratio', nan):.2f}")
    if args.agreement_tokens:
        results["top1_agreement_with_own_f32"] = top1_agreement(args, formats)
        print(json.dumps(results["top1_agreement_with_own_f32"], indent=1))
    write_result(args.out, results)


if __name__ == "__main__":
    main()
