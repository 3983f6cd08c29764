"""The KV cache: incremental decoding equals a full recompute (also left-padded), chunked prefill equals one
prefill, transformers' cache forms are accepted, and a full fixed-size cache says so."""
import pytest
import torch

from llama_fast import LlamaForCausalLM, StaticCache
from llama_fast.cache import CacheOverflowError

from conftest import left_padded_batch, load_hf, make_hf_model, max_rel_diff

CONFIG = dict(num_attention_heads=8, num_key_value_heads=2, rope_scaling={"type": "linear", "factor": 2.0})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cache")
    make_hf_model(directory, CONFIG)
    return directory


@pytest.fixture(scope="module", params=["torch", None])
def model(saved, request):
    return LlamaForCausalLM.from_pretrained(saved, backend=request.param)


def _ids(batch, t, seed=5):
    return torch.randint(0, 128, (batch, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_decode_step_by_step_equals_full_recompute(model):
    ids = _ids(2, 12)
    full = model(ids, use_cache=False).logits
    out = model(ids[:, :7])
    steps = [out.logits]
    cache = out.past_key_values
    for t in range(7, 12):
        out = model(ids[:, t:t + 1], past_key_values=cache)
        assert out.past_key_values is cache
        steps.append(out.logits)
    assert max_rel_diff(torch.cat(steps, 1), full) <= 1e-5
    assert cache.lengths.tolist() == [12, 12] and cache.seen_tokens == 12


@torch.no_grad()
def test_left_padded_decode_equals_full_recompute(model):
    ids, mask, _ = left_padded_batch(pads=(0, 3, 6), seq_len=12)
    full = model(ids, attention_mask=mask, use_cache=False).logits
    cache = model.new_cache(batch_size=3, max_len=12)      # exactly sized, as generate() does
    out = model(ids[:, :8], attention_mask=mask[:, :8], past_key_values=cache)
    steps = [out.logits]
    for t in range(8, 12):
        # transformers-style full-length mask (past and chunk)
        out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache)
        steps.append(out.logits)
    got = torch.cat(steps, 1)
    real = mask.bool()
    assert max_rel_diff(got[real], full[real]) <= 1e-5
    assert cache.lengths.tolist() == [12, 9, 6]


@torch.no_grad()
def test_left_padded_decode_equals_transformers(model, saved):
    ref = load_hf(saved)
    ids, mask, pos = left_padded_batch(pads=(0, 3, 6), seq_len=10)
    prompt, nxt = ids[:, :9], ids[:, 9:]
    ours = model(prompt, attention_mask=mask[:, :9])
    ours = model(nxt, attention_mask=mask, past_key_values=ours.past_key_values).logits
    theirs = ref(prompt, attention_mask=mask[:, :9], position_ids=pos[:, :9], use_cache=True)
    theirs = ref(nxt, attention_mask=mask, position_ids=pos[:, 9:],
                 past_key_values=theirs.past_key_values).logits
    assert max_rel_diff(ours, theirs) <= 1e-4


@torch.no_grad()
def test_chunked_prefill_equals_single_prefill(model):
    ids, mask, _ = left_padded_batch(pads=(0, 5), seq_len=13)
    single = model(ids, attention_mask=mask).logits
    cache = model.new_cache(batch_size=2, max_len=13)
    chunks = [model(ids[:, a:b], attention_mask=mask[:, a:b], past_key_values=cache).logits
              for a, b in ((0, 4), (4, 9), (9, 13))]        # the second row is all padding in chunk 1
    real = mask.bool()
    assert max_rel_diff(torch.cat(chunks, 1)[real], single[real]) <= 1e-5


@torch.no_grad()
def test_transformers_cache_forms_are_accepted(model, saved):
    ref = load_hf(saved)
    ids = _ids(2, 9)
    past = ref(ids[:, :8], use_cache=True).past_key_values     # a transformers DynamicCache
    expected = ref(ids[:, 8:], past_key_values=past).logits
    past = ref(ids[:, :8], use_cache=True).past_key_values
    legacy = tuple((layer.keys, layer.values) for layer in past.layers)
    from_legacy = model(ids[:, 8:], past_key_values=legacy)
    from_dynamic = model(ids[:, 8:], past_key_values=past).logits
    assert max_rel_diff(from_legacy.logits, expected) <= 1e-4
    assert max_rel_diff(from_dynamic, expected) <= 1e-4
    assert isinstance(from_legacy.past_key_values, StaticCache)
    k, v = from_legacy.past_key_values.to_legacy_cache()[0]
    assert k.shape == (2, 2, 9, 8)


@torch.no_grad()
def test_left_padded_legacy_cache_is_compacted(model, saved):
    ref = load_hf(saved)
    ids, mask, pos = left_padded_batch(pads=(0, 4), seq_len=10)
    past = ref(ids[:, :9], attention_mask=mask[:, :9], position_ids=pos[:, :9], use_cache=True).past_key_values
    expected = model(ids, attention_mask=mask).logits[:, 9:]
    legacy = tuple((layer.keys, layer.values) for layer in past.layers)
    got = model(ids[:, 9:], attention_mask=mask, past_key_values=legacy)
    assert max_rel_diff(got.logits, expected) <= 1e-4
    assert got.past_key_values.lengths.tolist() == [10, 6]


@torch.no_grad()
def test_fixed_cache_overflow_is_an_error(model):
    cache = model.new_cache(batch_size=1, max_len=8)
    model(_ids(1, 6), past_key_values=cache)
    with pytest.raises(CacheOverflowError, match=r"holds 8 tokens .* 6 are used and the input adds 3 \(needs 9\)"):
        model(_ids(1, 3), past_key_values=cache)
    assert cache.seen_tokens == 6     # a refused chunk leaves the cache as it was


@torch.no_grad()
def test_implicit_cache_grows(model):
    ids = _ids(1, 300)
    out = model(ids[:, :250])
    cache = out.past_key_values
    assert cache.growable and cache.max_len == 256
    out = model(ids[:, 250:], past_key_values=cache)
    assert cache.max_len == 512
    full = model(ids, use_cache=False).logits
    assert max_rel_diff(out.logits, full[:, 250:]) <= 1e-5


def test_cache_layout_and_errors():
    cache = StaticCache(num_layers=2, batch_size=3, max_len=5, num_kv_heads=2, head_dim=4, dtype=torch.bfloat16)
    assert cache.k[0].shape == (3, 5, 2, 4) and cache.k[0].dtype == torch.bfloat16
    assert cache.lengths.dtype == torch.int32 and cache.lengths.tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="sizes must be positive"):
        StaticCache(num_layers=2, batch_size=0, max_len=5, num_kv_heads=2, head_dim=4)


@torch.no_grad()
def test_cache_batch_mismatch_is_an_error(model):
    cache = model.new_cache(batch_size=2, max_len=8)
    with pytest.raises(ValueError, match="past_key_values holds 2 sequences, the input has 1"):
        model(_ids(1, 3), past_key_values=cache)


@torch.no_grad()
def test_bad_legacy_cache_is_an_error(model):
    bad = tuple((torch.zeros(1, 3, 4, 8), torch.zeros(1, 3, 4, 8)) for _ in range(2))
    with pytest.raises(ValueError, match=r"past_key_values\[0\]: key/value must be \[batch, 2, past_len, 8\]"):
        model(_ids(1, 1), past_key_values=bad)
    with pytest.raises(ValueError, match="past_key_values has 1 layers, the model has 2"):
        model(_ids(1, 1), past_key_values=bad[:1])


@torch.no_grad()
def test_dynamic_rope_decode_past_max_position_matches_transformers(tmp_path):
    # Dynamic NTK scaling recomputes the frequencies as the sequence grows past max_position_embeddings
    # (keys already cached keep their old rotation): the same state machine as transformers'.
    make_hf_model(tmp_path, dict(rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=16))
    ref = load_hf(tmp_path)
    ours = LlamaForCausalLM.from_pretrained(tmp_path)
    ids = _ids(1, 24)
    theirs = ref(ids[:, :14], use_cache=True)
    mine = ours(ids[:, :14])
    for t in range(14, 24):
        theirs = ref(ids[:, t:t + 1], past_key_values=theirs.past_key_values, use_cache=True)
        mine = ours(ids[:, t:t + 1], past_key_values=mine.past_key_values)
        assert max_rel_diff(mine.logits, theirs.logits) <= 1e-4, f"step {t}"


@torch.no_grad()
def test_empty_transformers_cache_starts_a_new_one(model):
    from transformers import DynamicCache
    ids = _ids(2, 7)
    out = model(ids[:, :5], past_key_values=DynamicCache())
    assert isinstance(out.past_key_values, StaticCache) and out.past_key_values.growable
    out = model(ids[:, 5:], past_key_values=out.past_key_values)
    assert max_rel_diff(out.logits, model(ids, use_cache=False).logits[:, 5:]) <= 1e-5
