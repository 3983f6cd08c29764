import pytest
import torch

from llama_fast import ops
from llama_fast.ops import reference

from cuda_testing import DTYPES, assert_matches, requires_cuda

pytestmark = requires_cuda


def cache(max_pos, d, theta=10000.0):
    inv = 1.0 / theta ** (torch.arange(0, d, 2, device="cuda", dtype=torch.float32) / d)
    ang = torch.arange(max_pos, device="cuda", dtype=torch.float32)[:, None] * inv[None]
    return ang.cos(), ang.sin()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,t,hq,hkv,d", [(1, 1, 4, 4, 64), (2, 7, 8, 2, 64), (3, 83, 16, 2, 128), (1, 5, 9, 3, 64)])
@pytest.mark.parametrize("pos_dtype", [torch.int64, torch.int32])
def test_rotary(dtype, b, t, hq, hkv, d, pos_dtype):
    torch.manual_seed(2)
    cos, sin = cache(4096, d)
    q = torch.randn(b, t, hq, d, device="cuda", dtype=dtype)
    k = torch.randn(b, t, hkv, d, device="cuda", dtype=dtype)
    pos = torch.randint(0, 4096, (b, t), device="cuda", dtype=pos_dtype)
    q_ref, k_ref = reference.rotary(q.float().clone(), k.float().clone(), pos, cos, sin)
    c, s = cos[pos.long()].unsqueeze(2).to(dtype), sin[pos.long()].unsqueeze(2).to(dtype)
    plain = [torch.cat((x[..., : d // 2] * c - x[..., d // 2:] * s, x[..., d // 2:] * c + x[..., : d // 2] * s), -1)
             for x in (q, k)]
    q2, k2 = ops.rotary(q, k, pos, cos, sin, backend="cuda")
    assert q2.data_ptr() == q.data_ptr() and k2.data_ptr() == k.data_ptr()  # in place
    assert_matches(q, q_ref, plain[0], "rotary q")
    assert_matches(k, k_ref, plain[1], "rotary k")


def test_rotary_on_views_of_a_fused_qkv():
    torch.manual_seed(3)
    b, t, hq, hkv, d = 2, 9, 8, 2, 64
    cos, sin = cache(64, d)
    qkv = torch.randn(b, t, (hq + 2 * hkv) * d, device="cuda", dtype=torch.bfloat16)
    expected = qkv.clone()
    pos = torch.arange(t, device="cuda").expand(b, t)
    q, k, _ = qkv.split([hq * d, hkv * d, hkv * d], -1)
    eq, ek, ev = expected.split([hq * d, hkv * d, hkv * d], -1)
    rq, rk = reference.rotary(eq.reshape(b, t, hq, d).clone(), ek.reshape(b, t, hkv, d).clone(), pos, cos, sin)
    ops.rotary(q.view(b, t, hq, d), k.view(b, t, hkv, d), pos, cos, sin, backend="cuda")
    torch.testing.assert_close(q.reshape(b, t, hq, d), rq, rtol=2 ** -7, atol=1e-2)
    torch.testing.assert_close(k.reshape(b, t, hkv, d), rk, rtol=2 ** -7, atol=1e-2)
    assert torch.equal(qkv[..., (hq + hkv) * d:], ev)  # v untouched


def test_out_of_range_position_poisons_instead_of_reading_out_of_bounds():
    cos, sin = cache(16, 64)
    q = torch.randn(1, 2, 2, 64, device="cuda")
    k = torch.randn(1, 2, 1, 64, device="cuda")
    ops.rotary(q, k, torch.tensor([[3, 16]], device="cuda"), cos, sin, backend="cuda")
    assert torch.isfinite(q[0, 0]).all() and torch.isnan(q[0, 1]).all() and torch.isnan(k[0, 1]).all()


def test_bad_inputs_name_the_problem():
    cos, sin = cache(16, 64)
    q = torch.randn(1, 2, 2, 64, device="cuda")
    k = torch.randn(1, 2, 1, 64, device="cuda")
    pos = torch.zeros(1, 2, dtype=torch.long, device="cuda")
    with pytest.raises(RuntimeError, match="cos must be float32"):
        torch.ops.llama_fast.rotary_(q, k, pos, cos.half(), sin)
    with pytest.raises(RuntimeError, match="positions must be \\[1, 2\\]"):
        torch.ops.llama_fast.rotary_(q, k, pos[:, :1], cos, sin)
    with pytest.raises(RuntimeError, match="positions must be int64 or int32"):
        torch.ops.llama_fast.rotary_(q, k, pos.float(), cos, sin)
    with pytest.raises(RuntimeError, match="cos must be \\[max_pos, 32\\]"):
        torch.ops.llama_fast.rotary_(q, k, pos, cos[:, :16].contiguous(), sin)
    with pytest.raises(RuntimeError, match="k dtype"):
        torch.ops.llama_fast.rotary_(q, k.half(), pos, cos, sin)
