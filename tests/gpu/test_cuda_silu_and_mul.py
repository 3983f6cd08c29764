import pytest
import torch
import torch.nn.functional as F

from llama_fast import ops
from llama_fast.ops import reference

from cuda_testing import DTYPES, assert_matches, requires_cuda

pytestmark = requires_cuda


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2), (7, 166), (3, 5, 3072), (83, 1538), (2, 11008 * 2)])
def test_silu_and_mul(dtype, shape):
    torch.manual_seed(4)
    gu = torch.randn(shape, device="cuda", dtype=dtype) * 4
    out = ops.silu_and_mul(gu, backend="cuda")
    gate, up = gu.chunk(2, -1)
    assert_matches(out, reference.silu_and_mul(gu.float()), F.silu(gate) * up, f"silu_and_mul {dtype} {shape}",
                   fp32_rtol=2e-6, fp32_atol=1e-6)


def test_many_rows_are_launched_in_slices():
    gu = torch.randn(70000, 16, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(ops.silu_and_mul(gu, backend="cuda"), reference.silu_and_mul(gu), rtol=2 ** -7,
                               atol=1e-2)


def test_bad_inputs_name_the_problem():
    with pytest.raises(RuntimeError, match="must be even"):
        torch.ops.llama_fast.silu_and_mul(torch.randn(3, 5, device="cuda"))
    with pytest.raises(RuntimeError, match="must be contiguous"):
        torch.ops.llama_fast.silu_and_mul(torch.randn(8, 4, device="cuda").t())
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        torch.ops.llama_fast.silu_and_mul(torch.ones(2, 4, device="cuda", dtype=torch.int32))
