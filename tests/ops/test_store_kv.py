import pytest
import torch

from llama_fast import ops
from llama_fast.ops import reference

from op_fixtures import backend, matches_reference  # noqa: F401  (pytest fixtures)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_store_kv_matches_reference(backend, dtype, slot_dtype):
    name, device = backend
    torch.manual_seed(0)
    b, s, hkv, d, t = 3, 83, 2, 64, 7
    kc, vc = torch.randn(b, s, hkv, d, dtype=dtype), torch.randn(b, s, hkv, d, dtype=dtype)
    k, v = torch.randn(b, t, hkv, d, dtype=dtype), torch.randn(b, t, hkv, d, dtype=dtype)
    slots = torch.stack([torch.arange(t), torch.arange(76, 83), torch.tensor([-1, -1, 0, 1, 2, 3, 4])]).to(slot_dtype)
    want_k, want_v = kc.clone(), vc.clone()
    reference.store_kv(want_k, want_v, k, v, slots)
    kd, vd = kc.to(device), vc.to(device)
    ops.store_kv(kd, vd, k.to(device), v.to(device), slots.to(device), backend=name)
    assert torch.equal(kd.cpu(), want_k) and torch.equal(vd.cpu(), want_v)


def test_store_kv_from_fused_qkv_views_cpu():
    b, t, hq, hkv, d = 2, 5, 4, 2, 8
    qkv = torch.randn(b, t, (hq + 2 * hkv) * d)
    k = qkv[..., hq * d: (hq + hkv) * d].view(b, t, hkv, d)
    v = qkv[..., (hq + hkv) * d:].view(b, t, hkv, d)
    kc, vc = torch.zeros(b, 16, hkv, d), torch.zeros(b, 16, hkv, d)
    slots = torch.arange(3, 3 + t).expand(b, t)
    ops.store_kv(kc, vc, k, v, slots, backend="cpu")
    assert torch.equal(kc[:, 3:8], k) and torch.equal(vc[:, 3:8], v) and kc[:, :3].abs().sum() == 0


def test_store_kv_bad_inputs_cpu():
    kc, vc = torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8)
    k = v = torch.randn(1, 2, 2, 8)
    with pytest.raises(RuntimeError, match="past the end of the cache"):
        ops.store_kv(kc, vc, k, v, torch.tensor([[3, 4]]), backend="cpu")
    with pytest.raises(RuntimeError, match="differs from the cache dtype"):   # the core op: one dtype
        torch.ops.llama_fast.store_kv_(kc, vc, k.bfloat16(), v.bfloat16(), torch.tensor([[0, 1]]))
    with pytest.raises(RuntimeError, match="slots must be int64 or int32"):
        ops.store_kv(kc, vc, k, v, torch.tensor([[0.0, 1.0]]), backend="cpu")
    with pytest.raises(RuntimeError, match="does not match the cache shape"):
        ops.store_kv(kc, vc, torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), torch.tensor([[0, 1]]), backend="cpu")
    with pytest.raises(RuntimeError, match="k_cache must be contiguous"):
        ops.store_kv(torch.zeros(1, 2, 4, 8).transpose(1, 2), vc, k, v, torch.tensor([[0, 1]]), backend="cpu")


def test_opcheck_store_kv():
    kc, vc = torch.zeros(2, 6, 2, 8), torch.zeros(2, 6, 2, 8)
    k, v = torch.randn(2, 3, 2, 8), torch.randn(2, 3, 2, 8)
    torch.library.opcheck(torch.ops.llama_fast.store_kv_.default, (kc, vc, k, v, torch.tensor([[0, 1, 2], [3, 4, -1]])))
