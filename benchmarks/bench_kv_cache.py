"""Decode at long context per KV cache dtype (issue 14, item 4): llama_fast with kv_cache_dtype None (the model
dtype), bfloat16, float16 and int8 at 128 and 4096 tokens of context, and llama.cpp on the same GGUF file with
its default f16 cache and with `-ctk/-ctv q8_0` (type_k / type_v = Q8_0, which needs flash attention).

    OMP_NUM_THREADS=2 python benchmarks/bench_kv_cache.py [--models smollm2,llama-1b] [--contexts 128,4096]
        [--steps 16] [--rounds 2] [--quality-tokens 256]

Each measurement is its own process (benchmarks/bench_decode_separate.py's harness: per-step medians, engines
alternating within a round, best round kept, read bandwidth, CPU model and load average recorded). llama_fast's
cache is filled with `context` tokens of random keys / values through ops.store_kv (the decode time does not
depend on the values; a real 4096-token prefill per run would take minutes on a 2-core machine); llama.cpp
prefills a prompt of that length, untimed. Files: SmolLM2-135M F32 (fp32 activations) and F16 (bf16
activations), the random 1B-shaped Llama in Q4_0 (fp32 activations).

--quality-tokens N: the SmolLM2 demo model's logits over N tokens of tests/data/public_domain_english.txt (teacher
forced, the prompt's keys going through the cache) with each kv_cache_dtype against the float32 cache: max and
mean absolute difference, top-1 agreement, mean KL divergence. Writes benchmarks/results/kv_cache.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_decode_separate as harness  # noqa: E402

from _machine import write_result  # noqa: E402

FILES = {"smollm2": ("F32", "F16"), "llama-1b": ("Q4_0",)}
OURS_KV = ("none", "bfloat16", "float16", "int8")
PEER_KV = ("f16", "q8_0")


def measure_llama_fast(path: str, fmt: str, context: int, steps: int, kv: str) -> dict:
    import torch

    import llama_fast
    from llama_fast import ops
    dtype = {"F32": torch.float32, "F16": torch.bfloat16}.get(fmt, torch.float32)
    model = llama_fast.LlamaForCausalLM.from_pretrained(path, dtype=dtype, device="cpu",
                                                        kv_cache_dtype=None if kv == "none" else kv)
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        cache = model.model.new_cache(1, context + steps + 8)
        slots = torch.arange(context)[None]
        for layer in range(cache.num_layers):      # `context` tokens of keys / values, as a prefill would leave
            k, v = (torch.randn(1, context, cfg.num_key_value_heads, cfg.head_dim, generator=g).to(dtype)
                    for _ in range(2))
            ops.store_kv(cache.k[layer], cache.v[layer], k, v, slots, k_scale=cache.k_scale[layer],
                         v_scale=cache.v_scale[layer])
        cache.lengths.fill_(context)
        cache.seen_tokens = context
        tok = torch.tensor([[harness.prompt_ids(8)[0]]])
        step_s = []
        for _ in range(steps):
            t0 = time.perf_counter()
            out = model(tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            step_s.append(time.perf_counter() - t0)
    return {"step_s": step_s, "dtype": str(dtype).removeprefix("torch."), "cache_dtype": str(cache.dtype)}


def measure_llama_cpp(path: str, context: int, steps: int, threads: int, kv: str) -> dict:
    import llama_cpp
    kind = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0}[kv]
    llm = llama_cpp.Llama(model_path=path, n_ctx=context + steps + 16, n_batch=512, n_ubatch=512, n_threads=threads,
                          n_threads_batch=threads, logits_all=False, verbose=False, type_k=kind, type_v=kind,
                          flash_attn=kv == "q8_0")         # a quantized V cache needs flash attention
    prompt = harness.prompt_ids(context)
    llm.eval(prompt)
    step_s = []
    for i in range(steps):       # fixed tokens: the step's time does not depend on which (llm.scores keeps only
        t0 = time.perf_counter()  # n_batch rows without logits_all, so the prompt's last logits are not there)
        llm.eval([prompt[i]])
        step_s.append(time.perf_counter() - t0)
    return {"step_s": step_s}


def quality(tokens: int) -> dict:
    """Logits of the demo model with each kv_cache_dtype against the float32 cache (fp32 weights)."""
    import torch

    import llama_fast
    from llama_fast import AutoTokenizer
    from llama_fast.tools.demo import find_demo_gguf
    path = find_demo_gguf()
    text = open(os.path.join(os.path.dirname(HERE), "tests", "data", "public_domain_english.txt")).read()
    ids = torch.tensor([AutoTokenizer.from_pretrained(path)(text)["input_ids"][:tokens]])
    model = llama_fast.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    out = {"model": os.path.basename(path), "tokens": ids.shape[1], "weights": "float32 (GGUF dequantized)"}
    with torch.inference_mode():
        half = ids.shape[1] // 2

        def logits(kv):
            model.kv_cache_dtype = kv
            first = model(ids[:, :half], use_cache=True)         # prefill half, then one token at a time
            rows, past = [first.logits], first.past_key_values
            for i in range(half, ids.shape[1]):
                step = model(ids[:, i:i + 1], past_key_values=past, use_cache=True)
                rows.append(step.logits)
                past = step.past_key_values
            return torch.cat(rows, 1)[0].float()
        ref = logits("float32")
        for kv in ("bfloat16", "float16", "int8"):
            got = logits(kv)
            kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                            reduction="none").sum(-1)
            out[kv] = {"max_abs_logit_diff": (got - ref).abs().max().item(),
                       "mean_abs_logit_diff": (got - ref).abs().mean().item(),
                       "max_abs_logit": ref.abs().max().item(),
                       "top1_agreement": (got.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                       "mean_kl": kl.mean().item()}
    return out


def attention_op_times(repeat: int = 20) -> list[dict]:
    """One decode step's attention of one layer (ops.attention, backend cpu, the calling thread only) over 128 and
    4096 cached tokens per cache dtype, SmolLM2's (9 / 3 heads) and the 1B's (32 / 8) shapes, head_dim 64: the
    best per-call thread CPU time (robust to other processes on a shared machine) and the cache bytes it read."""
    import torch

    from llama_fast import ops
    torch.set_num_threads(1)
    rows = []
    for shape, hq, hkv in (("smollm2", 9, 3), ("llama-1b", 32, 8)):
        for context in (128, 4096):
            for kv in (torch.float32, torch.bfloat16, torch.float16, torch.int8):
                q = torch.randn(1, 1, hq, 64)
                kc = torch.zeros(1, context, hkv, 64, dtype=kv)
                vc = torch.zeros_like(kc)
                ks, vs = (torch.zeros(1, context, hkv), torch.zeros(1, context, hkv)) if kv == torch.int8 else (None,
                                                                                                                None)
                ops.store_kv(kc, vc, torch.randn(1, context, hkv, 64), torch.randn(1, context, hkv, 64),
                             torch.arange(context)[None], k_scale=ks, v_scale=vs)
                def call():
                    return ops.attention(q, kc, vc, backend="cpu", k_scale=ks, v_scale=vs)
                for _ in range(5):
                    call()
                best = float("inf")
                for _ in range(5):
                    t0 = time.thread_time()
                    for _ in range(repeat):
                        call()
                    best = min(best, (time.thread_time() - t0) / repeat)
                nbytes = 2 * kc.numel() * kc.element_size() + (0 if ks is None else 2 * ks.numel() * 4)
                rows.append({"shape": shape, "context": context, "kv": str(kv).removeprefix("torch."),
                             "us_per_call": best * 1e6, "cache_bytes": nbytes, "GBps": nbytes / best / 1e9})
                print(rows[-1], flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--models", default="smollm2,llama-1b")
    p.add_argument("--contexts", default="128,4096")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--no-peer", action="store_true", help="llama_fast only")
    p.add_argument("--quality-tokens", type=int, default=0)
    p.add_argument("--quality-only", action="store_true", help="only the logits comparison (no timing)")
    p.add_argument("--attention-only", action="store_true",
                   help="only the attention op's thread CPU time per cache dtype and context (1 thread)")
    p.add_argument("--out", default=os.path.join(harness.RESULTS, "kv_cache.json"))
    args = p.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        if spec["engine"] == "llama_fast":
            result = measure_llama_fast(spec["path"], spec["format"], spec["context"], spec["steps"], spec["kv"])
        else:
            result = measure_llama_cpp(spec["path"], spec["context"], spec["steps"], spec["threads"], spec["kv"])
        print(json.dumps(result))
        return
    if args.attention_only:
        results = {"cpu": harness.cpu_description(), "load_average": os.getloadavg(),
                   "note": "thread CPU time of one call on the calling thread (1 thread)",
                   "attention_op": attention_op_times()}
        write_result(args.out, results)
        return
    if args.quality_only:
        results = {"cpu": harness.cpu_description(), "quality_vs_float32_cache": quality(args.quality_tokens or 128)}
        print(json.dumps(results["quality_vs_float32_cache"], indent=1))
        write_result(args.out, results)
        return
    contexts = [int(c) for c in args.contexts.split(",")]
    cases = []
    for model in filter(None, (m.strip() for m in args.models.split(","))):
        for fmt, path in harness.model_files(model, list(FILES[model])).items():
            for kv in OURS_KV:
                if fmt == "F16" and kv == "bfloat16":
                    continue                     # bf16 activations: the default cache is bfloat16 already
                cases += [dict(model=model, format=fmt, path=path, context=c, engine="llama_fast", kv=kv)
                          for c in contexts]
            if not args.no_peer:
                cases += [dict(model=model, format=fmt, path=path, context=c, engine="llama.cpp", kv=kv)
                          for kv in PEER_KV for c in contexts]
    results = {"cpu": harness.cpu_description(), "threads": args.threads, "steps": args.steps,
               "rounds": args.rounds, "read_bandwidth_GBps": [], "load_average": [], "cases": [],
               "note": "llama_fast's cache is filled with random keys / values (decode time does not depend on "
                       "them); llama.cpp prefills a prompt of the context length (untimed)"}
    runs = {i: [] for i in range(len(cases))}
    for r in range(args.rounds):
        results["read_bandwidth_GBps"].append(harness.read_bandwidth())
        results["load_average"].append(os.getloadavg())
        order = range(len(cases)) if r % 2 == 0 else reversed(range(len(cases)))   # alternate the order
        for i in order:
            spec = dict(cases[i], steps=args.steps, threads=args.threads)
            out = harness.run_in_process(spec, args.timeout, script=__file__)
            out["load_average"] = os.getloadavg()[0]
            runs[i].append(out)
            c = cases[i]
            line = out.get("error") or f"{statistics.median(out['step_s']) * 1e3:8.2f} ms/step"
            print(f"round {r} {c['model']:9s} {c['format']:5s} ctx {c['context']:5d} {c['engine']:10s} "
                  f"kv {c['kv']:8s} {line}", flush=True)
    for i, c in enumerate(cases):
        ok = [run for run in runs[i] if "step_s" in run]
        entry = {k: c[k] for k in ("model", "format", "context", "engine", "kv")}
        if ok:
            medians = [statistics.median(run["step_s"]) for run in ok]
            entry.update(step_ms_per_round=[m * 1e3 for m in medians], step_ms_best=min(medians) * 1e3,
                         load_average_per_round=[run["load_average"] for run in ok],
                         **{k: ok[0][k] for k in ("dtype", "cache_dtype") if k in ok[0]})
        else:
            entry["error"] = runs[i][-1].get("error") if runs[i] else "no run"
        results["cases"].append(entry)
    # decode time at the longest context over the shortest, per model / format / engine / kv
    best = {(e["model"], e["format"], e["engine"], e["kv"], e["context"]): e.get("step_ms_best")
            for e in results["cases"]}
    ratios = {}
    for (model, fmt, engine, kv, context), ms in best.items():
        if context == max(contexts) and ms and best.get((model, fmt, engine, kv, min(contexts))):
            ratios[f"{model} {fmt} {engine} kv={kv}"] = ms / best[(model, fmt, engine, kv, min(contexts))]
    results[f"step_time_ratio_{max(contexts)}_over_{min(contexts)}"] = ratios
    for name, ratio in ratios.items():
        print(f"{name}: {ratio:.2f}x")
    if args.quality_tokens:
        results["quality_vs_float32_cache"] = quality(args.quality_tokens)
        print(json.dumps(results["quality_vs_float32_cache"], indent=1))
    write_result(args.out, results)


if __name__ == "__main__":
    main()
