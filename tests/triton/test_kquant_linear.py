"""The Triton kquant_linear (ggml K-quant / Q5_0 / Q5_1 blocks decoded in the kernel) against the fp64 product
with the exactly dequantized weight (llama_fast.kquants), on every block type, decode and prefill tilings."""
import pytest
import torch
from kquant_util import random_blocks
from tolerance import assert_fp32_close, assert_within_budget

from llama_fast import kquants, ops
from llama_fast.kernels import kquant_linear


@pytest.mark.parametrize("kind", kquants.TYPES)
@pytest.mark.parametrize("m", [3, 20])
def test_kquant_linear_fp32(kind, m):
    k = 512 if kquants.BLOCKS[kind][0] == 256 else 96
    w = kquants.KQuantWeight.single(kind, random_blocks(kind, 37, k, seed=m), k)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g)
    bias = torch.randn(37, generator=g) if m == 3 else None
    out = ops.kquant_linear(x, w, bias, backend="triton")
    want = x.double() @ w.dequantize(torch.float64).t() + (0 if bias is None else bias.double())
    assert_fp32_close(out, want.float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kquant_linear_half_and_mixed_segments(dtype):
    parts = [kquants.KQuantWeight.single(kind, random_blocks(kind, rows, 256, seed=rows), 256)
             for kind, rows in (("Q4_K", 16), ("Q6_K", 9), ("Q5_K", 3))]
    w = kquants.concat_rows(parts)
    x = torch.randn(2, 2, 256, generator=torch.Generator().manual_seed(0)).to(dtype)
    out = kquant_linear(x, w)
    assert out.dtype == dtype and out.shape == (2, 2, 28)
    want = x.double() @ w.dequantize(torch.float64).t()
    assert_within_budget(out, want, torch.nn.functional.linear(x, w.dequantize(dtype)))
