import pytest
import torch

from llama_fast import ops
from llama_fast.ops import reference

from cuda_testing import DTYPES, requires_cuda

pytestmark = requires_cuda


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("hkv,d", [(2, 64), (3, 128), (1, 7)])
def test_store_kv_matches_reference(dtype, slot_dtype, hkv, d):
    torch.manual_seed(5)
    b, t, s = 3, 5, 40
    kc = torch.randn(b, s, hkv, d, device="cuda", dtype=dtype)
    vc = torch.randn_like(kc)
    k = torch.randn(b, t, hkv, d, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    slots = torch.stack([torch.randperm(s, device="cuda")[:t] for _ in range(b)]).to(slot_dtype)
    slots[0, :2] = -1  # left padding: skipped
    kc_ref, vc_ref = kc.clone(), vc.clone()
    reference.store_kv(kc_ref, vc_ref, k, v, slots)
    ops.store_kv(kc, vc, k, v, slots, backend="cuda")
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)


def test_non_contiguous_k_from_a_fused_projection():
    kv = torch.randn(2, 3, 2 * 2 * 64, device="cuda", dtype=torch.float16)
    k, v = (t.view(2, 3, 2, 64) for t in kv.chunk(2, -1))
    kc = torch.zeros(2, 8, 2, 64, device="cuda", dtype=torch.float16)
    vc = torch.zeros_like(kc)
    slots = torch.tensor([[0, 1, 2], [5, 6, 7]], device="cuda")
    ops.store_kv(kc, vc, k, v, slots, backend="cuda")
    assert torch.equal(kc[0, :3], k[0]) and torch.equal(vc[1, 5:], v[1])


def test_bad_inputs_name_the_problem():
    kc = torch.zeros(2, 8, 2, 64, device="cuda")
    k = torch.zeros(2, 3, 2, 64, device="cuda")
    slots = torch.zeros(2, 3, dtype=torch.long, device="cuda")
    with pytest.raises(RuntimeError, match="v_cache dtype"):
        torch.ops.llama_fast.store_kv_(kc, kc.half(), k, k, slots)
    with pytest.raises(RuntimeError, match="does not match k"):
        torch.ops.llama_fast.store_kv_(kc, kc, k[:, :, :1].contiguous(), k[:, :, :1].contiguous(), slots)
    with pytest.raises(RuntimeError, match="slots must be \\[2, 3\\]"):
        torch.ops.llama_fast.store_kv_(kc, kc.clone(), k, k, slots[:, :2].contiguous())
    with pytest.raises(RuntimeError, match="slots must be a CUDA tensor"):
        torch.ops.llama_fast.store_kv_(kc, kc.clone(), k, k, slots.cpu())
