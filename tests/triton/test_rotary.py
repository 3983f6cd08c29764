import pytest
import torch
from tolerance import assert_within_budget

from llama_fast import kernels
from llama_fast.ops import reference


def _tables(max_pos, half, theta=10000.0):
    inv_freq = 1.0 / theta ** (torch.arange(half, dtype=torch.float32) / half)
    angles = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d", [(3, 1, 64), (8, 8, 128)])
def test_rotary_in_place_matches_reference(hq, hkv, d, dtype):
    torch.manual_seed(0)
    b, t = 2, 7
    qkv = torch.randn(b, t, hq + 2 * hkv, d).to(dtype)            # q and k as strided views of fused QKV
    q, k = qkv[:, :, :hq], qkv[:, :, hq:hq + hkv]
    v_before = qkv[:, :, hq + hkv:].clone()
    positions = torch.randint(0, 50, (b, t))
    cos, sin = _tables(50, d // 2)
    q_ref, k_ref = reference.rotary(q.clone(), k.clone(), positions, cos, sin)
    q_fp32, k_fp32 = reference.rotary(q.float().clone(), k.float().clone(), positions, cos, sin)
    q_out, k_out = kernels.rotary(q, k, positions, cos, sin)
    assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()     # in place
    assert qkv[:, :, hq + hkv:].equal(v_before)                                        # v untouched
    if dtype == torch.float32:
        torch.testing.assert_close(q, q_ref, rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(k, k_ref, rtol=2e-6, atol=2e-6)
    else:
        assert_within_budget(q, q_fp32, q_ref)
        assert_within_budget(k, k_fp32, k_ref)


def test_bad_input_is_named():
    cos, sin = _tables(8, 4)
    q, k = torch.randn(1, 2, 2, 8), torch.randn(1, 2, 1, 8)
    with pytest.raises(IndexError, match=r"positions must lie in \[0, 8\)"):
        kernels.rotary(q, k, torch.tensor([[0, 8]]), cos, sin)
    with pytest.raises(TypeError, match="cos must be float32"):
        kernels.rotary(q, k, torch.tensor([[0, 1]]), cos.half(), sin)
    with pytest.raises(ValueError, match="positions must be"):
        kernels.rotary(q, k, torch.tensor([0, 1]), cos, sin)
