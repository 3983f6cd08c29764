"""CUDA quant_linear (int4 / int8; GEMV for decode, tensor-core GEMM for prefill) against the reference."""
import pytest
import torch

from llama_fast import ops, quant
from llama_fast.ops import reference

from cuda_testing import DTYPES, assert_matches, requires_cuda

pytestmark = requires_cuda


def make(n, k, bits, group, dtype, seed=0, symmetric=False):
    torch.manual_seed(seed)
    w = torch.randn(n, k) * 0.05
    return quant.quantize(w, bits=bits, group_size=group, symmetric=symmetric, scale_dtype=dtype).to("cuda")


def check(m_shape, n, k, bits, group, dtype, bias=False, symmetric=False):
    qw = make(n, k, bits, group, dtype, symmetric=symmetric)
    x = torch.randn(*m_shape, k, device="cuda", dtype=dtype)
    b = torch.randn(n, device="cuda", dtype=dtype) if bias else None
    out = ops.quant_linear(x, qw, b, backend="cuda")
    oracle = reference.quant_linear(x.float(), qw, None if b is None else b.float())
    plain = torch.nn.functional.linear(x, qw.dequantize(dtype), b)
    assert_matches(out, oracle, plain, f"quant_linear int{bits} g{group} x{tuple(m_shape)} n={n} k={k} {dtype}",
                   fp32_rtol=1e-4, fp32_atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [1, 2, 3, 7])
# K % 32 == 0 takes 32 int4 codes per lane and load; (64, 112, 16) the 16-code step.
@pytest.mark.parametrize("n,k,group", [(83, 576, 64), (1536, 576, 32), (576, 1536, 128), (7, 4096, 4096),
                                       (64, 112, 16)])
def test_gemv_decode(dtype, bits, m, n, k, group):
    check((m,), n, k, bits, group, dtype, bias=(m == 3))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m_shape", [(9,), (2, 83), (769,)])
@pytest.mark.parametrize("n,k,group", [(83, 576, 64), (1536, 576, 32), (256, 1024, 128)])
def test_gemm_prefill(dtype, bits, m_shape, n, k, group):
    check(m_shape, n, k, bits, group, dtype, bias=(n == 83))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,n,k,group", [(4, 13, 18, 6), (8, 5, 7, 7), (4, 9, 40, 8)])
@pytest.mark.parametrize("m", [1, 11])
def test_odd_shapes_take_the_general_path(dtype, bits, n, k, group, m):
    check((m,), n, k, bits, group, dtype)


def test_symmetric_int4_gguf_q4_0_style():
    check((5,), 64, 256, 4, 32, torch.float16, symmetric=True)


def test_scales_in_another_dtype_are_converted():
    qw = make(64, 256, 4, 32, torch.float16)
    x = torch.randn(3, 256, device="cuda")
    torch.testing.assert_close(ops.quant_linear(x, qw, backend="cuda"), reference.quant_linear(x, qw),
                               rtol=1e-4, atol=1e-4)


def test_bad_inputs_name_the_problem():
    qw = make(16, 64, 4, 32, torch.float32)
    x = torch.randn(2, 64, device="cuda")
    ql = torch.ops.llama_fast.quant_linear
    with pytest.raises(RuntimeError, match="bits must be 4 or 8"):
        ql(x, qw.qweight, qw.scale, qw.offset, 3, 32, None)
    with pytest.raises(RuntimeError, match="int4 qweight must be \\[N, 33\\]"):
        ql(torch.randn(2, 66, device="cuda"), qw.qweight, qw.scale, qw.offset, 4, 32, None)
    with pytest.raises(RuntimeError, match="does not divide"):
        ql(x, qw.qweight, qw.scale, qw.offset, 4, 48, None)
    with pytest.raises(RuntimeError, match="scale must be \\[16, 2\\]"):
        ql(x, qw.qweight, qw.scale[:, :1].contiguous(), qw.offset, 4, 32, None)
    with pytest.raises(RuntimeError, match="int8 qweight must be int8"):
        ql(x, qw.qweight, qw.scale, None, 8, 32, None)
    with pytest.raises(RuntimeError, match="bias must be \\[16\\]"):
        ql(x, qw.qweight, qw.scale, qw.offset, 4, 32, torch.zeros(15, device="cuda"))
    with pytest.raises(RuntimeError, match="scale dtype"):
        ql(x, qw.qweight, qw.scale.half(), qw.offset, 4, 32, None)
