"""What a tensor-parallel rank runs besides its shard of the weights: the collectives, over torch.distributed
(gloo on CPUs, NCCL on GPUs; no transport of our own).

  * row-parallel layers (o_proj, down_proj): their Linear's `combine_output` is an all-reduce (sum) of the
    partial products, two per decoder layer; the bias is added after it;
  * a vocab-sharded embedding (`VocabParallelEmbedding`): each rank looks up the ids in its rows, zeros the
    others, and one all-reduce assembles the embeddings (exact: every sum has one non-zero term);
  * a vocab-sharded lm_head: the combine is an all-gather of the logit shards (padded to equal width for
    the gather, trimmed back to the vocabulary).

Every rank ends a step with bitwise the same logits (an all-reduce hands every rank the same sums, an
all-gather the same shards), so greedy tokens, and sampled ones from generators seeded alike, are the same
on every rank without further communication.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from llama_fast.linear import Linear
from llama_fast.parallel.layout import TensorParallelLayout


@dataclass
class TensorParallel:
    """A rank's place in a tensor-parallel model: `model.tensor_parallel` of every model class in it."""
    layout: TensorParallelLayout
    group: object          # the torch.distributed process group

    @property
    def world(self) -> int:
        return self.layout.world

    @property
    def rank(self) -> int:
        return self.layout.rank


def all_reduce_sum(group):
    """The combine of a row-parallel layer: the sum of every rank's partial product, in place."""
    def combine(partial: torch.Tensor) -> torch.Tensor:
        partial = partial.contiguous()
        dist.all_reduce(partial, group=group)
        return partial
    return combine


def gather_vocab(group, world: int, shard: int, vocab_size: int):
    """The combine of a vocab-sharded head: logit shards [..., rows] -> the logits [..., vocab_size]."""
    def combine(logits: torch.Tensor) -> torch.Tensor:
        logits = F.pad(logits, (0, shard - logits.shape[-1])).contiguous()
        parts = [torch.empty_like(logits) for _ in range(world)]
        dist.all_gather(parts, logits, group=group)
        return torch.cat(parts, dim=-1)[..., :vocab_size]
    return combine


class VocabParallelEmbedding(nn.Embedding):
    """Rows [start, start + num_embeddings) of the embedding table; forward gives the whole lookup (an
    all-reduce of each rank's rows, the other ids zero)."""

    def __init__(self, start: int, rows: int, dim: int, dtype=None, device=None):
        super().__init__(rows, dim, dtype=dtype, device=device)
        self.weight.requires_grad_(False)
        self.start = start
        self.group = None            # set by attach()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside[..., None], 0)
        if self.group is not None:      # None: a world of one rank, which holds every row
            dist.all_reduce(out, group=self.group)
        return out

    def extra_repr(self) -> str:
        return f"rows {self.start}:{self.start + self.num_embeddings}, {self.embedding_dim}"


def shard_meta_model(cls, layout: TensorParallelLayout, dtype: torch.dtype) -> nn.Module:
    """`cls` on the meta device with this rank's shapes: the layers of layout.local_config() and, with a
    sharded vocabulary, the embedding and lm_head rows of this rank."""
    config = layout.local_config()
    with torch.device("meta"):
        model = cls(config, dtype=dtype)
        if layout.vocab != "sharded":
            return model
        (start, stop), hidden = layout.vocab_rows, config.hidden_size
        base = getattr(model, model.base_model_prefix, model)
        base.embed_tokens = VocabParallelEmbedding(start, stop - start, hidden, dtype=dtype)
        if isinstance(getattr(model, "lm_head", None), Linear):
            model.lm_head = Linear(hidden, stop - start, bias=False, dtype=dtype)
            if config.tie_word_embeddings:
                model.lm_head.weight = base.embed_tokens.weight
    return model


def row_parallel_input_sizes(model: nn.Module, layout: TensorParallelLayout) -> dict[str, int]:
    """Weight name -> the whole layer's input size, for each row-parallel layer (quantize= picks the group size
    the one-process model would, then checks that it divides the rank's columns)."""
    return {f"{name}.weight": m.in_features * layout.world for name, m in model.named_modules()
            if isinstance(m, Linear) and name.rpartition(".")[2] in ("o_proj", "down_proj")}


def attach(model: nn.Module, layout: TensorParallelLayout, group) -> nn.Module:
    """Installs the collectives on a loaded shard (see the module docstring). A world of one rank needs none:
    its model is the whole model, and decodes as one (the fused CPU decode stack included)."""
    info = TensorParallel(layout, group)
    for module in model.modules():
        if hasattr(type(module), "tensor_parallel"):
            module.tensor_parallel = info
    if layout.world == 1:
        return model
    reduce = all_reduce_sum(group)
    for name, module in model.named_modules():
        if isinstance(module, Linear) and name.rpartition(".")[2] in ("o_proj", "down_proj"):
            module.combine_output = reduce
        if isinstance(module, VocabParallelEmbedding):
            module.group = group
    if layout.vocab == "sharded" and isinstance(getattr(model, "lm_head", None), Linear):
        model.lm_head.combine_output = gather_vocab(group, layout.world, layout.vocab_shard,
                                                    layout.config.vocab_size)
    return model


def limit_threads(world: int) -> int:
    """Keeps ranks x threads within the cores this process may use (on one node: LOCAL_WORLD_SIZE ranks);
    torchrun already starts each rank with OMP_NUM_THREADS=1 unless told otherwise. -> the thread count."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if torch.get_num_threads() * local > cores:
        torch.set_num_threads(max(1, cores // local))
    return torch.get_num_threads()
