"""The fakes of the Triton ops (llama_fast_triton::*) agree with the kernels (tests/fake_contract.py)."""
import pytest
import torch
from fake_contract import check_fakes

import llama_fast.kernels  # noqa: F401  (registers the llama_fast_triton ops)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fake_matches_triton_kernels(dtype):
    check_fakes(torch.ops.llama_fast_triton, dtype)


def test_kernels_reject_mixed_dtypes():
    """The contract the fakes encode: the norm weight has the activations' dtype (only the reference promotes)."""
    with pytest.raises(TypeError, match="dtype"):
        torch.ops.llama_fast_triton.rms_norm(torch.randn(2, 8, dtype=torch.float16), torch.ones(8), 1e-6)
