"""The multi-row paths of the CPU linear kernels (a batched decode step, or one with a prefill chunk riding along:
up to cpu_max_gemv_rows() activation rows in one pass over the weights) against the reference, at every
instruction-set level this CPU has, for every row count up to 17 (the GEMV kernels' register blocks, their switch to
the tiled kernel, every tile size of each ISA's register tile: up to 6 rows on AVX-512, 4 on AVX2 and portable, and
the splits of a batch into near-equal tiles) and beyond, and shapes of the demo model."""
import pytest
import torch

from llama_fast import ops, quant

from op_fixtures import backend, matches_reference  # noqa: F401  (pytest fixtures)

# On a CPU with AMX the top level's bf16 cases from cpu_amx_bf16_rows() rows (5 unless overridden) run the tile
# GEMM (csrc/cpu/gemm_amx.cpp): 5, 16 (one tile of rows) and 33 (a pair of tiles and one row) are its edges.
ROWS = list(range(1, 18)) + [33, 64]


def test_one_pass_limit_covers_the_rows_tested():
    pytest.importorskip("llama_fast._C")
    assert torch.ops.llama_fast.cpu_max_gemv_rows() >= max(ROWS)


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("n,k", [(83, 576), (37, 1541)])     # K with a tail past every vector width
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_dense_rows_match_reference(backend, m, n, k, dtype, bias, matches_reference):
    name, device = backend
    g = torch.Generator().manual_seed(m * 7 + k)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    out = ops.linear(x.to(device), w.to(device), b, backend=name)
    assert out.dtype == dtype and out.shape == (m, n)
    want = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double()).float()
    matches_reference(out, want, torch.nn.functional.linear(x, w, b))


@pytest.mark.parametrize("k", [576, 1536, 600])    # whole 32-element steps (the sums of all rows at once), a tail
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_dot_product_gemv_rows_do_not_depend_on_the_batch(k, bias):
    """On AVX512-BF16 (without AMX) up to 16 bf16 rows run the vdpbf16ps GEMV, which finishes all rows' sums of a
    weight row together in lanes: each must equal the row computed alone, bit for bit (the same dot products, the
    same lane pairing as one horizontal sum), with any scale of rows next to it."""
    pytest.importorskip("llama_fast._C")
    from llama_fast.ops import cpu
    if cpu.set_isa("") != "avx512_bf16" or torch.ops.llama_fast.cpu_amx_bf16_rows() > 0:
        pytest.skip("the vdpbf16ps GEMV runs on AVX512-BF16 CPUs without AMX")
    g = torch.Generator().manual_seed(k)
    x = (torch.randn(16, k, generator=g) * torch.logspace(-4, 4, 16)[:, None]).bfloat16()
    w = torch.randn(77, k, generator=g).bfloat16()
    b = torch.randn(77, generator=g).bfloat16() if bias else None
    alone = torch.cat([torch.ops.llama_fast.cpu_linear(x[i:i + 1], w, b) for i in range(16)])
    for m in range(1, 17):
        assert torch.equal(torch.ops.llama_fast.cpu_linear(x[:m], w, b), alone[:m]), m


# int4 groups of 32 (Q4_1-like) and 64, Q4_0-like symmetric, int8 (Q8_0-like), and a group size the vector
# dequantization does not tile (the scalar path, natural element order).
FORMATS = [(4, 32, False), (4, 64, False), (4, 32, True), (8, 32, True), (4, 8, False)]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"int{f[0]}_g{f[1]}{'_sym' if f[2] else ''}")
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_rows_match_reference(backend, fmt, m, dtype, matches_reference):
    name, device = backend
    bits, group_size, symmetric = fmt
    n, k = 83, 576
    g = torch.Generator().manual_seed(m + bits * 100 + group_size)
    qw = quant.quantize(torch.randn(n, k, generator=g), bits=bits, group_size=group_size, symmetric=symmetric,
                        scale_dtype=torch.float16)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if m % 2 else None
    out = ops.quant_linear(x.to(device), qw.to(device), bias, backend=name)
    assert out.dtype == dtype and out.shape == (m, n)
    want = x.double() @ qw.dequantize(torch.float64).t() + (0 if bias is None else bias.double())
    matches_reference(out, want.float(), torch.nn.functional.linear(x, qw.dequantize(dtype), bias))


@pytest.mark.parametrize("m", [9, 17])
def test_rows_are_independent(backend, m):
    """Each output row depends on its own activation row only: a row computed in a batch equals the same row
    computed in another batch at the same position of the tile (same kernel, same order: exact)."""
    name, device = backend
    g = torch.Generator().manual_seed(m)
    w = torch.randn(40, 576, generator=g)
    qw = quant.quantize(w, bits=4, group_size=32)
    x = torch.randn(m, 576, generator=g)
    y = x.clone()
    y[1:] = torch.randn(m - 1, 576, generator=g)     # row 0 kept, every other row changed
    for fn in (lambda a: ops.linear(a, w, backend=name), lambda a: ops.quant_linear(a, qw, backend=name)):
        assert torch.equal(fn(x)[0], fn(y)[0])


@pytest.mark.parametrize("n,k", [(83, 576), (37, 1541)])     # weight rows past whole blocks of 3 and of 4
def test_dense_fp32_rows_do_not_depend_on_the_batch(backend, n, k):
    """fp32 dense: every output is the same sum in the same order whatever the number of rows and the kernel that
    takes them (the GEMV kernels or the tiled one, whatever the ISA's tile shape and the split into tiles:
    csrc/cpu/row_tiles.h), so each row's outputs in a batch of up to 17 rows equal its outputs alone, bit for bit."""
    name, device = backend
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(17, k, generator=g).to(device)
    w = torch.randn(n, k, generator=g).to(device)
    b = torch.randn(n, generator=g).to(device)
    alone = torch.cat([ops.linear(x[i:i + 1], w, b, backend=name) for i in range(17)])
    for m in range(2, 18):
        assert torch.equal(ops.linear(x[:m], w, b, backend=name), alone[:m]), f"{m} rows"
