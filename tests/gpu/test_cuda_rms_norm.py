import pytest
import torch

from llama_fast import ops
from llama_fast.ops import reference

from cuda_testing import DTYPES, assert_matches, requires_cuda

pytestmark = requires_cuda


def plain_rms_norm(x, w, eps):  # PyTorch in the input dtype throughout
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 83), (3, 5, 576), (2, 769), (4, 4096), (1, 8192 + 8)])
def test_rms_norm(dtype, shape):
    torch.manual_seed(0)
    x = torch.randn(shape, device="cuda", dtype=dtype) * 3
    w = torch.randn(shape[-1], device="cuda", dtype=dtype)
    out = ops.rms_norm(x, w, 1e-6, backend="cuda")
    oracle = reference.rms_norm(x.float(), w.float(), 1e-6)
    assert_matches(out, oracle, plain_rms_norm(x, w, 1e-6), f"rms_norm {dtype} {shape}")
    if dtype != torch.float32:  # same roundings as the reference: at most one ulp apart
        ref = reference.rms_norm(x, w, 1e-6)
        torch.testing.assert_close(out, ref, rtol=2 ** -7, atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (7, 83), (5, 576), (3, 2048)])
def test_fused_add_rms_norm(dtype, shape):
    torch.manual_seed(1)
    x = torch.randn(shape, device="cuda", dtype=dtype)
    r = torch.randn(shape, device="cuda", dtype=dtype)
    w = torch.randn(shape[-1], device="cuda", dtype=dtype)
    x0, r0 = x.clone(), r.clone()
    out, new_r = ops.fused_add_rms_norm(x, r, w, 1e-5, backend="cuda")
    assert torch.equal(new_r, x + r)  # one rounding, like PyTorch
    oracle = reference.rms_norm((x + r).float(), w.float(), 1e-5)
    assert_matches(out, oracle, plain_rms_norm(x + r, w, 1e-5), f"fused_add_rms_norm {dtype} {shape}")
    assert torch.equal(x, x0) and torch.equal(r, r0)  # inputs untouched: the op returns new tensors


def test_unaligned_view_takes_the_scalar_path():
    x = torch.randn(3, 65, device="cuda", dtype=torch.float16)[:, 1:].contiguous()
    xs = torch.randn(3 * 64 + 1, device="cuda", dtype=torch.float16)[1:].view(3, 64)  # 2-byte offset
    w = torch.randn(64, device="cuda", dtype=torch.float16)
    for t in (x, xs):
        torch.testing.assert_close(ops.rms_norm(t, w, 1e-6, backend="cuda"), reference.rms_norm(t, w, 1e-6),
                                   rtol=2 ** -9, atol=1e-3)


def test_bad_inputs_name_the_problem():
    x = torch.randn(4, 64, device="cuda")
    with pytest.raises(RuntimeError, match="weight must be \\[64\\]"):
        torch.ops.llama_fast.rms_norm(x, torch.ones(32, device="cuda"), 1e-6)
    with pytest.raises(RuntimeError, match="weight dtype"):
        torch.ops.llama_fast.rms_norm(x, torch.ones(64, device="cuda", dtype=torch.half), 1e-6)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        torch.ops.llama_fast.rms_norm(x.t(), torch.ones(4, device="cuda"), 1e-6)
    with pytest.raises(RuntimeError, match="weight must be a CUDA tensor"):
        torch.ops.llama_fast.rms_norm(x, torch.ones(64), 1e-6)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        torch.ops.llama_fast.rms_norm(x.double(), torch.ones(64, device="cuda", dtype=torch.double), 1e-6)
    with pytest.raises(RuntimeError, match="residual shape"):
        torch.ops.llama_fast.fused_add_rms_norm(x, x[:2], torch.ones(64, device="cuda"), 1e-6)
