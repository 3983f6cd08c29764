"""Decode tokens/s of a GPTQ int4 g128 checkpoint loaded natively, against the same weights in llama_fast's
own int4 format (save_pretrained of that model, reloaded) and against llama_fast's own RTN int4 g128 of the
dense weights (quantize="int4"): the same kernels, so the first two must be within noise. Also the act-order
variant (desc_act: each quantized linear gathers its input features by the permutation first, inside the fused
C++ decode stack as op by op) and, per layer shape, the cost of that gather next to the GEMV it precedes. The
plain GPTQ model (no desc_act) runs the very same kernel without the gather: its speed is the upper bound of any
kernel that would read g_idx instead of permuting (such a kernel reads the same codes plus g_idx, or scales
in K order), so the act-order/plain ratio is the most a g_idx-reading kernel could gain.

    OMP_NUM_THREADS=2 python benchmarks/bench_hf_quantized.py [--tokens 48] [--rounds 3]

A random Llama of real proportions (hidden 1024, 8 layers, ~90M parameters), written by the tests' packer
(tests/hf_quant_util.py, from the GPTQ definition). Rounds are interleaved (a shared machine drifts);
each step is timed alone: tok/s of the median step over all rounds, and of the best round's median
step. Writes benchmarks/results/hf_quantized_decode.json and .png.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
import hf_quant_util as H  # noqa: E402

from _machine import cpu_read_bandwidth  # noqa: E402

SIZE = dict(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
            num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=512)


@torch.inference_mode()
def decode_steps(model, n: int, prompt_len: int = 16) -> list[float]:
    """Seconds of each of n greedy decode steps (batch 1, static cache)."""
    ids = torch.randint(0, SIZE["vocab_size"], (1, prompt_len), generator=torch.Generator().manual_seed(0))
    cache = model.model.new_cache(1, prompt_len + n + 1)
    tok = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
    steps = []
    for _ in range(n):
        t0 = time.perf_counter()
        tok = model(tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        steps.append(time.perf_counter() - t0)
    return steps


def gather_cost(model, repeat: int = 200) -> list[dict]:
    """Per distinct layer shape of an act-order model: the GEMV with its input gather (ops.quant_linear) vs
    the same kernel on pre-gathered input, microseconds, one activation row."""
    from llama_fast import ops
    from llama_fast.linear import Linear
    seen, rows = set(), []
    for name, m in model.named_modules():
        if not (isinstance(m, Linear) and m.quantized and m.input_perm is not None):
            continue
        key = (m.out_features, m.in_features)
        if key in seen:
            continue
        seen.add(key)
        qw = m.quantized_weight()
        x = torch.randn(1, m.in_features)
        gathered, plain = qw.kernel_input(x)

        def best(fn):
            for _ in range(10):
                fn()
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return statistics.median(times) * 1e6

        with_gather = best(lambda: ops.quant_linear(x, qw))
        without = best(lambda: ops.quant_linear(gathered, plain))
        rows.append({"layer": name, "n": key[0], "k": key[1], "gemv_with_gather_us": with_gather,
                     "gemv_us": without, "gather_share": (with_gather - without) / with_gather})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    import llama_fast

    work = tempfile.mkdtemp(prefix="bench_hfq_")
    hf = H.tiny_llama(seed=0, **SIZE)
    dense_dir, gptq_dir, actorder_dir, own_dir = (os.path.join(work, d) for d in ("dense", "gptq", "act", "own"))
    hf.save_pretrained(dense_dir)
    H.write_checkpoint(gptq_dir, hf, "gptq", bits=4, group_size=128, symmetric=True)
    H.write_checkpoint(actorder_dir, hf, "gptq", bits=4, group_size=128, symmetric=True, desc_act=True)
    del hf
    load = llama_fast.LlamaForCausalLM.from_pretrained
    models = {"gptq_int4_g128": load(gptq_dir, dtype="float32")}
    models["gptq_int4_g128"].save_pretrained(own_dir)
    models["same_weights_llama_fast_format"] = load(own_dir, dtype="float32")
    models["llama_fast_rtn_int4_g128"] = load(dense_dir, dtype="float32", quantize="int4", group_size=128)
    models["gptq_int4_g128_act_order"] = load(actorder_dir, dtype="float32")

    bandwidth_before = cpu_read_bandwidth(mib=1024, repeat=5)
    times = {name: [] for name in models}
    for name, model in models.items():               # warm-up: plans, thread pool
        decode_steps(model, 4)
    load = [os.getloadavg()]
    for r in range(args.rounds):
        order = list(models.items())
        for name, model in (order if r % 2 == 0 else order[::-1]):
            times[name].append(decode_steps(model, args.tokens))
        load.append(os.getloadavg())
    bandwidth_after = cpu_read_bandwidth(mib=1024, repeat=5)
    results = {name: {"median_tok_s": 1 / statistics.median([s for run in t for s in run]),
                      "best_tok_s": max(1 / statistics.median(run) for run in t),
                      "runs_tok_s": [1 / statistics.median(run) for run in t]} for name, t in times.items()}
    base = results["same_weights_llama_fast_format"]["median_tok_s"]
    for r in results.values():
        r["vs_same_weights_llama_fast_format"] = r["median_tok_s"] / base
    scale_dtypes = {name: str(m.model.layers[0].self_attn.qkv_proj.scales.dtype).removeprefix("torch.")
                    for name, m in models.items()}
    report = {
        "benchmark": "hf_quantized_decode", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"threads": torch.get_num_threads(), "torch": torch.__version__,
                    "read_bandwidth_gb_s": [round(bandwidth_before, 1), round(bandwidth_after, 1)],
                    "load_average_1_5_15": load,
                    "note": "shared 2-core machine, other engineers' jobs running: compare within this run"},
        "settings": {"model": SIZE, "dtype": "float32 activations", "batch": 1, "prompt": 16,
                     "new_tokens": args.tokens, "rounds": args.rounds, "scale_dtypes": scale_dtypes},
        "results": results,
        "act_order_gather": gather_cost(models["gptq_int4_g128_act_order"]),
    }
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    out = os.path.join(HERE, "results", "hf_quantized_decode.json")
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    _plot(report, out.removesuffix(".json") + ".png")
    for name, r in results.items():
        print(f"{name:34s} {r['median_tok_s']:7.1f} tok/s (best {r['best_tok_s']:.1f}, "
              f"{r['vs_same_weights_llama_fast_format']:.3f}x)")
    for g in report["act_order_gather"]:
        print(f"gather {g['n']}x{g['k']}: {g['gemv_with_gather_us']:.1f} us vs {g['gemv_us']:.1f} us")
    print(out)
    return 0


def _plot(report, path):
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(report["results"])
    med = [report["results"][n]["median_tok_s"] for n in names]
    best = [report["results"][n]["best_tok_s"] - m for n, m in zip(names, med)]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(range(len(names)), med, yerr=[[0] * len(best), best], capsize=3)
    ax.set_xticks(range(len(names)), [n.replace("_", "\n", 2) for n in names], fontsize=7)
    ax.set_ylabel("decode tok/s, batch 1 (median; bar to best)")
    ax.set_title(f"GPTQ int4 g128 vs llama_fast int4, {report['machine']['threads']} threads (shared machine), "
                 f"{report['date']}", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
