"""CUDA kquant_linear (ggml K-quant / Q5_0 / Q5_1 blocks read as stored) against the reference: every block
type, decode-sized and larger batches, a fused weight of several types."""
import os
import sys

import pytest
import torch

from llama_fast import kquants, ops
from llama_fast.ops import reference

from cuda_testing import DTYPES, assert_matches, requires_cuda

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kquant_util import random_blocks  # noqa: E402

pytestmark = requires_cuda


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", kquants.TYPES)
@pytest.mark.parametrize("m", [1, 5, 20])
def test_kquant_linear_matches_reference(dtype, kind, m):
    k = 512 if kquants.BLOCKS[kind][0] == 256 else 160
    w = kquants.KQuantWeight.single(kind, random_blocks(kind, 67, k, seed=m), k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    bias = torch.randn(67).to(dtype) if m == 5 else None
    out = ops.kquant_linear(x.cuda(), w.to("cuda"), None if bias is None else bias.cuda(), backend="cuda")
    oracle = reference.kquant_linear(x.float(), w, None if bias is None else bias.float())
    plain = torch.nn.functional.linear(x.cuda(), w.dequantize(dtype).cuda(), None if bias is None else bias.cuda())
    assert_matches(out, oracle.cuda(), plain, f"kquant_linear {kind} m={m} {dtype}", fp32_rtol=1e-4, fp32_atol=1e-4)


def test_kquant_linear_mixed_segments():
    parts = [kquants.KQuantWeight.single(kind, random_blocks(kind, rows, 256, seed=rows), 256)
             for kind, rows in (("Q4_K", 16), ("Q6_K", 9), ("Q5_K", 3))]
    w = kquants.concat_rows(parts)
    x = torch.randn(2, 3, 256)
    out = ops.kquant_linear(x.cuda(), w.to("cuda"), backend="cuda")
    oracle = reference.kquant_linear(x, w)
    assert_matches(out, oracle.cuda(), torch.nn.functional.linear(x, w.dequantize()).cuda(), "mixed segments",
                   fp32_rtol=1e-4, fp32_atol=1e-4)
