"""Which part of every weight one tensor-parallel rank holds (docs/DESIGN.md, "Tensor parallelism").

Megatron-style sharding of a Llama decoder layer over W ranks, rank r:
  * q_proj: the rows of query heads [r H/W, (r+1) H/W) ("column parallel": each rank computes its heads);
  * k_proj / v_proj: the rows of the key/value heads those query heads read. With Hkv >= W each rank holds
    Hkv/W of them; with Hkv < W (W % Hkv == 0) each rank holds the one KV head its query heads share, which
    W/Hkv ranks then hold each (replicated, as vLLM's QKVParallelLinear does);
  * gate_proj / up_proj: the rows of intermediate columns [r I/W, (r+1) I/W);
  * o_proj / down_proj: the matching input columns ("row parallel"): each rank's product is a partial sum of
    the full output, and one all-reduce after each restores it (two per layer);
  * embed_tokens / lm_head: vocab rows [r ceil(V/W), ...) ("vocab parallel"; see TensorParallelLayout.vocab);
  * norms and the row-parallel biases: whole on every rank (a bias is added once, after the all-reduce).

A `Split` says which rows (dim 0) or input columns (dim 1) of a transformers-named weight a rank reads; the
format readers (llama_fast.parallel.sharded_reads) turn it into byte ranges of the file. A layout that
cannot be sharded (heads or the intermediate size not divisible by W, more ranks than heads) raises
TensorParallelError from the config alone, so every rank raises the same error before any communication.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from llama_fast.config import LlamaConfig

# The vocabulary: split over the ranks ("sharded", the default) or whole on each ("replicated"). See
# docs/DESIGN.md for the measurement behind the default.
VOCAB_MODES = ("sharded", "replicated")


class TensorParallelError(ValueError):
    """The model cannot be split this way over this many ranks, or a shard boundary would split a
    quantization group / block."""


@dataclass(frozen=True)
class Split:
    """Rows [start, stop) of dim 0 (output rows) or dim 1 (input columns) of a weight, in weight elements."""
    dim: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


_COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_ROW_PARALLEL = ("o_proj", "down_proj")


class TensorParallelLayout:
    """The shard of rank `rank` of `world` ranks for a model of `config` (the whole model's config)."""

    def __init__(self, config: LlamaConfig, world: int, rank: int, vocab: str = "sharded"):
        if not 0 <= rank < world:
            raise TensorParallelError(f"rank {rank} is not in 0..{world - 1}")
        if vocab not in VOCAB_MODES:
            raise TensorParallelError(f"vocab must be one of {VOCAB_MODES}, got {vocab!r}")
        self.config, self.world, self.rank, self.vocab = config, world, rank, vocab
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        inter, d = config.intermediate_size, config.head_dim
        if world > heads:
            raise TensorParallelError(f"tensor parallelism over {world} ranks needs at least {world} attention "
                                      f"heads; the model has {heads}")
        if heads % world:
            raise TensorParallelError(f"num_attention_heads={heads} is not divisible by the world size {world}: "
                                      "each rank must hold the same number of query heads")
        if kv_heads >= world and kv_heads % world:
            raise TensorParallelError(f"num_key_value_heads={kv_heads} is not divisible by the world size {world}")
        if kv_heads < world and world % kv_heads:
            raise TensorParallelError(f"num_key_value_heads={kv_heads} is smaller than the world size {world} and "
                                      "does not divide it: KV heads can be replicated only when every head is "
                                      "held by the same number of ranks")
        if inter % world:
            raise TensorParallelError(f"intermediate_size={inter} is not divisible by the world size {world}")
        if vocab == "sharded" and config.vocab_size < world:
            raise TensorParallelError(f"vocab_size={config.vocab_size} is smaller than the world size {world}")
        self.heads = heads // world
        self.kv_heads = max(kv_heads // world, 1)
        first_kv = rank * kv_heads // world if kv_heads >= world else rank // (world // kv_heads)
        self.q_rows = (rank * self.heads * d, (rank + 1) * self.heads * d)
        self.kv_rows = (first_kv * d, (first_kv + self.kv_heads) * d)
        self.inter = (rank * inter // world, (rank + 1) * inter // world)
        # Vocab shards of ceil(V/W) rows; the last may be shorter (its logits are padded for the gather).
        self.vocab_shard = -(-config.vocab_size // world)
        start = min(rank * self.vocab_shard, config.vocab_size)
        self.vocab_rows = ((start, min(start + self.vocab_shard, config.vocab_size)) if vocab == "sharded"
                           else (0, config.vocab_size))
        if self.vocab_rows[1] <= self.vocab_rows[0]:
            raise TensorParallelError(f"vocab_size={config.vocab_size} leaves rank {rank} of {world} no vocabulary "
                                      "rows; use vocab='replicated'")

    def local_config(self) -> LlamaConfig:
        """The config of this rank's model: its heads and intermediate columns (hidden size, vocabulary size
        and head_dim are the whole model's: ids and logits keep their meaning)."""
        local = copy.deepcopy(self.config)
        local.num_attention_heads, local.num_key_value_heads = self.heads, self.kv_heads
        local.intermediate_size = self.inter[1] - self.inter[0]
        local.head_dim = self.config.head_dim
        return local

    def split(self, name: str) -> Split | None:
        """The part of the transformers-named tensor `name` this rank reads, or None for all of it."""
        parts = name.split(".")
        if len(parts) < 2:
            return None
        module, attr = parts[-2], parts[-1]
        if module in ("embed_tokens", "lm_head"):
            return Split(0, *self.vocab_rows) if self.vocab == "sharded" else None
        if module in _COLUMN_PARALLEL:
            rows = self.q_rows if module == "q_proj" else self.kv_rows if module in ("k_proj", "v_proj") \
                else self.inter
            return Split(0, *rows)
        if module in _ROW_PARALLEL and attr == "weight":
            return Split(1, *(self.q_rows if module == "o_proj" else self.inter))
        return None      # norms, and the biases of row-parallel layers (added once, after the all-reduce)

    def describe(self) -> str:
        c = self.config
        return (f"rank {self.rank}/{self.world}: {self.heads} of {c.num_attention_heads} query heads, "
                f"{self.kv_heads} of {c.num_key_value_heads} KV heads, intermediate "
                f"{self.inter[0]}:{self.inter[1]} of {c.intermediate_size}, vocab {self.vocab} "
                f"{self.vocab_rows[0]}:{self.vocab_rows[1]} of {c.vocab_size}")
