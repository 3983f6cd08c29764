import pytest
import torch
from tolerance import assert_fp32_close, assert_within_budget

from llama_fast import kernels
from llama_fast.ops import reference


@pytest.mark.parametrize("shape", [(1, 83), (2, 7, 769)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rms_norm_matches_reference(shape, dtype):
    torch.manual_seed(0)
    x = torch.randn(shape).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1])).to(dtype)
    out = kernels.rms_norm(x, w, 1e-5)
    if dtype == torch.float32:
        assert_fp32_close(out, reference.rms_norm(x, w, 1e-5))
    else:
        assert_within_budget(out, reference.rms_norm(x.float(), w.float(), 1e-5), reference.rms_norm(x, w, 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_add_rms_norm_matches_reference(dtype):
    torch.manual_seed(1)
    x, r = torch.randn(2, 5, 83).to(dtype), torch.randn(2, 5, 83).to(dtype)
    w = torch.randn(83).to(dtype)
    out, new_res = kernels.fused_add_rms_norm(x, r, w, 1e-6)
    ref_out, ref_res = reference.fused_add_rms_norm(x, r, w, 1e-6)
    if dtype == torch.bfloat16:
        # The interpreter rounds fp32 -> bf16 toward zero (a GPU rounds to nearest even): budget, not bits.
        assert_within_budget(new_res, x.float() + r.float(), ref_res)
    else:
        torch.testing.assert_close(new_res, ref_res, rtol=0, atol=0)      # one rounded add: bit-exact
    if dtype == torch.float32:
        assert_fp32_close(out, ref_out)
    else:
        assert_within_budget(out, reference.rms_norm(ref_res.float(), w.float(), 1e-6), ref_out)
    assert new_res.data_ptr() not in (x.data_ptr(), r.data_ptr())    # out of place, as the reference


def test_strided_rows_are_read_in_place():
    x = torch.randn(4, 2 * 83)[:, :83]                   # rows 166 apart, last dim contiguous
    w = torch.randn(83)
    assert_fp32_close(kernels.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="weight must have shape"):
        kernels.rms_norm(torch.randn(3, 8), torch.ones(7), 1e-6)
    with pytest.raises(TypeError, match="x must be float32"):
        kernels.rms_norm(torch.ones(3, 8, dtype=torch.int32), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="contiguous in its last dimension"):
        kernels.rms_norm(torch.randn(8, 3).t(), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="residual must match x"):
        kernels.fused_add_rms_norm(torch.randn(3, 8), torch.randn(2, 8), torch.ones(8), 1e-6)
