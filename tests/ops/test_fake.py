"""The fakes of the C++ ops (llama_fast::*) agree with the CPU kernels (tests/fake_contract.py)."""
import pytest
import torch
from fake_contract import check_fakes

from llama_fast import _native  # noqa: E402  (loads the extension and registers the fakes)

pytestmark = pytest.mark.skipif(_native.extension() is None, reason=str(_native.missing_reason()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_matches_cpu_kernels(dtype):
    check_fakes(torch.ops.llama_fast, dtype)


def test_kernels_reject_mixed_dtypes():
    """The contract the fakes encode: the norm weight has the activations' dtype (only the reference promotes)."""
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.llama_fast.rms_norm(torch.randn(2, 8, dtype=torch.bfloat16), torch.ones(8), 1e-6)
