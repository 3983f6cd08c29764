"""Tensor parallelism over torch.distributed (docs/DESIGN.md, "Tensor parallelism"):

    # torchrun --nproc-per-node 2 script.py
    model = LlamaForCausalLM.from_pretrained(path, tp_plan="auto")    # this rank's shard
    out = model.generate(ids, max_new_tokens=32)                       # the same tokens on every rank

`layout` says which part of each weight a rank holds, `sharded_load` reads only that part of the files,
`runtime` holds the collectives (two all-reduces per layer, the vocab-sharded embedding and head), `launch`
starts ranks for the command line.
"""
from llama_fast.parallel.layout import TensorParallelError, TensorParallelLayout

__all__ = ["TensorParallelError", "TensorParallelLayout"]
