import pytest
import torch

from llama_fast import ops
from llama_fast.ops import reference

from op_fixtures import backend, matches_reference  # noqa: F401  (pytest fixtures)

SHAPES = [(1, 1), (7, 83), (3, 5, 576), (2, 769), (4, 4096)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_reference(backend, shape, dtype, matches_reference):
    name, device = backend
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype) * 3
    w = torch.randn(shape[-1], dtype=dtype)
    out = ops.rms_norm(x.to(device), w.to(device), 1e-6, backend=name)
    assert out.dtype == dtype
    matches_reference(out, reference.rms_norm(x.float(), w.float(), 1e-6), reference.rms_norm(x, w, 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_add_rms_norm_matches_reference(backend, dtype, matches_reference):
    name, device = backend
    torch.manual_seed(1)
    for shape in SHAPES:
        x, r = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
        w = torch.randn(shape[-1], dtype=dtype)
        y, new_r = ops.fused_add_rms_norm(x.to(device), r.to(device), w.to(device), 1e-5, backend=name)
        # the residual sum is rounded to the dtype, as in transformers: compare it exactly
        assert torch.equal(new_r.cpu(), x + r)
        matches_reference(y, reference.rms_norm((x + r).float(), w.float(), 1e-5),
                                 reference.rms_norm(x + r, w, 1e-5))


def test_rms_norm_bad_inputs_cpu():
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="weight must be \\[8\\]"):
        ops.rms_norm(x, torch.ones(7), backend="cpu")
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.rms_norm(x.double(), torch.ones(8, dtype=torch.double), backend="cpu")
    with pytest.raises(RuntimeError, match="weight dtype"):
        ops.rms_norm(x, torch.ones(8, dtype=torch.bfloat16), backend="cpu")
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.rms_norm(torch.randn(8, 4).t(), torch.ones(8), backend="cpu")
    with pytest.raises(RuntimeError, match="residual shape"):
        ops.fused_add_rms_norm(x, torch.randn(4, 9), torch.ones(8), backend="cpu")


def test_opcheck_norms():
    x, r, w = torch.randn(3, 83), torch.randn(3, 83), torch.randn(83)
    torch.library.opcheck(torch.ops.llama_fast.rms_norm.default, (x, w, 1e-6))
    torch.library.opcheck(torch.ops.llama_fast.fused_add_rms_norm.default, (x, r, w, 1e-6))
