"""CUDA attention (split-K flash-decoding and the tensor-core prefill) against the reference: GQA 1/4/8,
head_dim 64/128, all dtypes, decode and prefill, kv_lens with left padding and empty rows."""
import pytest
import torch

from llama_fast import ops
from llama_fast.ops import reference

from cuda_testing import DTYPES, assert_matches, requires_cuda

pytestmark = requires_cuda


def plain_attention(q, k, v, causal, kv_lens, scale):
    """The same computation in q's dtype (scores, softmax and P @ V rounded to it)."""
    b, tq, hq, d = q.shape
    group = hq // k.shape[2]
    qh = q.transpose(1, 2)
    kh = k.transpose(1, 2).repeat_interleave(group, 1)
    vh = v.transpose(1, 2).repeat_interleave(group, 1)
    scores = (qh @ kh.transpose(-1, -2)) * scale
    mask = reference.attention_mask(b, tq, k.shape[1], causal, kv_lens, q.device)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    probs = torch.where(mask.any(-1, keepdim=True), probs, torch.zeros_like(probs))
    return (probs @ vh).transpose(1, 2)


def run_case(b, tq, tk, hq, hkv, d, dtype, causal=True, kv_lens=None, seed=0):
    torch.manual_seed(seed)
    q = torch.randn(b, tq, hq, d, device="cuda", dtype=dtype)
    k = torch.randn(b, tk, hkv, d, device="cuda", dtype=dtype)
    v = torch.randn(b, tk, hkv, d, device="cuda", dtype=dtype)
    scale = d ** -0.5
    out = ops.attention(q, k, v, causal=causal, kv_lens=kv_lens, backend="cuda")
    oracle = reference.attention(q.float(), k.float(), v.float(), causal, kv_lens, scale)
    assert_matches(out, oracle, plain_attention(q, k, v, causal, kv_lens, scale),
                   f"attention b={b} tq={tq} tk={tk} hq={hq} hkv={hkv} d={d} {dtype} causal={causal}",
                   fp32_rtol=1e-4, fp32_atol=1e-5)
    return out


GQA = [(4, 4), (8, 2), (16, 2)]  # group sizes 1, 4, 8


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv", GQA)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("tk", [1, 83, 769, 4100])
def test_decode(dtype, hq, hkv, d, tk):
    run_case(2, 1, tk, hq, hkv, d, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv", GQA)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("t", [7, 83, 300])
def test_prefill(dtype, hq, hkv, d, t):
    run_case(2, t, t, hq, hkv, d, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
def test_not_causal(dtype, d):
    run_case(1, 37, 91, 8, 2, d, dtype, causal=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tq", [1, 4, 37])
@pytest.mark.parametrize("hq,hkv", [(9, 3), (16, 2), (4, 4)])   # (4, 4) with tq 1 / 4: the warps split the keys
def test_kv_cache_with_lengths(dtype, tq, hq, hkv):
    # A static cache of 600 slots, sequences of different lengths; one has fewer keys than queries
    # (its first rows see no key and must be zero), one is empty.
    lens = torch.tensor([600, 123, tq // 2, 0], device="cuda", dtype=torch.int32)
    out = run_case(4, tq, 600, hq, hkv, 64, dtype, kv_lens=lens)
    assert torch.count_nonzero(out[3]) == 0
    assert torch.count_nonzero(out[2, : tq - tq // 2]) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_and_prefill_kernels_agree(dtype):
    # Tq * group just below and above the tensor-core threshold give the same numbers up to rounding.
    torch.manual_seed(6)
    k = torch.randn(1, 300, 2, 64, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    q = torch.randn(1, 5, 8, 64, device="cuda", dtype=dtype)  # 5 x 4 = 20 rows per kv head: tensor cores
    full = ops.attention(q, k, v, backend="cuda")
    rows = torch.cat([ops.attention(q[:, i:i + 1], k[:, : 296 + i], v[:, : 296 + i], backend="cuda")
                      for i in range(5)], 1)  # 4 rows each: split-K
    torch.testing.assert_close(full, rows, rtol=2 ** -6, atol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [1, 40])
def test_model_layout_strided_q_and_cache_prefix(dtype, t):
    # As the model calls it: q split from the fused qkv output, k/v the first kv_span slots of a static cache.
    torch.manual_seed(7)
    b, hq, hkv, d, slots, span = 3, 8, 2, 64, 256, 100
    qkv = torch.randn(b, t, hq + 2 * hkv, d, device="cuda", dtype=dtype)
    q = qkv[:, :, :hq]
    k_cache = torch.randn(b, slots, hkv, d, device="cuda", dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    k, v = k_cache[:, :span], v_cache[:, :span]
    assert not q.is_contiguous() and not k.is_contiguous()
    lens = torch.tensor([span, 57, t], device="cuda", dtype=torch.int32)
    out = ops.attention(q, k, v, kv_lens=lens, backend="cuda")
    oracle = reference.attention(q.float(), k.float(), v.float(), True, lens, d ** -0.5)
    assert_matches(out, oracle, plain_attention(q, k, v, True, lens, d ** -0.5), f"strided attention {dtype}",
                   fp32_rtol=1e-4, fp32_atol=1e-5)
    assert out.is_contiguous()


@pytest.mark.parametrize("d", [32, 96, 256])
def test_other_head_dims_raise_for_cuda_and_fall_back_for_the_default(d):
    # The kernels cover head_dim 64 and 128: backend="cuda" says so; backend=None runs the next backend in
    # line (Triton, else the reference), warning once.
    q = torch.randn(2, 5, 8, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 40, 2, d, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ops.BackendUnavailableError, match=f"head_dim 64 or 128, not {d}"):
        ops.attention(q, k, k, backend="cuda")
    out = ops.attention(q, k, k)
    oracle = reference.attention(q.float(), k.float(), k.float(), True, None, d ** -0.5)
    assert_matches(out, oracle, plain_attention(q, k, k, True, None, d ** -0.5), f"fallback d={d}")


def test_out_of_range_kv_len_stops_with_a_device_assert(tmp_path):
    # More valid keys than keys given is checked on the device (no host sync): the process stops with a
    # device-side assert instead of returning NaN rows, so it runs in a child process.
    import subprocess
    import sys

    code = ("import torch, llama_fast; from llama_fast import ops\n"
            "q = torch.randn(2, 1, 4, 64, device='cuda', dtype=torch.half)\n"
            "k = torch.randn(2, 10, 4, 64, device='cuda', dtype=torch.half)\n"
            "ops.attention(q, k, k, kv_lens=torch.tensor([10, 11], device='cuda', dtype=torch.int32), backend='cuda')\n"
            "torch.cuda.synchronize()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "assert" in (r.stdout + r.stderr).lower()


def test_bad_inputs_name_the_problem():
    q = torch.randn(1, 2, 4, 64, device="cuda")
    k = torch.randn(1, 3, 2, 64, device="cuda")
    att = torch.ops.llama_fast.attention
    with pytest.raises(RuntimeError, match="head_dim must be 64 or 128"):
        att(q[..., :48].contiguous(), k[..., :48].contiguous(), k[..., :48].contiguous(), True, None, 1.0)
    with pytest.raises(RuntimeError, match="multiple of kv heads"):
        att(q[:, :, :3].contiguous(), k, k, True, None, 1.0)
    with pytest.raises(RuntimeError, match="kv_lens must be int32"):
        att(q, k, k, True, torch.ones(1, device="cuda", dtype=torch.long), 1.0)
    with pytest.raises(RuntimeError, match="kv_lens must be \\[1\\]"):
        att(q, k, k, True, torch.ones(2, device="cuda", dtype=torch.int32), 1.0)
    with pytest.raises(RuntimeError, match="v dtype"):
        att(q, k, k.half(), True, None, 1.0)
    with pytest.raises(RuntimeError, match="q must have contiguous heads"):
        att(q.transpose(1, 2), k, k, True, None, 1.0)
    with pytest.raises(RuntimeError, match="k must be a CUDA tensor"):
        att(q, k.cpu(), k, True, None, 1.0)
