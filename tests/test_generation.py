"""generate() against transformers' generate on tiny random LLaMA configs (same weights, saved by
transformers and loaded by llama_fast), plus sampling, eos, limits and errors."""
import pytest
import torch

import llama_fast
from llama_fast.generation import generate, warp_logits

from conftest import assert_greedy_agrees

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2, hidden_size=64),
    "mha_tied": dict(num_attention_heads=4, num_key_value_heads=4, hidden_size=64, tie_word_embeddings=True),
    "mqa_hd64": dict(num_attention_heads=2, num_key_value_heads=1, hidden_size=128, rope_theta=500000.0),
}


def _tiny(name, tmp_path_factory):
    torch.manual_seed(0)
    params = dict(vocab_size=97, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=64,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, **CONFIGS[name])
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**params)).eval()
    # Larger weights than the init gives, so logits are far apart and argmax is not a coin toss.
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() == 2:
                p.mul_(8)
    path = tmp_path_factory.mktemp(name)
    ref.save_pretrained(path)
    ours = llama_fast.LlamaForCausalLM.from_pretrained(str(path), dtype="float32")
    return ref, ours


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def models(request, tmp_path_factory):
    return _tiny(request.param, tmp_path_factory)


def _batch(lengths, vocab=97, pad=0, seed=1):
    """Left-padded prompts of the given lengths (ids 3.. so no pad/bos/eos inside)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids, mask


def _ref_generate(ref, ids, mask, **kw):
    """transformers' greedy output with its per-step logits (for assert_greedy_agrees)."""
    return ref.generate(input_ids=ids, attention_mask=mask, do_sample=False, return_dict_in_generate=True,
                        output_logits=True, **kw)


def _assert_agrees(got, expected, prompt_len):
    # Tiny fp32 models: our logits agree with transformers' to ~1e-6 of their scale (test_modeling).
    assert_greedy_agrees(got, expected, prompt_len, rel_tol=1e-5)


def test_greedy_batch_matches_transformers(models):
    ref, ours = models
    ids, mask = _batch([7, 3, 11])
    expected = _ref_generate(ref, ids, mask, max_new_tokens=16, eos_token_id=None, pad_token_id=0)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=[])
    assert got.shape == (3, 11 + 16)
    _assert_agrees(got, expected, 11)


def test_greedy_single_prompt_matches_and_prompt_is_kept(models):
    ref, ours = models
    ids, mask = _batch([9], seed=5)
    expected = _ref_generate(ref, ids, mask, max_new_tokens=10, eos_token_id=None, pad_token_id=0)
    got = generate(ours, ids, max_new_tokens=10, eos_token_id=[])
    _assert_agrees(got, expected, 9)
    assert torch.equal(got[:, :9], ids)


@pytest.mark.parametrize("as_list", [False, True])
def test_eos_stops_rows_and_pads_like_transformers(models, as_list):
    ref, ours = models
    ids, mask = _batch([6, 4, 8], seed=3)
    free = ours.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    eos = int(free[0, 8 + 3])       # a token row 0 emits at step 3 becomes "eos"
    eos_arg = [eos, 96] if as_list else eos
    expected = _ref_generate(ref, ids, mask, max_new_tokens=12, eos_token_id=eos_arg, pad_token_id=0)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos_arg, pad_token_id=0)
    _assert_agrees(got, expected, 8)
    assert int(got[0, 8 + 3]) == eos and (got[0, 8 + 4:] == 0).all()   # row 0 padded after its eos


def test_default_eos_from_config_and_max_length(models):
    ref, ours = models
    ids, mask = _batch([5, 5], seed=7)
    expected = _ref_generate(ref, ids, mask, max_length=13)
    got = ours.generate(ids, attention_mask=mask, max_length=13)
    _assert_agrees(got, expected, 5)


@pytest.fixture(scope="module")
def gqa_model(tmp_path_factory):
    return _tiny("gqa", tmp_path_factory)[1]


def test_sampling_is_reproducible(gqa_model):
    ours = gqa_model
    ids, mask = _batch([4, 6], seed=2)
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=True, temperature=1.5, top_k=20, eos_token_id=[])
    a = ours.generate(ids, seed=123, **kw)
    b = ours.generate(ids, generator=torch.Generator().manual_seed(123), **kw)
    c = ours.generate(ids, seed=124, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    greedy = ours.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(ours.generate(ids, seed=9, **{**kw, "top_k": 1}), greedy)
    assert torch.equal(ours.generate(ids, seed=9, **{**kw, "top_k": 0, "top_p": 1e-6}), greedy)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.5, 10, 0.6)])
def test_warpers_match_transformers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(4, 83, generator=torch.Generator().manual_seed(0)) * 3
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    expected = warpers(None, logits.clone())
    got = warp_logits(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    torch.testing.assert_close(got[~torch.isinf(got)], expected[~torch.isinf(expected)])


def test_limits_are_clear_errors(gqa_model):
    ours = gqa_model
    ids, mask = _batch([10])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours.generate(ids, max_new_tokens=60)
    cache = ours.model.new_cache(1, 12)
    with pytest.raises(ValueError, match="do not fit the given cache"):
        ours.generate(ids, max_new_tokens=5, past_key_values=cache)
    with pytest.raises(ValueError, match="num_beams"):
        ours.generate(ids, max_new_tokens=2, num_beams=4)
    with pytest.raises(ValueError, match="temperature"):
        ours.generate(ids, max_new_tokens=2, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="input_ids"):
        ours.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(TypeError, match="unexpected"):
        ours.generate(ids, max_new_tokens=2, bogus=1)


def test_given_cache_is_used(models):
    _, ours = models
    ids, mask = _batch([5, 3])
    cache = ours.model.new_cache(2, 5 + 6)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[], past_key_values=cache)
    assert torch.equal(got, ours.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[]))
    assert cache.seen_tokens == 5 + 5    # the last token is never fed back


def test_accepts_tokenizer_output(gqa_model):
    ours = gqa_model
    ids, mask = _batch([4, 2])
    enc = {"input_ids": ids, "attention_mask": mask}
    assert torch.equal(ours.generate(enc, max_new_tokens=3, eos_token_id=[]),
                       ours.generate(ids, attention_mask=mask, max_new_tokens=3, eos_token_id=[]))
