"""kv_cache_dtype at the model level: from_pretrained(..., kv_cache_dtype=...) / model.kv_cache_dtype / the config
make every cache the model creates store keys and values in that dtype (int8: with per-token-per-head scales);
the fused C++ decode stack and the op-by-op CPU path read it natively and agree with the reference model on the
same cache semantics. (The error that storing in a smaller dtype makes is bounded at the op level in
tests/ops/test_kv_cache_dtype.py and reported for real models by benchmarks/bench_kv_cache.py.)"""
import pytest
import torch
from test_model_cpu_decode import _decode
from tolerance import assert_within_budget

from llama_fast import LlamaForCausalLM
from llama_fast.cache import StaticCache, kv_cache_dtype_name
from llama_fast.config import LlamaConfig
from llama_fast.ops import cpu_decode

import conftest

pytest.importorskip("llama_fast._C")

KV = ["int8", "bfloat16", "float16"]


@pytest.mark.parametrize("kv", KV)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_and_op_by_op_decode_match_the_reference_on_the_same_cache(tmp_path, monkeypatch, kv, dtype):
    conftest.make_hf_model(tmp_path, {"num_key_value_heads": 2})
    ids, mask, _ = conftest.left_padded_batch((0, 3), seq_len=12)
    fused_calls = []
    run = cpu_decode.run
    monkeypatch.setattr(cpu_decode, "run", lambda *a, **k: fused_calls.append(1) or run(*a, **k))
    ours = LlamaForCausalLM.from_pretrained(tmp_path, dtype=dtype, backend="cpu", kv_cache_dtype=kv)
    got = _decode(ours, ids, mask, prompt_len=6)
    with torch.no_grad():
        cache = ours(ids[:, :6], attention_mask=mask[:, :6], use_cache=True).past_key_values
    assert fused_calls and isinstance(cache, StaticCache) and cache.dtype == getattr(torch, kv)
    assert (cache.k_scale[0] is not None) == (kv == "int8")
    # op by op on the CPU kernels: the same numbers as the fused stack up to summation order
    monkeypatch.setattr(cpu_decode, "can_run", lambda *a, **k: False)
    op_by_op = _decode(ours, ids, mask, prompt_len=6)
    # the reference ops on the same cache semantics (reference.store_kv_any_cache quantizes bit for bit as the C++
    # store does; attention dequantizes exactly)
    ref = LlamaForCausalLM.from_pretrained(tmp_path, dtype=dtype, backend="torch", kv_cache_dtype=kv)
    want = _decode(ref, ids, mask, prompt_len=6)
    real = mask.bool()
    if dtype == "float32":          # rounding of a different summation order
        assert conftest.max_rel_diff(got[real], want[real]) <= 1e-4
        assert conftest.max_rel_diff(op_by_op[real], want[real]) <= 1e-4
        return
    # bf16: the tolerance rule against the fp32 reference model with the same kv_cache_dtype (oracle), PyTorch's
    # own bf16 computation (the reference model in bf16) being the plain one
    oracle = LlamaForCausalLM.from_pretrained(tmp_path, dtype="float32", backend="torch", kv_cache_dtype=kv)
    oracle_logits = _decode(oracle.to(torch.bfloat16).float(), ids, mask, prompt_len=6)
    assert_within_budget(got[real], oracle_logits[real], want[real], f"fused bf16, {kv} cache")
    assert_within_budget(op_by_op[real], oracle_logits[real], want[real], f"op by op bf16, {kv} cache")


def test_generate_with_an_int8_cache_and_legacy_interop(tmp_path):
    conftest.make_hf_model(tmp_path)
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype="float32", kv_cache_dtype=torch.int8)
    assert model.kv_cache_dtype == "int8" and model.model.config.kv_cache_dtype == "int8"
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, max_new_tokens=5, return_dict_in_generate=True)
    assert out.sequences.shape == (2, 12)
    cache = model.new_cache(2, 16)
    assert cache.dtype == torch.int8 and cache.k_scale[0].shape == (2, 16, model.config.num_key_value_heads)
    # a transformers-style (k, v) tuple is quantized into an int8 cache; to_legacy_cache dequantizes
    with torch.no_grad():
        first = model(ids, use_cache=True)
    legacy = first.past_key_values.to_legacy_cache()
    assert legacy[0][0].dtype == torch.float32 and legacy[0][0].shape[2] == 7
    with torch.no_grad():
        again = model(ids[:, -1:], past_key_values=legacy, use_cache=True)
        direct = model(ids[:, -1:], past_key_values=first.past_key_values, use_cache=True)
    # re-quantizing dequantized values gives the same codes and scales up to the rounding of the scale
    # (x = code * scale, max|x| = 127 * scale): the two caches hold the same keys, so the logits agree to rounding
    assert conftest.max_rel_diff(again.logits, direct.logits) <= 1e-5
    model.kv_cache_dtype = None
    assert model.new_cache(1, 4).dtype == torch.float32


@pytest.mark.parametrize("bad", ["int4", torch.int16, "q8_0", 8])
def test_bad_kv_cache_dtype_is_named(tmp_path, bad):
    conftest.make_hf_model(tmp_path)
    with pytest.raises(ValueError, match="kv_cache_dtype must be None"):
        LlamaForCausalLM.from_pretrained(tmp_path, kv_cache_dtype=bad)
    with pytest.raises(ValueError, match="kv_cache_dtype must be None"):
        StaticCache(1, 1, 4, 1, 8, dtype=bad)
    with pytest.raises(ValueError, match="kv_cache_dtype must be None"):
        LlamaConfig(**conftest.tiny_config(), kv_cache_dtype=bad)
    model = LlamaForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="kv_cache_dtype must be None"):
        model.kv_cache_dtype = bad


def test_kv_cache_dtype_names():
    assert kv_cache_dtype_name(None) is None
    assert kv_cache_dtype_name(torch.bfloat16) == kv_cache_dtype_name("torch.bfloat16") == "bfloat16"
    assert kv_cache_dtype_name("int8") == kv_cache_dtype_name(torch.int8) == "int8"
    cfg = LlamaConfig(**conftest.tiny_config(), kv_cache_dtype=torch.float16)
    assert cfg.kv_cache_dtype == "float16" and LlamaConfig(**cfg.to_dict()).kv_cache_dtype == "float16"
