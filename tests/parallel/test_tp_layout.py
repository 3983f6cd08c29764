"""llama_fast.parallel.layout without processes: which rows / columns each of W ranks reads, for world sizes
the two-rank tests cannot start here (4 and 8 ranks), and the errors for layouts that do not split."""
from __future__ import annotations

import pytest

from llama_fast import LlamaConfig
from llama_fast.parallel.layout import Split, TensorParallelError, TensorParallelLayout


def _config(**kw):
    base = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=8,
                num_key_value_heads=2, head_dim=8)
    return LlamaConfig(**{**base, **kw})


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_every_query_head_and_column_is_held_once_and_each_rank_holds_its_kv_heads(world):
    config = _config()
    group = config.num_attention_heads // config.num_key_value_heads      # query heads per KV head
    q_rows, inter = [], []
    for rank in range(world):
        layout = TensorParallelLayout(config, world, rank)
        q = layout.split("model.layers.0.self_attn.q_proj.weight")
        k = layout.split("model.layers.0.self_attn.k_proj.weight")
        assert layout.split("model.layers.0.self_attn.v_proj.weight") == k
        q_rows += range(q.start, q.stop)
        inter += range(*layout.inter)
        # the KV heads this rank holds are exactly those its query heads read
        d = config.head_dim
        needed = {h // group for h in range(q.start // d, q.stop // d)}
        assert set(range(k.start // d, k.stop // d)) == needed
        assert layout.local_config().num_key_value_heads == len(needed)
        o = layout.split("model.layers.0.self_attn.o_proj.weight")
        assert o == Split(1, q.start, q.stop)
        assert layout.split("model.layers.0.mlp.down_proj.weight") == Split(1, *layout.inter)
        assert layout.split("model.layers.0.mlp.down_proj.bias") is None      # added once, after the all-reduce
        assert layout.split("model.norm.weight") is None
    assert q_rows == list(range(config.num_attention_heads * config.head_dim))
    assert inter == list(range(config.intermediate_size))


def test_vocab_shards_cover_the_vocabulary_once():
    config = _config(vocab_size=101)
    rows = []
    for rank in range(4):
        s = TensorParallelLayout(config, 4, rank).split("lm_head.weight")
        assert s.dim == 0 and s.size <= 26
        rows += range(s.start, s.stop)
    assert rows == list(range(101))
    assert TensorParallelLayout(config, 4, 3, vocab="replicated").split("model.embed_tokens.weight") is None


@pytest.mark.parametrize("kw, world, message", [
    (dict(num_attention_heads=8, num_key_value_heads=8), 16, "needs at least 16 attention heads"),
    (dict(num_attention_heads=6, num_key_value_heads=6, head_dim=8), 4, "num_attention_heads=6 is not divisible"),
    (dict(num_attention_heads=12, num_key_value_heads=6, head_dim=8), 4, "num_key_value_heads=6 is not divisible"),
    (dict(num_attention_heads=12, num_key_value_heads=3, head_dim=8), 4, "does not divide it"),
    (dict(intermediate_size=100), 8, "intermediate_size=100 is not divisible"),
])
def test_layouts_that_do_not_split_name_the_problem(kw, world, message):
    with pytest.raises(TensorParallelError, match=message):
        TensorParallelLayout(_config(**kw), world, 0)
