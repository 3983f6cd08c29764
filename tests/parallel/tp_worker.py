"""One rank of the tensor-parallel tests (tests/parallel/test_tensor_parallel.py starts two with
llama_fast.parallel.launch.run_ranks): for each case of a JSON list it loads the model with tp_plan="auto",
runs a left-padded forward, greedy and seeded sampled generation, and writes the results (or the error it
raised) to OUT/<case>.rank<r>.*; the test compares them with the one-process model."""
from __future__ import annotations

import faulthandler
import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from llama_fast import LlamaForCausalLM
from llama_fast.formats import safetensors


def inputs(vocab: int):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def static_steps(model, ids, mask, steps: int = 4) -> torch.Tensor:
    """Logits [steps, B, V] of LlamaForCausalLM.decode_step (the static step CUDA graphs capture) after a
    prefill, fed fixed tokens (not the argmax, which a near-tie could flip between two computations)."""
    cache = model.new_cache(ids.shape[0], ids.shape[1] + steps)
    model(ids, attention_mask=mask, past_key_values=cache, logits_to_keep=1)
    cos, sin = model.rope_tables(cache)
    out = []
    for step in range(steps):
        tok = (torch.arange(ids.shape[0]) * 5 + step * 11) % model.config.vocab_size
        out.append(model.decode_step(tok[:, None], cache, cos, sin))
        cache.seen_tokens += 1
    return torch.stack(out)


def run_case(case: dict, out: str, rank: int) -> None:
    stem = os.path.join(out, f"{case['name']}.rank{rank}")
    if case.get("fail_rank") == rank:     # a failure on one rank only: the others must not wait for it
        _fail_loading_here()
    try:
        path = case.get(f"path_rank{rank}", case["path"])     # a rank given another model: refused by all
        model = LlamaForCausalLM.from_pretrained(path, tp_plan="auto", **case.get("kwargs", {}))
    except Exception as e:
        with open(stem + ".error.txt", "w") as f:
            f.write(f"{type(e).__name__}: {e}")
        return
    ids, mask = inputs(model.config.vocab_size)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        steps = static_steps(model, ids, mask)
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    sampled = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, temperature=1.0,
                             top_k=0, seed=123)
    try:    # a rank holds only its heads' attention: refused rather than half an answer
        model(ids, output_attentions=True)
        refused = 0
    except ValueError:
        refused = 1
    safetensors.write(stem + ".safetensors", [("logits", logits.float()), ("greedy", greedy), ("sampled", sampled),
                                              ("refuses_output_attentions", torch.tensor([refused])),
                                              ("static_steps", steps.float())])


def _fail_loading_here() -> None:
    from llama_fast import loading

    def fail(*args, **kwargs):
        raise RuntimeError("injected failure on this rank")
    original = loading._load_hf_directory
    loading._load_hf_directory = fail
    _RESTORE.append(lambda: setattr(loading, "_load_hf_directory", original))


_RESTORE: list = []


def main() -> int:
    faulthandler.enable()   # a rank that aborts (SIGABRT) or crashes prints every thread's Python stack
    cases, out = json.load(open(sys.argv[1])), sys.argv[2]
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    for case in cases:
        run_case(case, out, rank)
        while _RESTORE:
            _RESTORE.pop()()
    # Waiting here lets go of the GIL, so gloo's worker threads drop the last collectives' tensors before the
    # teardown (llama_fast.parallel.sharded_load._let_collectives_finish_at_exit says why that matters).
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
