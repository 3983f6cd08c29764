"""CPU prefill, llama_fast against llama.cpp (the same GGUF files) and transformers, each engine in its own process.

The prefill sibling of bench_decode_separate.py (same files, same CPU description). Every measurement is a fresh
process that loads one file in one engine, runs one warm-up prefill of the context length (first-call costs), then
`--repeats` more into a fresh cache each, and keeps the best. It records the wall clock and the calling
thread's CPU time: with --threads 1 both engines compute on the calling thread, so that CPU time is the engine's
whole work and holds on a machine that other processes load (their time slices are not counted; their cache
pressure still is). With --threads 2 only the wall clock means anything, and only on an idle machine.

transformers runs the F32 file in fp32 and the F16 file in bf16 (it dequantizes GGUF files at load: it has no CPU
kernels for Q8_0 / Q4_0 / Q4_1, so for those files its fp32 run on the same model is the reference).

    OMP_NUM_THREADS=1 python benchmarks/bench_prefill_separate.py --threads 1 [--models smollm2]
        [--formats F32,F16,Q8_0,Q4_0,Q4_1] [--contexts 128,512,2048] [--transformers-contexts 128,512]
        [--rounds 2] [--repeats 2] [--out benchmarks/results/prefill_separate.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_decode_separate import cpu_description, model_files, prompt_ids, run_in_process  # noqa: E402

from _machine import write_result  # noqa: E402

ENGINES = ("llama_fast", "llama.cpp", "transformers")


def timed(fn) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - t0, time.thread_time() - c0


def measure(spec: dict) -> dict:
    context, repeats, engine = spec["context"], spec["repeats"], spec["engine"]
    ids = prompt_ids(context)
    if engine == "llama.cpp":
        import llama_cpp
        llm = llama_cpp.Llama(model_path=spec["path"], n_ctx=context + 32, n_batch=512, n_ubatch=512,
                              n_threads=spec["threads"], n_threads_batch=spec["threads"], logits_all=False,
                              verbose=False)

        def run(tokens):
            llm.reset()
            llm.eval(tokens)
    else:
        import torch
        torch.set_num_threads(spec["threads"])
        dtype = torch.bfloat16 if spec["format"] == "F16" else torch.float32
        if engine == "llama_fast":
            import llama_fast
            model = llama_fast.LlamaForCausalLM.from_pretrained(spec["path"], dtype=dtype, device="cpu")

            def run(tokens):
                with torch.inference_mode():
                    cache = model.model.new_cache(1, len(tokens) + 8)
                    model(torch.tensor([tokens]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        else:
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(os.path.dirname(spec["path"]),
                                                         gguf_file=os.path.basename(spec["path"]), dtype=dtype,
                                                         attn_implementation="sdpa").eval()

            def run(tokens):
                with torch.inference_mode():
                    model(torch.tensor([tokens]), use_cache=True, logits_to_keep=1)
    run(ids)  # warm-up at full length: first-call costs (buffers, page faults, pool start) are not prefill
    times = [timed(lambda: run(ids)) for _ in range(repeats)]
    return {"wall_s": [t[0] for t in times], "thread_cpu_s": [t[1] for t in times]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--models", default="smollm2")
    p.add_argument("--formats", default="F32,F16,Q8_0,Q4_0,Q4_1")
    p.add_argument("--contexts", default="128,512,2048")
    p.add_argument("--transformers-contexts", default="128,512")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--out", default=os.path.join(HERE, "results", "prefill_separate.json"))
    args = p.parse_args()
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    contexts = [int(c) for c in args.contexts.split(",")]
    hf_contexts = {int(c) for c in args.transformers_contexts.split(",") if c.strip()}
    clock = "thread_cpu_s" if args.threads == 1 else "wall_s"
    results = {"cpu": cpu_description(), "threads": args.threads, "clock": clock, "rounds": args.rounds,
               "repeats": args.repeats, "load_average": [], "cases": []}
    cases = [{"model": model, "format": fmt, "path": path, "context": c}
             for model in filter(None, (m.strip() for m in args.models.split(",")))
             for fmt, path in model_files(model, formats).items() for c in contexts]
    runs = {}
    for r in range(args.rounds):
        results["load_average"].append(os.getloadavg()[0])
        for i, case in enumerate(cases):
            engines = [e for e in ENGINES if e != "transformers" or
                       (case["context"] in hf_contexts and case["format"] in ("F32", "F16"))]
            for engine in (engines if (r + i) % 2 == 0 else engines[::-1]):    # alternate who goes first
                spec = dict(case, engine=engine, threads=args.threads, repeats=args.repeats)
                out = run_in_process(spec, args.timeout, __file__)
                runs.setdefault((case["model"], case["format"], case["context"], engine), []).append(out)
                line = out.get("error") or f"prefill {case['context'] / min(out[clock]):8.1f} tok/s ({clock})"
                print(f"round {r} {case['model']} {case['format']:5s} ctx {case['context']:5d} {engine:12s} {line}",
                      flush=True)
    for case in cases:
        entry = {k: case[k] for k in ("model", "format", "context")}
        for engine in ENGINES:
            ok = [o for o in runs.get((case["model"], case["format"], case["context"], engine), []) if clock in o]
            if ok:
                entry[engine] = {"prefill_tok_s_best": case["context"] / min(min(o[clock]) for o in ok),
                                 "prefill_tok_s_per_round": [case["context"] / min(o[clock]) for o in ok]}
        ours = entry.get("llama_fast", {}).get("prefill_tok_s_best")
        for peer in ("llama.cpp", "transformers"):
            theirs = entry.get(peer, {}).get("prefill_tok_s_best")
            if ours and theirs:
                entry[f"ratio_vs_{peer}"] = ours / theirs
        results["cases"].append(entry)
        print(f"{entry['model']} {entry['format']:5s} ctx {entry['context']:5d}: "
              + ", ".join(f"{k} {v:.2f}" for k, v in entry.items() if k.startswith("ratio")))
    results["load_average"].append(os.getloadavg()[0])
    write_result(args.out, results)


if __name__ == "__main__":
    main()
