"""KV caches in another dtype than the activations (kv_cache_dtype: bfloat16, float16, float32, or int8 with one
fp32 scale per token per kv head): ops.store_kv writes them, ops.attention reads them, the C++ CPU kernels at
every instruction-set level against the reference (llama_fast/ops/reference.py)."""
import math

import pytest
import torch

from llama_fast import ops
from llama_fast.ops import BackendUnavailableError, reference

from op_fixtures import backend, matches_reference  # noqa: F401  (pytest fixtures)

KV_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.int8]
# (B, Tq, Tk, Hq, Hkv, D, kv_lens): decode (split-K over a long cache, SmolLM2's 9/3 and a 1B's 32/8 grouping),
# two tokens, a short prefill (the tiled kernel), head_dim 64 / 128 / 80 (a D that is not a multiple of the
# vector width takes the scalar tail).
CASES = [
    (2, 1, 700, 9, 3, 64, [700, 301]),
    (1, 1, 1100, 8, 2, 128, None),
    (1, 2, 45, 4, 1, 80, None),
    (2, 1, 33, 4, 4, 64, [33, 1]),
    (2, 37, 37, 4, 2, 64, [37, 20]),
]


def _case_id(c) -> str:
    return "B{}_Tq{}_Tk{}_H{}/{}_D{}".format(*c[:6])


def _cache(b, tk, hkv, d, kv_dtype, k, v):
    """A [B, Tk, Hkv, D] cache of kv_dtype holding k / v (slot t = token t), written by the reference."""
    kc = torch.zeros(b, tk, hkv, d, dtype=kv_dtype)
    vc = torch.zeros_like(kc)
    scales = (torch.zeros(b, tk, hkv), torch.zeros(b, tk, hkv)) if kv_dtype == torch.int8 else (None, None)
    slots = torch.arange(tk)[None].expand(b, tk).contiguous()
    reference.store_kv_any_cache(kc, vc, k, v, slots, *scales)
    return kc, vc, scales


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_store_matches_reference_exactly(backend, dtype, kv_dtype):
    name, _ = backend
    g = torch.Generator().manual_seed(1)
    b, t, hkv, d = 2, 5, 3, 64
    k, v = torch.randn(b, t, hkv, d, generator=g).to(dtype) * 3, torch.randn(b, t, hkv, d, generator=g).to(dtype)
    k[0, 1, 2] = 0                          # an all-zero row: scale 0
    slots = torch.tensor([[4, 0, 2, -1, 7], [1, 2, 3, 4, 5]])
    outs = []
    for which in (name, "torch"):
        kc = torch.full((b, 8, hkv, d), 7, dtype=kv_dtype)
        vc = kc.clone()
        scales = (torch.zeros(b, 8, hkv), torch.zeros(b, 8, hkv)) if kv_dtype == torch.int8 else (None, None)
        ops.store_kv(kc, vc, k, v, slots, backend=which, k_scale=scales[0], v_scale=scales[1])
        outs.append((kc, vc) + scales)
    # Exact by construction: both sides round the same fp32 values once to nearest even (bf16 / fp16), or for
    # int8 take the same max|x| (exact), the same correctly rounded fp32 division max / 127 and x / scale and
    # round half to even (store_kv.cpp and reference.quantize_kv_rows spell the same formula).
    for got, want in zip(*outs):
        if got is not None:
            assert torch.equal(got, want)
    kc, _, ks, _ = outs[0]
    assert (kc[1, 0] == 7).all() and (kc[0, 3] == 7).all()       # untouched slots (left padding skipped)
    if kv_dtype == torch.int8:
        assert ks[0, 0, 2] == 0 and (kc[0, 0, 2] == 0).all()
        assert kc.abs().max() == 127                              # each row's largest value takes code +-127


def test_int8_store_of_a_non_finite_row_gives_nan_attention():
    """A key with inf / NaN: scale NaN, so attention over it is NaN as over a float cache (never a silent 0)."""
    k = torch.randn(1, 4, 1, 64)
    k[0, 2, 0, 5] = float("inf")
    kc, vc, (ks, vs) = _cache(1, 4, 1, 64, torch.int8, k, torch.randn(1, 4, 1, 64))
    assert torch.isnan(ks[0, 2, 0]) and not torch.isnan(ks[0, 1, 0])
    q = torch.randn(1, 1, 2, 64)
    for name in ("cpu", "torch"):
        out = ops.attention(q, kc, vc, backend=name, k_scale=ks, v_scale=vs)
        assert torch.isnan(out).all()


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attention_reads_the_cache_like_the_reference(backend, case, dtype, kv_dtype, matches_reference):
    name, _ = backend
    b, tq, tk, hq, hkv, d, lens = case
    g = torch.Generator().manual_seed(2)
    q = torch.randn(b, tq, hq, d, generator=g).to(dtype)
    k, v = torch.randn(b, tk, hkv, d, generator=g), torch.randn(b, tk, hkv, d, generator=g)
    kc, vc, (ks, vs) = _cache(b, tk, hkv, d, kv_dtype, k, v)
    kv_lens = None if lens is None else torch.tensor(lens, dtype=torch.int32)
    out = ops.attention(q, kc, vc, True, kv_lens, backend=name, k_scale=ks, v_scale=vs)
    assert out.dtype == dtype and out.shape == q.shape
    # the oracle: the same stored cache, dequantized exactly (reference.dequantize_kv), attended in fp32
    kf, vf = reference.dequantize_kv(kc, ks), reference.dequantize_kv(vc, vs)
    want = reference.attention(q.float(), kf, vf, True, kv_lens)
    # the plain PyTorch computation in the activations' dtype, as tests/ops/test_attention.py takes it
    mask = reference.attention_mask(b, tq, tk, True, kv_lens, q.device)
    group = hq // hkv
    low = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), kf.to(dtype).transpose(1, 2).repeat_interleave(group, 1),
        vf.to(dtype).transpose(1, 2).repeat_interleave(group, 1), attn_mask=mask).transpose(1, 2)
    low = torch.where(mask.any(-1).transpose(1, 2)[..., None], low, torch.zeros_like(low))
    matches_reference(out, want, low)


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=str)
def test_quantization_error_of_attention_within_the_derived_bound(kv_dtype):
    """Attention over the stored cache vs over the exact fp32 keys / values, against the bound that the storage
    step implies (not a tolerance picked to pass). Each stored element is off by at most delta(row) (int8: half a
    code step, scale / 2 = max|row| / 254; bf16 / fp16 / fp32: half an epsilon of the element). A key off by
    dk_j moves score j by at most e_j = softmax_scale x ||q||_1 x max|dk_j|; scores all moved by at most
    e = max_j e_j change each probability by a factor in [exp(-2e), exp(2e)], so sum |dp| <= exp(2e) - 1; hence
    |out - exact| <= (exp(2e) - 1) x max|v| + max_j max|dv_j| (plus fp32 rounding, far below)."""
    g = torch.Generator().manual_seed(3)
    b, tq, tk, hq, hkv, d = 1, 1, 600, 8, 2, 64
    q = torch.randn(b, tq, hq, d, generator=g)
    k, v = torch.randn(b, tk, hkv, d, generator=g), torch.randn(b, tk, hkv, d, generator=g)
    kc, vc, (ks, vs) = _cache(b, tk, hkv, d, kv_dtype, k, v)
    out = ops.attention(q, kc, vc, backend="cpu", k_scale=ks, v_scale=vs)
    exact = reference.attention(q, k, v)

    def step(x, scale):              # the largest storage error of each (token, head) row
        if kv_dtype == torch.int8:
            return scale / 2
        return x.abs().amax(-1) * torch.finfo(kv_dtype).eps / 2
    dk, dv = step(k, ks), step(v, vs)
    # the error actually made is within the step (checks the step, too)
    assert ((reference.dequantize_kv(kc, ks) - k).abs().amax(-1) <= dk * (1 + 1e-6)).all()
    softmax_scale = d ** -0.5
    q_l1 = q.abs().sum(-1).max().item()
    e = softmax_scale * q_l1 * dk.max().item()
    bound = math.expm1(2 * e) * v.abs().max().item() + dv.max().item() + 1e-5
    err = (out - exact).abs().max().item()
    assert err <= bound, f"{kv_dtype}: error {err:.3g} > derived bound {bound:.3g}"


def test_bad_cache_arguments_are_named():
    q = torch.randn(1, 1, 4, 64)
    kc = torch.zeros(1, 8, 2, 64, dtype=torch.int8)
    ks = torch.zeros(1, 8, 2)
    with pytest.raises(RuntimeError, match="int8 KV cache needs k_scale and v_scale"):
        ops.attention(q, kc, kc, backend="cpu")
    with pytest.raises(RuntimeError, match="k_scale / v_scale go with an int8 KV cache only"):
        ops.attention(q, kc.float(), kc.float(), backend="cpu", k_scale=ks, v_scale=ks)
    with pytest.raises(RuntimeError, match="does not match the int8 cache"):
        ops.attention(q, kc, kc, backend="cpu", k_scale=ks[:, :4], v_scale=ks[:, :4])
    with pytest.raises(RuntimeError, match="must be a float32 CPU tensor"):
        ops.attention(q, kc, kc, backend="cpu", k_scale=ks.double(), v_scale=ks.double())
    with pytest.raises(RuntimeError, match="kv_cache_dtype"):
        ops.attention(q, kc.to(torch.int16), kc.to(torch.int16), backend="cpu")
    with pytest.raises(RuntimeError, match="int8 KV cache needs k_scale and v_scale"):
        ops.store_kv(kc, kc.clone(), torch.randn(1, 1, 2, 64), torch.randn(1, 1, 2, 64), torch.tensor([[0]]),
                     backend="cpu", k_scale=ks)


def test_off_the_cpu_a_converted_cache_is_an_error_not_a_slow_path():
    """Only the C++ CPU kernels read a cache in another dtype; elsewhere backend=None raises naming the option
    (the meta device stands in for a GPU here), and an explicit kernel backend says it lacks the op."""
    q = torch.randn(1, 1, 4, 64, device="meta")
    kc = torch.zeros(1, 8, 2, 64, dtype=torch.int8, device="meta")
    ks = torch.zeros(1, 8, 2, device="meta")
    with pytest.raises(BackendUnavailableError, match="kv_cache_dtype"):
        ops.attention(q, kc, kc, k_scale=ks, v_scale=ks)
    with pytest.raises(BackendUnavailableError, match="kv_cache_dtype"):
        ops.store_kv(kc, kc, q[:, :, :2], q[:, :, :2], torch.zeros(1, 1, dtype=torch.long, device="meta"),
                     k_scale=ks, v_scale=ks)
