import pytest
import torch
from tolerance import assert_fp32_close, assert_within_budget

from llama_fast import kernels, quant
from llama_fast.ops import reference

# (bits, group_size, symmetric): g = 32 is smaller than the K tile (scales gathered per element), g = 64 /
# per channel hold a K tile in one group (scaled after the dot in the GEMV), g = 3 splits bytes across
# groups; int4 asymmetric (offsets = mins) and symmetric (Q4_0 style offsets).
FORMATS = [(4, 32, False), (4, 64, True), (4, 3, False), (8, 64, False), (8, -1, False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])      # tl.dot: no bf16 in the interpreter
@pytest.mark.parametrize("m", [1, 5, 83])                               # GEMV (<= 8 rows) and GEMM tiles
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: "int{}_g{}{}".format(f[0], f[1], "_sym" if f[2] else ""))
def test_quant_linear_matches_reference(fmt, m, dtype):
    bits, group_size, symmetric = fmt
    torch.manual_seed(m)
    n, k = 83, 192
    w = torch.randn(n, k) / k ** 0.5
    qw = quant.quantize(w.to(dtype), bits=bits, group_size=group_size, symmetric=symmetric)
    x = torch.randn(2, m, k).to(dtype) if m == 5 else torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype) if m == 5 else None
    out = kernels.quant_linear(x, qw, bias)
    assert out.shape == x.shape[:-1] + (n,) and out.dtype == dtype
    if dtype == torch.float32:
        assert_fp32_close(out, reference.quant_linear(x, qw, bias))
    else:
        oracle = reference.quant_linear(x.float(), qw, None if bias is None else bias.float())
        plain = x @ qw.dequantize(dtype).T + (0 if bias is None else bias)    # the same math in fp16
        assert_within_budget(out, oracle, plain)


def test_bad_input_is_named():
    qw = quant.quantize(torch.randn(8, 64), bits=4, group_size=32)
    with pytest.raises(ValueError, match="does not match the weight's K = 64"):
        kernels.quant_linear(torch.randn(2, 32), qw)
    # A weight with the wrong code dtype cannot reach the kernel: QuantizedWeight refuses to hold it.
    with pytest.raises(ValueError, match="int4 codes must be a 2-D torch.uint8 tensor"):
        quant.QuantizedWeight(qw.qweight.to(torch.int8), qw.scale, qw.offset, 4, 32)
    with pytest.raises(ValueError, match=r"bias must be \[8\]"):
        kernels.quant_linear(torch.randn(2, 64), qw, torch.randn(7))
