"""Weight-only int4 / int8 linear read from the packed format of llama_fast.quant, against the reference (x @
dequantize(W).T computed in fp32): decode GEMV (<= 8 rows) and the prefill GEMM path."""
import pytest
import torch

from llama_fast import ops, quant

from op_fixtures import at_each_thread_count, backend, matches_reference, threads  # noqa: F401  (pytest fixtures)
from op_fixtures import at_isa as _at_isa

# (bits, group_size, symmetric): GGUF Q4_1-like (asymmetric, g=32), Q4_0-like (symmetric, offset = -8 scale),
# Q8_0-like, per-channel int8, and group sizes the vector kernels do not tile (scalar fallback).
FORMATS = [(4, 32, False), (4, 32, True), (4, 128, False), (8, 32, True), (8, -1, True), (4, 8, False), (8, 4, True)]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"int{f[0]}_g{f[1]}{'_sym' if f[2] else ''}")
@pytest.mark.parametrize("m,n", [(1, 83), (3, 769), (8, 7), (20, 83), (70, 19)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_matches_reference(backend, fmt, m, n, dtype, matches_reference):
    name, device = backend
    bits, group_size, symmetric = fmt
    k = 256
    g = torch.Generator().manual_seed(n + bits)
    w = torch.randn(n, k, generator=g)
    qw = quant.quantize(w, bits=bits, group_size=group_size, symmetric=symmetric, scale_dtype=torch.float16)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if m == 3 else None
    out = ops.quant_linear(x.to(device), qw.to(device), None if bias is None else bias.to(device), backend=name)
    assert out.dtype == dtype and out.shape == (m, n)
    wd = qw.dequantize(torch.float64)
    want = x.double() @ wd.t() + (0 if bias is None else bias.double())
    low = torch.nn.functional.linear(x, qw.dequantize(dtype), bias)
    matches_reference(out, want.float(), low)


# Shapes the AVX512-VNNI kernels tile differently: K with a last half chunk of 32 (K % 64 == 32), groups of
# 96 that straddle int4's 64-element chunks, per-channel scales, every activation row count up to 8 and a
# prefill-sized one.
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k,group_size", [(96, 32), (160, 32), (288, 96), (192, 192), (1568, 32)])
@pytest.mark.parametrize("m", [1, 2, 5, 8, 19])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_odd_k(backend, bits, k, group_size, m, dtype, matches_reference):
    name, device = backend
    g = torch.Generator().manual_seed(k + m)
    qw = quant.quantize(torch.randn(37, k, generator=g), bits=bits, group_size=group_size, symmetric=bits == 8,
                        scale_dtype=torch.float16)
    x = torch.randn(m, k, generator=g).to(dtype)
    out = ops.quant_linear(x.to(device), qw.to(device), backend=name)
    want = x.double() @ qw.dequantize(torch.float64).t()
    matches_reference(out, want.float(), torch.nn.functional.linear(x, qw.dequantize(dtype)))


@pytest.mark.parametrize("bits,n", [(8, 20_003), (4, 40_003)])
def test_quant_linear_many_rows_one_token(backend, threads, bits, n, matches_reference):
    """A weight of many short rows (a token table's shape, here K = 64): the GEMV streams one range of rows per
    thread (quant_linear.cpp decode_row_grain), n not a multiple of the threads or of 4."""
    name, device = backend
    k = 64
    g = torch.Generator().manual_seed(n)
    qw = quant.quantize(torch.randn(n, k, generator=g), bits=bits, group_size=32, symmetric=bits == 8,
                        scale_dtype=torch.float16)
    x = torch.randn(1, k, generator=g)
    out = ops.quant_linear(x.to(device), qw.to(device), backend=name)
    want = x.double() @ qw.dequantize(torch.float64).t()
    matches_reference(out, want.float(), torch.nn.functional.linear(x, qw.dequantize(torch.float32)))


def _rows_with_extremes():
    """Activation rows that stress a kernel which turns each row into fixed point: outliers next to tiny values,
    a zero row, a row of subnormal-sized values, rows holding inf and NaN."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 256, generator=g) * 1e-3
    x[0, 17] = 3e4                      # one outlier: the small values must keep their precision
    x[1] = 0.0
    x[2] = torch.randn(256, generator=g) * 1e-39
    x[3, 100] = float("inf")
    x[4, 5] = float("nan")
    x[5] *= 1e30
    return x


@pytest.mark.parametrize("bits", [4, 8])
def test_quant_linear_extreme_activations(backend, bits):
    name, device = backend
    qw = quant.quantize(torch.randn(19, 256), bits=bits, group_size=32, symmetric=bits == 8,
                        scale_dtype=torch.float16)
    x = _rows_with_extremes()
    want = (x.double() @ qw.dequantize(torch.float64).t()).float()
    finite = [0, 1, 2, 5]
    # each row alone, the finite rows together, and all rows in one call (a kernel may treat a call as a whole)
    for rows in [[r] for r in range(6)] + [finite, list(range(6))]:
        out = ops.quant_linear(x[rows].to(device), qw.to(device), backend=name).cpu()
        for i, r in enumerate(rows):
            if r in finite:  # fp32 accuracy relative to each row's own scale, however small or large
                scale = want[r].abs().max().item()
                torch.testing.assert_close(out[i], want[r], rtol=1e-5, atol=1e-5 * scale)
            elif r == 3:  # inf * 0 is NaN: a kernel that multiplies codes (some are 0) before scaling may give
                # NaN where the reference gives inf; either way nothing finite may come out of an inf row
                assert not torch.isfinite(out[i]).any()
            else:
                assert torch.isnan(out[i]).all()


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quant_linear_scale_dtypes_cpu(scale_dtype):
    qw = quant.quantize(torch.randn(83, 128), bits=4, group_size=32, scale_dtype=scale_dtype)
    x = torch.randn(2, 128)
    want = x.double() @ qw.dequantize(torch.float64).t()
    torch.testing.assert_close(ops.quant_linear(x, qw, backend="cpu").double(), want, rtol=1e-5, atol=1e-4)


def test_quant_linear_bad_inputs_cpu():
    qw = quant.quantize(torch.randn(8, 64), bits=4, group_size=32)
    x = torch.randn(1, 64)
    f = torch.ops.llama_fast.quant_linear
    with pytest.raises(RuntimeError, match="must equal the weight's K"):
        ops.quant_linear(torch.randn(1, 32), qw, backend="cpu")
    with pytest.raises(RuntimeError, match="bits must be 4 or 8"):
        f(x, qw.qweight, qw.scale, qw.offset, 3, 32, None)
    with pytest.raises(RuntimeError, match="qweight must be int8"):
        f(x, qw.qweight, qw.scale, qw.offset, 8, 32, None)
    with pytest.raises(RuntimeError, match="group_size 48 must divide K=64"):
        f(x, qw.qweight, qw.scale, qw.offset, 4, 48, None)
    with pytest.raises(RuntimeError, match="scale must be \\[8, 2\\]"):
        f(x, qw.qweight, qw.scale[:, :1].contiguous(), None, 4, 32, None)
    with pytest.raises(RuntimeError, match="offset dtype"):
        f(x, qw.qweight, qw.scale.float(), qw.offset.half(), 4, 32, None)
    with pytest.raises(RuntimeError, match="qweight must be contiguous"):
        f(x, qw.qweight.t().contiguous().t(), qw.scale, qw.offset, 4, 32, None)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        f(x.half(), qw.qweight, qw.scale, qw.offset, 4, 32, None)


def test_opcheck_quant_linear():
    for bits in (4, 8):
        qw = quant.quantize(torch.randn(7, 64), bits=bits, group_size=32)
        for m in (1, 9):
            torch.library.opcheck(torch.ops.llama_fast.quant_linear.default,
                                  (torch.randn(m, 64), qw.qweight, qw.scale, qw.offset, bits, 32, torch.randn(7)))


def _isa_levels() -> tuple[str, ...]:
    from op_fixtures import _cpu_isas
    return tuple(_cpu_isas())


# The 256-bit integer kernel (quant_linear_avx2.cpp, at the avx2 and avx512 levels) against the AVX512-VNNI one:
# the same prepared activations (same fixed point and layout), the same int32 pair sums per lane (vpmaddwd +
# vpaddd, or AVX-VNNI's vpdpwssd, equals vpdpwssd lane by lane: exact integer arithmetic) and the same fp32
# operations per lane in the same order, so the outputs are equal bit for bit, not merely close. Where the levels
# take other paths (fp32 activations from kTiledOverVnniFromRows = 8 rows go to the dequantized tiles) nothing is
# compared. Needs a CPU with AVX512-VNNI; the tolerance tests above cover the 256-bit kernel on any AVX2 CPU.
@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 32, False), (4, 32, True), (4, 128, False),
                                                       (4, 96, False), (8, 32, True), (8, 64, False),
                                                       (8, -1, True)])
@pytest.mark.parametrize("k", [96, 288, 1568])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_quant_linear_avx2_equals_vnni_bitwise(bits, group_size, symmetric, k, scale_dtype):
    levels = _isa_levels()
    if "avx512_vnni" not in levels:
        pytest.skip("no AVX512-VNNI on this CPU to compare the 256-bit integer kernel with")
    if k % (group_size if group_size > 0 else k):
        pytest.skip("group size does not divide K")
    g = torch.Generator().manual_seed(k + bits)
    qw = quant.quantize(torch.randn(53, k, generator=g), bits=bits, group_size=group_size, symmetric=symmetric,
                        scale_dtype=scale_dtype)
    x32 = torch.randn(7, k, generator=g)
    x32[2] *= 1e-20  # a row whose fixed point has a large exponent
    cases = [x32[:m] for m in (1, 2, 3, 5, 7)]
    cases += [x32.to(torch.bfloat16)[:m] for m in (1, 4, 7)]
    cases += [torch.randn(40, k, generator=g).to(torch.bfloat16)]  # bf16 stays on the integer kernels at any m
    for x in cases:
        def run():
            return ops.quant_linear(x, qw, backend="cpu")
        want = _at_isa("avx512_vnni", run)
        for level in ("avx2", "avx512"):
            got = _at_isa(level, run)
            assert torch.equal(got.view(torch.int16 if got.dtype == torch.bfloat16 else torch.int32),
                               want.view(torch.int16 if want.dtype == torch.bfloat16 else torch.int32)), \
                f"{level} vs avx512_vnni, m={x.shape[0]} {x.dtype}: max diff {(got - want).abs().max().item()}"


def _has_avx_vnni() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any("avx_vnni" in line.split() for line in f if line.startswith("flags"))
    except OSError:
        return False


@pytest.mark.skipif(not _has_avx_vnni(), reason="this CPU has no AVX-VNNI")
def test_quant_linear_avx_vnni_equals_madd_bitwise(tmp_path):
    """On a CPU with AVX-VNNI the 256-bit kernel uses its vpdpwssd; LLAMA_FAST_AVX_VNNI=0 (read once per process)
    turns it off. Both compute the same int32 lanes, so the outputs must be equal bit for bit."""
    import subprocess
    import sys
    code = ("import torch, sys; from llama_fast import ops, quant; from llama_fast.ops import cpu; cpu.set_isa('avx2');"
            "g = torch.Generator().manual_seed(0);"
            "outs = [];"
            "[outs.append(ops.quant_linear(torch.randn(m, 1568, generator=g), quant.quantize(torch.randn(37, 1568, "
            "generator=g), bits=b, group_size=32, scale_dtype=torch.float16), backend='cpu')) for b in (4, 8) "
            "for m in (1, 3)];"
            "torch.save(outs, sys.argv[1])")
    runs = []
    for flag in ("1", "0"):
        path = tmp_path / f"out{flag}.pt"
        env = dict(__import__("os").environ, LLAMA_FAST_AVX_VNNI=flag)
        subprocess.run([sys.executable, "-c", code, str(path)], check=True, env=env)
        runs.append(torch.load(path))
    for a, b in zip(*runs):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


# Decode rows (up to kMaxGemvRows) stream one range of weight rows per thread (quant_linear.cpp decode_row_grain),
# more rows take ~32 KiB chunks: row counts that leave a thread's range short or empty, on 1 and 2 threads. Each
# output is one weight row's dot product whichever thread computes it: every thread count gives the same bits.
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n", [3, 9, 770])
@pytest.mark.parametrize("m", [1, 4, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_row_ranges_per_thread(backend, bits, n, m, dtype, matches_reference):
    name, device = backend
    g = torch.Generator().manual_seed(n + m + bits)
    qw = quant.quantize(torch.randn(n, 256, generator=g), bits=bits, group_size=32, symmetric=bits == 8,
                        scale_dtype=torch.float16)
    x = torch.randn(m, 256, generator=g).to(dtype)
    outs = at_each_thread_count(lambda: ops.quant_linear(x, qw, backend=name))
    want = x.double() @ qw.dequantize(torch.float64).t()
    matches_reference(outs[0], want.float(), torch.nn.functional.linear(x, qw.dequantize(dtype)))
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
