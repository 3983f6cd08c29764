import pytest
import torch
from tolerance import assert_fp32_close, assert_within_budget

from llama_fast import kernels
from llama_fast.ops import reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 2 * 7), (3, 5, 2 * 769)])
def test_silu_and_mul_matches_reference(shape, dtype):
    torch.manual_seed(0)
    gu = (3 * torch.randn(shape)).to(dtype)
    out = kernels.silu_and_mul(gu)
    if dtype == torch.float32:
        assert_fp32_close(out, reference.silu_and_mul(gu))
    else:
        assert_within_budget(out, reference.silu_and_mul(gu.float()), reference.silu_and_mul(gu))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="must be even"):
        kernels.silu_and_mul(torch.randn(2, 7))
