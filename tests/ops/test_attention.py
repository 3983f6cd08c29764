import math

import pytest
import torch

from llama_fast import ops
from llama_fast.ops import reference

from op_fixtures import backend, matches_reference  # noqa: F401  (pytest fixtures)

# (B, Tq, Tk, Hq, Hkv, D, kv_lens): prefill, decode against a longer cache (split-K), GQA 1 / 4 / 8 (and
# SmolLM2's 3), head_dim 64 and 128, per-sequence lengths (left padding / ragged caches), Tq > kv_len.
CASES = [
    (1, 7, 7, 4, 4, 64, None),
    (2, 83, 83, 8, 2, 128, None),
    (2, 1, 769, 9, 3, 64, [769, 300]),
    (1, 1, 1, 8, 1, 64, None),
    (3, 1, 600, 8, 1, 128, [1, 599, 600]),
    (2, 5, 83, 16, 4, 64, [7, 83]),
    (2, 6, 40, 4, 1, 64, [3, 40]),
    # decode over SmolLM2's short contexts: split-K from 128 keys, and a ragged batch
    (1, 1, 150, 9, 3, 64, None),
    (2, 1, 200, 9, 3, 64, [200, 131]),
    # long prefills: bf16 with every key valid goes to ATen's flash kernel, the ragged one stays ours
    (1, 160, 160, 8, 2, 64, None),
    (2, 160, 160, 4, 1, 128, [160, 100]),
]


def _inputs(b, tq, tk, hq, hkv, d, lens, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, tq, hq, d, generator=g).to(dtype)
    k = torch.randn(b, tk, hkv, d, generator=g).to(dtype)
    v = torch.randn(b, tk, hkv, d, generator=g).to(dtype)
    kv_lens = None if lens is None else torch.tensor(lens, dtype=torch.int32)
    return q, k, v, kv_lens


def _case_id(c) -> str:
    return "B{}_Tq{}_Tk{}_H{}/{}_D{}_{}".format(*c[:6], "lens" if c[6] else "full")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_reference(backend, case, dtype, causal, matches_reference):
    name, device = backend
    q, k, v, kv_lens = _inputs(*case, dtype)
    want = reference.attention(q.float(), k.float(), v.float(), causal, kv_lens)
    # the plain PyTorch computation in the dtype: scaled_dot_product_attention with the contract's mask
    mask = reference.attention_mask(q.shape[0], q.shape[1], k.shape[1], causal, kv_lens, q.device)
    group = q.shape[2] // k.shape[2]
    low = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(group, 1), v.transpose(1, 2).repeat_interleave(group, 1),
        attn_mask=mask).transpose(1, 2)
    low = torch.where(mask.any(-1).transpose(1, 2)[..., None], low, torch.zeros_like(low))
    out = ops.attention(q.to(device), k.to(device), v.to(device), causal,
                        None if kv_lens is None else kv_lens.to(device), backend=name)
    assert out.dtype == dtype and out.shape == q.shape
    matches_reference(out, want, low)


def test_attention_rows_without_keys_are_zero_cpu():
    q, k, v, _ = _inputs(2, 4, 8, 4, 2, 64, None, torch.float32)
    out = ops.attention(q, k, v, True, torch.tensor([2, 0], dtype=torch.int32), backend="cpu")
    assert out[0, :2].abs().sum() == 0 and out[1].abs().sum() == 0 and out[0, 2:].abs().sum() > 0


def test_attention_custom_scale_and_strided_q_cpu():
    b, t, hq, hkv, d = 1, 9, 4, 2, 64
    qkv = torch.randn(b, t, (hq + 2 * hkv) * d)
    q = qkv[..., : hq * d].view(b, t, hq, d)
    k = qkv[..., hq * d: (hq + hkv) * d].view(b, t, hkv, d)
    v = qkv[..., (hq + hkv) * d:].view(b, t, hkv, d)
    out = ops.attention(q, k, v, True, None, scale=0.3, backend="cpu")
    torch.testing.assert_close(out, reference.attention(q, k, v, True, None, 0.3), rtol=1e-5, atol=1e-5)
    assert math.isclose(ops.attention(q, k, v, backend="cpu").sum().item(),
                        reference.attention(q, k, v).sum().item(), rel_tol=1e-4, abs_tol=1e-3)


def test_attention_bad_inputs_cpu():
    q, k, v, _ = _inputs(2, 3, 5, 4, 2, 8, None, torch.float32)
    with pytest.raises(RuntimeError, match="multiple of the number of kv heads"):
        ops.attention(torch.randn(2, 3, 3, 8), k, v, backend="cpu")
    with pytest.raises(RuntimeError, match="kv_lens must lie in \\[0, 5\\]"):
        ops.attention(q, k, v, True, torch.tensor([5, 6], dtype=torch.int32), backend="cpu")
    with pytest.raises(RuntimeError, match="kv_lens must be \\[B\\]"):
        ops.attention(q, k, v, True, torch.tensor([5], dtype=torch.int32), backend="cpu")
    with pytest.raises(RuntimeError, match="kv_lens must be int32"):
        ops.attention(q, k, v, True, torch.tensor([5.0, 5.0]), backend="cpu")
    with pytest.raises(RuntimeError, match="v shape"):
        ops.attention(q, k, v[:, :4], backend="cpu")
    with pytest.raises(RuntimeError, match="v dtype"):
        ops.attention(q, k, v.bfloat16(), backend="cpu")
    with pytest.raises(RuntimeError, match="contiguous last dimension"):
        ops.attention(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, backend="cpu")
    with pytest.raises(RuntimeError, match="4-D"):
        ops.attention(q[0], k, v, backend="cpu")


def test_opcheck_attention():
    q, k, v, _ = _inputs(2, 3, 5, 4, 2, 8, None, torch.float32)
    torch.library.opcheck(torch.ops.llama_fast.attention.default, (q, k, v, True, None, 0.35))
    torch.library.opcheck(torch.ops.llama_fast.attention.default,
                          (q, k, v, True, torch.tensor([4, 5], dtype=torch.int32), 0.35))
