import pytest
import torch

from llama_fast import ops
from llama_fast.ops import reference

from op_fixtures import backend, matches_reference  # noqa: F401  (pytest fixtures)


def _tables(max_pos, dim, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    ang = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None, :]
    return ang.cos().float(), ang.sin().float()


@pytest.mark.parametrize("b,t,hq,hkv,d", [(1, 1, 9, 3, 64), (2, 7, 8, 1, 128), (3, 83, 4, 4, 64), (1, 5, 2, 2, 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_matches_reference(backend, b, t, hq, hkv, d, dtype, matches_reference):
    name, device = backend
    torch.manual_seed(0)
    q, k = torch.randn(b, t, hq, d, dtype=dtype), torch.randn(b, t, hkv, d, dtype=dtype)
    pos = torch.randint(0, 1000, (b, t))
    cos, sin = _tables(1000, d)
    want_q, want_k = reference.rotary(q.float().clone(), k.float().clone(), pos, cos, sin)
    low_q, low_k = reference.rotary(q.clone(), k.clone(), pos, cos, sin)
    qd, kd = q.to(device), k.to(device)
    out_q, out_k = ops.rotary(qd, kd, pos.to(device).int() if b == 2 else pos.to(device), cos.to(device),
                              sin.to(device), backend=name)
    assert out_q.data_ptr() == qd.data_ptr() and out_k.data_ptr() == kd.data_ptr()  # in place
    matches_reference(qd, want_q, low_q)
    matches_reference(kd, want_k, low_k)


def test_rotary_on_views_of_a_fused_qkv_cpu():
    """q and k may be strided views into the fused QKV projection output (last dim contiguous)."""
    torch.manual_seed(1)
    b, t, hq, hkv, d = 2, 7, 8, 2, 64
    qkv = torch.randn(b, t, (hq + 2 * hkv) * d)
    q = qkv[..., : hq * d].view(b, t, hq, d)
    k = qkv[..., hq * d: (hq + hkv) * d].view(b, t, hkv, d)
    pos = torch.arange(t).expand(b, t)
    cos, sin = _tables(64, d)
    want_q, want_k = reference.rotary(q.clone(), k.clone(), pos, cos, sin)
    v_before = qkv[..., (hq + hkv) * d:].clone()
    ops.rotary(q, k, pos, cos, sin, backend="cpu")
    torch.testing.assert_close(q, want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, want_k, rtol=1e-5, atol=1e-5)
    assert torch.equal(qkv[..., (hq + hkv) * d:], v_before)


def test_rotary_bad_inputs_cpu():
    q, k = torch.randn(1, 3, 4, 8), torch.randn(1, 3, 2, 8)
    cos, sin = _tables(16, 8)
    pos = torch.arange(3)[None]
    with pytest.raises(RuntimeError, match="positions must lie in \\[0, 16\\)"):
        ops.rotary(q, k, pos + 14, cos, sin, backend="cpu")
    with pytest.raises(RuntimeError, match="positions must be \\[B, T\\]"):
        ops.rotary(q, k, torch.arange(3), cos, sin, backend="cpu")
    with pytest.raises(RuntimeError, match="cos/sin must be float32"):
        ops.rotary(q, k, pos, cos.double(), sin.double(), backend="cpu")
    with pytest.raises(RuntimeError, match="cos/sin must be \\[max_pos, 4\\]"):
        ops.rotary(q, k, pos, cos[:, :3], sin[:, :3], backend="cpu")
    with pytest.raises(RuntimeError, match="contiguous last dimension"):
        ops.rotary(torch.randn(1, 3, 8, 4).transpose(2, 3), k, pos, cos, sin, backend="cpu")
    with pytest.raises(RuntimeError, match="k dtype"):
        ops.rotary(q, k.bfloat16(), pos, cos, sin, backend="cpu")
    with pytest.raises(RuntimeError, match="4-D"):
        ops.rotary(q[0], k[0], pos, cos, sin, backend="cpu")


def test_opcheck_rotary():
    q, k = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 2, 8)
    cos, sin = _tables(16, 8)
    torch.library.opcheck(torch.ops.llama_fast.rotary_.default, (q, k, torch.arange(3).expand(2, 3), cos, sin))
