"""The int4 / int8 linear on the AMX tile GEMM (csrc/cpu/gemm_amx_quant.cpp: weight codes exact in bf16, fp32
activations split exactly into three bf16 digits) against the float64 reference x @ dequantize(W)^T under the
tolerance rule, at every activation row count the dispatch sends to it (from cpu::amx_quant_from_rows rows in
quant_linear, all of prefill) and, through the test op cpu_quant_linear_amx, at any row count. The op-level tests
run at every ISA level this CPU has: on an AMX CPU the top level takes the tile GEMM, the lower ones the VNNI /
AVX2 / portable paths, on the same cases. The kernel-level tests skip where the kernel does not run (no AMX-BF16,
no tile permission from the OS, or LLAMA_FAST_AMX=0)."""
import pytest
import torch
from tolerance import assert_matches_reference

from llama_fast import ops, quant

from op_fixtures import backend, matches_reference, threads  # noqa: F401  (pytest fixtures)


def _amx(x, qw, bias=None):
    """The tile GEMM itself: its output, or None where it does not run (no AMX, a format it does not take, inf /
    NaN in x)."""
    out = torch.ops.llama_fast.cpu_quant_linear_amx(x, qw.qweight, qw.scale, qw.offset, qw.bits, qw.group_size, bias)
    return out[0] if out else None


def _amx_runs() -> bool:
    try:
        from llama_fast.ops import cpu  # noqa: F401  (loads the extension)
        return _amx(torch.ones(1, 32), quant.quantize(torch.ones(16, 32), bits=8, group_size=32)) is not None
    except (ImportError, RuntimeError, AttributeError):
        return False


needs_amx = pytest.mark.skipif(not _amx_runs(), reason="the AMX quantized GEMM does not run here (no AMX-BF16, no "
                               "tile permission from the OS, or LLAMA_FAST_AMX=0); the op-level tests cover the "
                               "other paths")


def make_weight(bits: int, group_size: int, with_offset: bool, n: int, k: int, g: torch.Generator,
                scale_dtype=torch.float16) -> quant.QuantizedWeight:
    """A random int4 (codes 0..15) / int8 (-127..127) weight, with per-group offsets or without."""
    qw = quant.quantize(torch.randn(n, k, generator=g), bits=bits, group_size=group_size, scale_dtype=scale_dtype)
    if bits == 4 and not with_offset:
        return quant.QuantizedWeight(qw.qweight, qw.scale, None, 4, group_size)
    if bits == 8 and with_offset:
        offset = (torch.randn(n, k // group_size, generator=g) * 0.01).to(scale_dtype)
        return quant.QuantizedWeight(qw.qweight, qw.scale, offset, 8, group_size)
    return qw


def reference(x, qw, bias=None):
    """(float64 truth, PyTorch's own computation in x's dtype) of x @ dequantize(W)^T + bias."""
    want = x.double() @ qw.dequantize(torch.float64).t() + (0 if bias is None else bias.double())
    return want.float(), torch.nn.functional.linear(x, qw.dequantize(x.dtype), bias)


# (bits, group_size, offsets): int4 with offsets (Q4_1-like) and without, int8 without (Q8_0-like) and with
FORMATS = [(4, 32, True), (4, 64, False), (4, 128, True), (8, 32, False), (8, 64, True), (8, 128, False)]
ROWS = [1, 3, 16, 17, 33, 70, 129]   # one row; a partial 16-row block; one, one plus one, two plus one; several


def _fmt_id(f):
    return f"int{f[0]}_g{f[1]}{'_offset' if f[2] else ''}"


@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt_id)
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("k", [384, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_rows_match_reference(backend, fmt, m, k, dtype, matches_reference):
    """Through the op at every ISA level: N = 83 (a partial 16-row weight block and a partial pair), a bias on
    odd m."""
    name, device = backend
    bits, group_size, with_offset = fmt
    g = torch.Generator().manual_seed(m * 7 + k + bits)
    qw = make_weight(bits, group_size, with_offset, 83, k, g)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(83, generator=g).to(dtype) if m % 2 else None
    out = ops.quant_linear(x.to(device), qw.to(device), bias, backend=name)
    assert out.dtype == dtype and out.shape == (m, 83)
    matches_reference(out, *reference(x, qw, bias))


@needs_amx
@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt_id)
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("n", [16, 45])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_amx_kernel_matches_reference(threads, fmt, m, n, dtype):
    """The kernel at every row count (the dispatch sends it only some), N = one block or a pair with a tail."""
    bits, group_size, with_offset = fmt
    k = 3 * max(group_size, 128)
    g = torch.Generator().manual_seed(m * 5 + n + group_size)
    qw = make_weight(bits, group_size, with_offset, n, k, g)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if m % 2 else None
    out = _amx(x, qw, bias)
    assert out is not None and out.dtype == dtype and out.shape == (m, n)
    assert_matches_reference(out, *reference(x, qw, bias))


@needs_amx
@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_amx_kernel_several_passes(threads, fmt, dtype):
    """m = 530: 34 16-row activation blocks, more than one pass over the weights holds (kPassBlocks = 32): a pass of
    32 blocks, then one of 2 whose last is partial."""
    bits, group_size, with_offset = fmt
    k, m, n = 2 * max(group_size, 128), 530, 45
    g = torch.Generator().manual_seed(group_size + bits)
    qw = make_weight(bits, group_size, with_offset, n, k, g)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    out = _amx(x, qw, bias)
    assert out is not None and out.dtype == dtype and out.shape == (m, n)
    assert_matches_reference(out, *reference(x, qw, bias))


@needs_amx
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_size", [32, 1024])   # 1024 = K: one group per row, wider than a K chunk
def test_amx_kernel_scale_dtypes(scale_dtype, group_size):
    g = torch.Generator().manual_seed(1)
    qw = make_weight(4, group_size, True, 40, 1024, g, scale_dtype=scale_dtype)
    x = torch.randn(20, 1024, generator=g)
    assert_matches_reference(_amx(x, qw), *reference(x, qw))


def _identity_weight(bits: int, k: int) -> quant.QuantizedWeight:
    """W = I (K x K): code 1 on the diagonal, scale 1 (fp32), no offset, groups of 32."""
    codes = torch.eye(k, dtype=torch.int16)
    qweight = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8) if bits == 4 else codes.to(torch.int8)
    return quant.QuantizedWeight(qweight, torch.ones(k, k // 32), None, bits, 32)


def _wide_range_rows(g: torch.Generator, k: int) -> torch.Tensor:
    """fp32 rows whose largest magnitudes run from denormal to 2^127 (rows scaled by the kernel and rows not: the
    unscaled range is [2^-64, 2^64]), each with elements spread over 2^36 below its largest, random signs and all
    23 fraction bits random."""
    top = [-140, -127, -110, -65, -64, -63, -30, -1, 0, 1, 30, 63, 64, 65, 100, 126]
    exps = torch.tensor(top).unsqueeze(1) - torch.randint(0, 37, (len(top), k), generator=g)
    frac = torch.randint(0, 1 << 23, (len(top), k), generator=g).double() / (1 << 23)
    sign = torch.randint(0, 2, (len(top), k), generator=g).double() * 2 - 1
    x = (sign * (1 + frac) * torch.pow(2.0, exps.double())).float()  # below 2^-149: 0; denormals rounded
    x[:, 0] = (1 + frac[:, 0]).float() * torch.pow(2.0, torch.tensor(top).double()).float()   # the row's largest
    return x


@needs_amx
@pytest.mark.parametrize("bits", [4, 8])
def test_amx_digit_split_is_exact(bits):
    """x @ I^T must give x back bit for bit: only if hi + mid + lo == x exactly for every element (and the row
    scaling is exact) does each output, the sum of one exact product and zeros, equal its input. Rows from denormal
    to 2^127. A two-digit or rounded split fails this at the first element with bits beyond 16."""
    g = torch.Generator().manual_seed(0)
    k = 64
    x = _wide_range_rows(g, k)
    out = _amx(x, _identity_weight(bits, k))
    assert out is not None
    want = x + 0.0   # -0 (an element that underflowed) comes back as +0: a sum with +0 terms, as any matmul
    bad = (out.view(torch.int32) != want.view(torch.int32)).nonzero()
    assert bad.numel() == 0, f"{len(bad)} elements differ, first at {bad[0].tolist()}: {x[tuple(bad[0])]!r} -> " \
                             f"{out[tuple(bad[0])]!r}"
    xb = x.to(torch.bfloat16)   # one digit: bf16 rows come back as they are
    assert torch.equal(_amx(xb, _identity_weight(bits, k)).view(torch.int16), (xb + 0.0).view(torch.int16))


# The small-m loop (gemm_amx_quant.cpp, up to 8 rows without tiny / huge ones): its B layouts change at 4 rows (fp32:
# three digits in one tile) and at 5 (two tiles); 1 row is the fewest, 8 the most it takes.
SMALL_M_ROWS = [1, 2, 4, 5, 7, 8]


@needs_amx
@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt_id)
@pytest.mark.parametrize("m", SMALL_M_ROWS)
@pytest.mark.parametrize("n", [16, 45, 300])
@pytest.mark.parametrize("groups", ["one", "several"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_amx_small_m_matches_reference(threads, fmt, m, n, groups, dtype):
    """The small-m loop at each row count and layout, N = one 16-row block, blocks with a tail, many blocks split
    over the threads; K = one group, or several (with groups of 32: 12, more than one unpack batch of 8 and a
    partial one)."""
    bits, group_size, with_offset = fmt
    k = group_size if groups == "one" else 3 * max(group_size, 128)
    g = torch.Generator().manual_seed(m * 7 + n + group_size + k)
    qw = make_weight(bits, group_size, with_offset, n, k, g)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if (m + n) % 2 else None
    out = _amx(x, qw, bias)
    assert out is not None and out.dtype == dtype and out.shape == (m, n)
    assert_matches_reference(out, *reference(x, qw, bias))


@needs_amx
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", SMALL_M_ROWS)
def test_amx_small_m_digit_split_is_exact(bits, m):
    """x @ I^T gives x back bit for bit through the small-m loop too (its folded tiles add the three digits' parts
    in the epilogue: exact when only one product per output is non-zero, so only if the split is exact), on rows
    whose largest magnitudes span the range the kernel leaves unscaled, 2^-64 to 2^64."""
    g = torch.Generator().manual_seed(m)
    k = 64
    x = _wide_range_rows(g, k)[3:13]   # largest elements 2^-64 .. 2^64: no row scaled
    for r0 in range(0, x.shape[0], m):
        rows = x[r0:r0 + m]
        out = _amx(rows, _identity_weight(bits, k))
        assert out is not None
        assert torch.equal(out.view(torch.int32), (rows + 0.0).view(torch.int32)), f"rows {r0}..{r0 + len(rows)}"


@needs_amx
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_amx_small_m_rows_scaled_take_the_general_loop(dtype):
    """Few rows one of which is tiny (scaled before the split: the general loop): the scaled and the unscaled batch
    both to the rule, and equal to x scaled back where the scaling is exact (no denormals on the way)."""
    g = torch.Generator().manual_seed(9)
    qw = make_weight(4, 32, False, 45, 256, g)
    x = torch.randn(6, 256, generator=g).to(dtype)
    tiny = x * 2.0 ** -70    # every row below 2^-64: scaled by 2^70 and back, exactly
    out, out_tiny = _amx(x, qw), _amx(tiny, qw)
    assert_matches_reference(out, *reference(x, qw))
    assert_matches_reference(out_tiny, *reference(tiny, qw))
    if dtype == torch.bfloat16:
        assert torch.equal(out_tiny, (out * 2.0 ** -70).to(dtype))


@needs_amx
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_amx_kernel_extreme_magnitudes(bits, dtype):
    """Rows of tiny (denormal) and huge activations, and rows mixing an outlier with small values: fp32-level
    accuracy relative to each row's own scale (bf16: the rule against PyTorch's bf16 computation per row)."""
    g = torch.Generator().manual_seed(4)
    k = 256
    x = torch.randn(7, k, generator=g) * 1e-3
    x[0, 17] = 3e4
    x[1] *= 1e-36        # denormal-sized
    x[2] *= 1e-25        # scaled by the kernel (below 2^-64)
    x[3] *= 1e25         # scaled (above 2^64)
    x[4] *= 1e33
    x[5] = 0.0
    x = x.to(dtype)
    qw = make_weight(bits, 32, bits == 4, 19, k, g)
    out = _amx(x, qw)
    want, plain = reference(x, qw)
    for r in range(x.shape[0]):
        if dtype == torch.float32:
            scale = want[r].abs().max().item()
            torch.testing.assert_close(out[r], want[r], rtol=1e-5, atol=1e-5 * scale, msg=f"row {r}")
        else:
            assert_matches_reference(out[r], want[r], plain[r], what=f"row {r}")


@needs_amx
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_amx_kernel_declines_inf_and_nan(dtype):
    """inf / NaN cannot be split into digits (inf - inf): the kernel returns nothing, so the caller takes its fp32
    path (below: the op then propagates them)."""
    qw = make_weight(4, 32, True, 16, 64, torch.Generator().manual_seed(2))
    for bad in (float("inf"), float("-inf"), float("nan")):
        x = torch.ones(20, 64, dtype=dtype)
        x[18, 3] = bad
        assert _amx(x, qw) is None
    assert _amx(torch.ones(20, 64, dtype=dtype), qw) is not None


@pytest.mark.parametrize("m", [20, 80])     # the decode-step rows of quant_linear, and prefill (gemm_quant)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_rows_propagate_inf_and_nan(backend, m, bits, dtype):
    """At a row count the AMX kernel would take, a batch holding inf / NaN still gives the reference's non-finite
    rows (inf * a zero code may give NaN where the reference gives inf: nothing finite either way) and the other
    rows to the tolerance rule."""
    name, device = backend
    g = torch.Generator().manual_seed(m + bits)
    qw = make_weight(bits, 32, bits == 4, 37, 128, g)
    x = torch.randn(m, 128, generator=g).to(dtype)
    x[3, 100] = float("inf")
    x[7, 5] = float("nan")
    out = ops.quant_linear(x.to(device), qw.to(device), backend=name).cpu()
    assert not torch.isfinite(out[3]).any() and torch.isnan(out[7]).all()
    finite = [r for r in range(m) if r not in (3, 7)]
    want, plain = reference(x[finite], qw)
    assert_matches_reference(out[finite], want, plain)
