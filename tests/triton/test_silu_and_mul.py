import pytest
import torch
import torch.nn.functional as F

from llama_fast import kernels
from llama_fast.ops import reference

from _budget import assert_fp32_close, assert_within_budget


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])       # tl.dot: no bf16 in the interpreter
@pytest.mark.parametrize("m", [1, 83])                                  # decode and prefill tiles
def test_gate_up_silu_matches_linear_then_silu_and_mul(m, dtype):
    torch.manual_seed(m)
    i, k = 37, 96
    x = torch.randn(m, k).to(dtype)
    w = (torch.randn(2 * i, k) / k ** 0.5).to(dtype)
    out = kernels.gate_up_silu(x, w)
    oracle = reference.silu_and_mul(reference.linear(x.float(), w.float()))
    if dtype == torch.float32:
        assert_fp32_close(out, oracle)
    else:
        plain = F.silu(x @ w[:i].T) * (x @ w[i:].T)                       # the same math in fp16
        assert_within_budget(out, oracle, plain)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="must be even"):
        kernels.silu_and_mul(torch.randn(2, 7))
    with pytest.raises(ValueError, match=r"w_gate_up must be \[2I, K\]"):
        kernels.gate_up_silu(torch.randn(2, 8), torch.randn(6, 9))
