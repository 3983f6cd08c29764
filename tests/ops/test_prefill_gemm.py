"""The prefill GEMM of the CPU linears (csrc/cpu/gemm.cpp: more activation rows than cpu_max_gemv_rows()) against
an fp64 oracle under the tolerance rule, at every instruction-set level this CPU has (portable uses ATen's GEMM),
with 1 and 2 threads, for shapes with tails in M (partial register panels), N (partial weight strips and chunks)
and K (partial K blocks and vectors), dense fp32 / bf16 and int4 / int8 weights. On a CPU with AMX the top level's
bf16 case runs the tile GEMM (csrc/cpu/gemm_amx.cpp: M in pairs of 16-row tiles, N in pairs of 16, K in 32s, all
three with tails here) and the lower levels the fp32 GEMM."""
import pytest
import torch

from llama_fast import ops, quant

from op_fixtures import backend, matches_reference, threads  # noqa: F401  (pytest fixtures)


def prefill_rows() -> list[int]:
    pytest.importorskip("llama_fast._C")
    first = torch.ops.llama_fast.cpu_max_gemv_rows() + 1
    return [first, first + 37, 4 * first + 5]      # one partial panel; several; several plus a partial one


# N: below one register strip, a strip plus a tail, two chunks' worth; K: shorter than a vector, a tail past
# every vector width, several K blocks, a K block boundary inside a quantization group; the last one more weight
# pairs per thread than the AMX GEMM takes per L2-sized chunk (~1 MiB: 10 pairs at this K on a 2 MiB L2)
DENSE_SHAPES = [(5, 7), (83, 576), (37, 1541), (300, 96), (700, 1541)]


@pytest.mark.parametrize("row_case", [0, 1, 2])
@pytest.mark.parametrize("n,k", DENSE_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_prefill_matches_reference(backend, threads, row_case, n, k, dtype, matches_reference):
    name, device = backend
    m = prefill_rows()[row_case]
    g = torch.Generator().manual_seed(m * 31 + n * 7 + k)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if (n + row_case) % 2 else None
    out = ops.linear(x.to(device), w.to(device), b, backend=name)
    assert out.dtype == dtype and out.shape == (m, n)
    want = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    matches_reference(out, want.float(), torch.nn.functional.linear(x, w, b))


def test_dense_prefill_keeps_leading_dims(backend):
    """A [B, T, K] prompt batch: rows are B * T, the output [B, T, N]."""
    name, device = backend
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 50, 64, generator=g)
    w = torch.randn(40, 64, generator=g)
    out = ops.linear(x.to(device), w.to(device), backend=name)
    assert out.shape == (2, 50, 40)
    torch.testing.assert_close(out, torch.nn.functional.linear(x.double(), w.double()).float(), rtol=1e-5, atol=1e-5)


# int4 groups of 32 (Q4_1-like) and 64, Q4_0-like symmetric, int8 (Q8_0-like), and a group size that is no multiple of
# the vector width (the element-by-element dequantization)
FORMATS = [(4, 32, False), (4, 64, False), (4, 32, True), (8, 32, True), (4, 8, False)]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"int{f[0]}_g{f[1]}{'_sym' if f[2] else ''}")
@pytest.mark.parametrize("row_case", [0, 2])
@pytest.mark.parametrize("n,k", [(83, 576), (29, 320)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_prefill_matches_reference(backend, threads, fmt, row_case, n, k, dtype, matches_reference):
    name, device = backend
    bits, group_size, symmetric = fmt
    m = prefill_rows()[row_case]
    g = torch.Generator().manual_seed(m + bits * 100 + group_size + k)
    qw = quant.quantize(torch.randn(n, k, generator=g), bits=bits, group_size=group_size, symmetric=symmetric,
                        scale_dtype=torch.float16)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if row_case else None
    out = ops.quant_linear(x.to(device), qw.to(device), bias, backend=name)
    assert out.dtype == dtype and out.shape == (m, n)
    want = x.double() @ qw.dequantize(torch.float64).t() + (0 if bias is None else bias.double())
    matches_reference(out, want.float(), torch.nn.functional.linear(x, qw.dequantize(dtype), bias))


def test_prefill_rows_are_independent(backend):
    """Each output row depends on its own activation row only: the same row at the same place of another prompt
    gives the same bits (same kernel, same summation order: exact by construction)."""
    name, device = backend
    m = prefill_rows()[1]
    g = torch.Generator().manual_seed(11)
    w = torch.randn(40, 576, generator=g)
    qw = quant.quantize(w, bits=4, group_size=32)
    x = torch.randn(m, 576, generator=g)
    y = x.clone()
    y[1:] = torch.randn(m - 1, 576, generator=g)
    for fn in (lambda a: ops.linear(a, w, backend=name), lambda a: ops.quant_linear(a, qw, backend=name)):
        assert torch.equal(fn(x)[0], fn(y)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_propagates_inf_and_nan(backend, dtype):
    """Whatever unit multiplies (bf16 on an AMX CPU: the tile GEMM), an inf / NaN input reaches its row's outputs."""
    name, device = backend
    m = prefill_rows()[0]
    x = torch.ones(m, 64, dtype=dtype)
    x[3, 5] = float("inf")
    x[7, 9] = float("nan")
    w = torch.ones(16, 64, dtype=dtype)
    out = ops.linear(x.to(device), w.to(device), backend=name)
    assert torch.isinf(out[3]).all() and torch.isnan(out[7]).all()
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[-1]).all()

