import pytest
import torch

from llama_fast import ops
from llama_fast.ops import reference

from op_fixtures import backend, matches_reference  # noqa: F401  (pytest fixtures)


@pytest.mark.parametrize("shape", [(1, 2), (7, 166), (2, 3, 1538), (83, 3072)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_matches_reference(backend, shape, dtype, matches_reference):
    name, device = backend
    torch.manual_seed(0)
    gate_up = torch.randn(shape, dtype=dtype) * 4
    out = ops.silu_and_mul(gate_up.to(device), backend=name)
    assert out.shape == shape[:-1] + (shape[-1] // 2,) and out.dtype == dtype
    gate, up = gate_up.chunk(2, dim=-1)
    # the plain PyTorch computation in the dtype, as transformers' MLP does it
    matches_reference(out, reference.silu_and_mul(gate_up.float()), torch.nn.functional.silu(gate) * up)


def test_silu_and_mul_extremes_cpu():
    g = torch.tensor([[-100.0, -20.0, 0.0, 20.0, 100.0, 1e-3, -1e-3, 3.0]])
    gate_up = torch.cat([g, torch.ones_like(g)], dim=-1)
    torch.testing.assert_close(ops.silu_and_mul(gate_up, backend="cpu"), reference.silu_and_mul(gate_up),
                               rtol=1e-6, atol=1e-30)


def test_silu_and_mul_bad_inputs_cpu():
    with pytest.raises(RuntimeError, match="must be even"):
        ops.silu_and_mul(torch.randn(3, 5), backend="cpu")
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.silu_and_mul(torch.randn(6, 4).t(), backend="cpu")
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.silu_and_mul(torch.randn(3, 4).half(), backend="cpu")


def test_opcheck_silu_and_mul():
    torch.library.opcheck(torch.ops.llama_fast.silu_and_mul.default, (torch.randn(3, 38),))
