import pytest
import torch
from tolerance import assert_fp32_close, assert_within_budget

from llama_fast import kernels, ops
from llama_fast.kernels import kernel_module
from llama_fast.ops import reference

decode_attention = kernel_module("attention").decode_attention
prefill_attention = kernel_module("attention").prefill_attention


def _plain_attention(q, k, v, causal, kv_lens):
    """The textbook computation in q's dtype: the error budget of the fp16 tests."""
    b, tq, hq, d = q.shape
    group = hq // k.shape[2]
    qt = q.transpose(1, 2)
    kt = k.transpose(1, 2).repeat_interleave(group, 1)
    vt = v.transpose(1, 2).repeat_interleave(group, 1)
    scores = (qt @ kt.transpose(-1, -2)) * d ** -0.5
    mask = reference.attention_mask(b, tq, k.shape[1], causal, kv_lens, q.device)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
    return (probs @ vt).transpose(1, 2)


def _inputs(b, tq, tk, hq, hkv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda t, h: torch.randn(b, t, h, d, generator=g).to(dtype)  # noqa: E731
    return make(tq, hq), make(tk, hkv), make(tk, hkv)


def _check(out, q, k, v, causal, kv_lens):
    if q.dtype == torch.float32:
        assert_fp32_close(out, reference.attention(q, k, v, causal, kv_lens))
    else:
        oracle = reference.attention(q.float(), k.float(), v.float(), causal, kv_lens)
        assert_within_budget(out, oracle, _plain_attention(q, k, v, causal, kv_lens))


# (B, Tq, Tk, Hq, Hkv, D, kv_lens, causal): GQA ratios 1 / 3 / 8, head_dim 64 / 128, odd lengths, two query
# blocks (Tq 70 > BLOCK_M 64), per-sequence lengths whose first queries have no valid key (zeros), and a head
# dim that is not a power of two (the CUDA backend hands those to Triton).
PREFILL_CASES = [
    (1, 7, 7, 2, 2, 64, None, True),
    (2, 19, 19, 3, 1, 128, [19, 11], True),
    (1, 70, 70, 8, 1, 64, None, True),
    (2, 5, 13, 4, 4, 80, [13, 9], False),   # head_dim 80: not a power of two (masked lanes)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])      # tl.dot: no bf16 in the interpreter
@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: "B{}_Tq{}_Tk{}_Hq{}_Hkv{}_D{}_lens{}_causal{}".format(*c))
def test_prefill_attention(case, dtype):
    b, tq, tk, hq, hkv, d, lens, causal = case
    q, k, v = _inputs(b, tq, tk, hq, hkv, d, dtype)
    kv_lens = None if lens is None else torch.tensor(lens, dtype=torch.int32)
    out = prefill_attention(q, k, v, causal, kv_lens)
    _check(out, q, k, v, causal, kv_lens)
    if lens is not None and causal and min(lens) < tq:
        assert out[lens.index(min(lens)), : tq - min(lens)].eq(0).all()   # no valid key -> zeros


# Decode: one or a few query rows against a longer cache, split over several programs (split-K) and merged.
DECODE_CASES = [
    (2, 1, 83, 8, 1, 128, [83, 40], 3),     # MQA-like group of 8 sharing each K/V tile, 3 splits
    (1, 3, 50, 6, 2, 64, [37], 4),          # group 3, three query rows, splits past kv_len stay empty
    (1, 1, 29, 4, 4, 96, None, 1),          # MHA, a single split, head_dim 96
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: "B{}_Tq{}_Tk{}_Hq{}_Hkv{}_D{}_lens{}_splits{}".format(*c))
def test_split_k_decode_attention(case, dtype):
    b, tq, tk, hq, hkv, d, lens, splits = case
    q, k, v = _inputs(b, tq, tk, hq, hkv, d, dtype, seed=1)
    kv_lens = None if lens is None else torch.tensor(lens, dtype=torch.int32)
    _check(decode_attention(q, k, v, True, kv_lens, num_splits=splits), q, k, v, True, kv_lens)


def test_ops_attention_dispatches_both_kernels_with_scale():
    q, k, v = _inputs(1, 2, 21, 4, 2, 64, torch.float32, seed=2)
    for qq in (q, q.repeat(1, 20, 1, 1)):                        # 4 rows per kv head: decode; 80: prefill
        out = ops.attention(qq, k, v, causal=True, scale=0.1, backend="triton")
        assert_fp32_close(out, reference.attention(qq, k, v, True, None, 0.1))


def test_bad_input_is_named():
    q, k, v = _inputs(1, 2, 4, 3, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        kernels.attention(q, k, v)
    q, k, v = _inputs(1, 2, 4, 2, 2, 8, torch.float32)
    with pytest.raises(ValueError, match=r"kv_lens must lie in \[0, 4\]"):
        kernels.attention(q, k, v, True, torch.tensor([5], dtype=torch.int32))
    with pytest.raises(TypeError, match="dtypes differ"):
        kernels.attention(q, k.half(), v)
