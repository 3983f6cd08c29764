"""x @ W^T for ggml block weights (llama_fast.kquants) read as stored, against the fp64 product with the exact
dequantized weight: the VNNI fixed-point decode path, the portable path, and the prefill GEMM path."""
import pytest
import torch
from kquant_util import FP16_FIELDS, random_blocks

from llama_fast import kquants, ops

from op_fixtures import at_isa as _at_isa
from op_fixtures import backend, matches_reference, threads  # noqa: F401  (pytest fixtures)


@pytest.mark.parametrize("kind", kquants.TYPES)
@pytest.mark.parametrize("m", [1, 3, 8, 13, 40, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kquant_linear_matches_reference(backend, kind, m, dtype, matches_reference):
    name, device = backend
    if name != "cpu":
        pytest.skip("the CUDA backend has no kquant_linear yet")
    # odd m: a few blocks per row; even m: rows of more than 16 blocks of 32 (rows_b32 reads their headers 16
    # at a time, the last group partial) and of 5 super-blocks
    if kquants.BLOCKS[kind][0] == 256:
        k = 512 if m % 2 else 1280
    else:
        k = 160 if m % 2 else 576
    w = kquants.KQuantWeight.single(kind, random_blocks(kind, 37, k, seed=m), k)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(37, generator=g).to(dtype) if m == 3 else None
    out = ops.kquant_linear(x, w, bias, backend=name)
    assert out.dtype == dtype and out.shape == (m, 37)
    want = x.double() @ w.dequantize(torch.float64).t() + (0 if bias is None else bias.double())
    low = torch.nn.functional.linear(x, w.dequantize(dtype), bias)
    matches_reference(out, want.float(), low)


@pytest.mark.parametrize("kind", ["Q4_K", "Q5_K", "Q6_K", "Q2_K", "Q3_K"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kquant_linear_long_rows_one_token(backend, kind, dtype, matches_reference):
    """One activation row against rows of K >= 8192, where rows_k takes 4 weight rows per pass (kquant_linear.cpp):
    11 rows, so two passes of 4 and 3 rows left to the one-row pass; every output against the fp64 product."""
    name, device = backend
    if name != "cpu":
        pytest.skip("the CUDA backend has no kquant_linear yet")
    k = 8192
    w = kquants.KQuantWeight.single(kind, random_blocks(kind, 11, k, seed=7), k)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(7)).to(dtype)
    out = ops.kquant_linear(x, w, backend=name)
    want = x.double() @ w.dequantize(torch.float64).t()
    low = torch.nn.functional.linear(x, w.dequantize(dtype))
    matches_reference(out, want.float(), low)


@pytest.mark.parametrize("kind", ["Q5_0", "Q5_1", "Q8_0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kquant_linear_block32_row_tails(backend, threads, kind, dtype, matches_reference):
    """Rows of 1-5, 16-21 and 36 blocks of 32: rows_b32 reads a row's headers 16 blocks at a time, the last up to
    4 of a row one by one instead of in a gather (kquant_linear.cpp), so every tail length meets both ways."""
    name, device = backend
    if name != "cpu":
        pytest.skip("the CUDA backend has no kquant_linear yet")
    for blocks in (1, 2, 3, 4, 5, 16, 17, 18, 20, 21, 36):
        k = 32 * blocks
        w = kquants.KQuantWeight.single(kind, random_blocks(kind, 29, k, seed=blocks), k)
        x = torch.randn(1, k, generator=torch.Generator().manual_seed(blocks)).to(dtype)
        out = ops.kquant_linear(x, w, backend=name)
        want = x.double() @ w.dequantize(torch.float64).t()
        matches_reference(out, want.float(), torch.nn.functional.linear(x, w.dequantize(dtype)))


# (type, K, rows): one range per thread of odd row counts, the last one shorter: a token table's many short rows
# (Q8_0), super-blocks (Q6_K), a few hundred rows just over one range's worth (Q5_0, Q5_1)
MANY_ROWS = [("Q8_0", 32, 40_003), ("Q6_K", 256, 6_007), ("Q5_0", 576, 577), ("Q5_1", 576, 193)]


@pytest.mark.parametrize("kind,k,rows", MANY_ROWS)
def test_kquant_linear_many_rows_one_token(backend, threads, kind, k, rows, matches_reference):
    """One activation row against weights that kquant::gemv_grain splits into one range per thread (odd row
    counts, so a shorter last range): every output against fp64."""
    name, device = backend
    if name != "cpu":
        pytest.skip("the CUDA backend has no kquant_linear yet")
    w = kquants.KQuantWeight.single(kind, random_blocks(kind, rows, k, seed=3), k)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(3))
    out = ops.kquant_linear(x, w, backend=name)
    want = x.double() @ w.dequantize(torch.float64).t()
    matches_reference(out, want.float(), torch.nn.functional.linear(x, w.dequantize(torch.float32)))


def test_kquant_linear_mixed_segments(backend, matches_reference):
    """A fused weight of several types (Q4_K_M's q/k in Q4_K and v in Q6_K) in one call, 3-D input."""
    name, device = backend
    if name != "cpu":
        pytest.skip("the CUDA backend has no kquant_linear yet")
    parts = [kquants.KQuantWeight.single(kind, random_blocks(kind, rows, 256, seed=rows), 256)
             for kind, rows in (("Q4_K", 16), ("Q6_K", 9), ("Q5_K", 3), ("Q2_K", 5), ("Q3_K", 4))]
    w = kquants.concat_rows(parts)
    x = torch.randn(2, 3, 256, generator=torch.Generator().manual_seed(0))
    out = ops.kquant_linear(x, w, backend=name)
    want = x.double() @ w.dequantize(torch.float64).t()
    matches_reference(out, want.float())


@pytest.mark.parametrize("m", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("parts,k", [((("Q5_0", 7), ("Q8_0", 5), ("Q5_1", 3)), 576),
                                     ((("Q4_K", 6), ("Q6_K", 5)), 1536)])
def test_kquant_linear_fused_fma_types(backend, parts, k, m, dtype, matches_reference):
    """Fused weights whose every part has a kernel in kquant_linear_fma.cpp (on AVX2 CPUs without VNNI it takes
    them: SmolLM2 Q4_K_M's q/k/v, Q5_0 with a Q8_0 part, K = 576 = 18 blocks of 32: two groups of 8 and a tail),
    m = 1, 2, 3, 5 (its steps of 4, 2 and 1 activation rows), every output against fp64."""
    name, device = backend
    if name != "cpu":
        pytest.skip("the CUDA backend has no kquant_linear yet")
    w = kquants.concat_rows([kquants.KQuantWeight.single(kind, random_blocks(kind, rows, k, seed=rows), k)
                             for kind, rows in parts])
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    out = ops.kquant_linear(x, w, backend=name)
    want = x.double() @ w.dequantize(torch.float64).t()
    matches_reference(out, want.float(), torch.nn.functional.linear(x, w.dequantize(dtype)))


def test_kquant_linear_extreme_activations(backend):
    name, device = backend
    if name != "cpu":
        pytest.skip("the CUDA backend has no kquant_linear yet")
    w = kquants.KQuantWeight.single("Q4_K", random_blocks("Q4_K", 11, 256, seed=5), 256)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 256, generator=g) * 1e-3
    x[0, 17] = 3e4            # an outlier next to small values
    x[1] = 0.0
    x[2] = torch.randn(256, generator=g) * 1e-39
    x[3, 100] = float("nan")  # the fixed point cannot carry it: the call takes the exact fp32 path
    want = (x.double() @ w.dequantize(torch.float64).t()).float()
    out = ops.kquant_linear(x, w, backend=name)
    for r in (0, 1, 2, 4):
        scale = want[r].abs().max().item()
        torch.testing.assert_close(out[r], want[r], rtol=1e-5, atol=1e-5 * scale)
    assert torch.isnan(out[3]).all()


def _extreme_blocks(kind: str, rows: int, k: int) -> torch.Tensor:
    """Blocks whose every weight has the largest |code * integer sub-block scale| of its type (the int32 lane
    bound of kquant_linear.cpp): Q4_K / Q5_K 15 / 31 times scale 63; Q6_K -32 times -128 (+4096); Q2_K 3 times 15;
    Q3_K -4 times -32; Q5_0 -16, Q5_1 31, Q8_0 -128 (one fp16 scale per block)."""
    weights, nbytes = kquants.BLOCKS[kind]
    b = torch.zeros(rows, k // weights, nbytes, dtype=torch.uint8)
    f16 = torch.tensor([1e-3], dtype=torch.float16).view(torch.uint8)
    if kind == "Q6_K":
        b[..., 192:208] = 0x80                       # int8 scale -128; low and high bits 0: code 0 - 32 = -32
    elif kind in ("Q4_K", "Q5_K"):
        b[..., 4:] = 0xFF                            # every 6-bit scale and min 63, every code 15 / 31
    elif kind == "Q2_K":
        b[..., 0:80] = 0xFF                          # scale and min 15, code 3
    elif kind == "Q5_1":
        b[..., 4:] = 0xFF                            # code 31
    elif kind == "Q8_0":
        b[..., 2:] = 0x80                            # code -128
    # Q3_K: hmask, qs and scales 0: code 0 - 4, scale 0 - 32; Q5_0: qh and qs 0: code -16
    for at in FP16_FIELDS[kind]:
        b[..., at:at + 2] = f16
    return b.reshape(rows, -1)


@pytest.mark.parametrize("kind", kquants.TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kquant_linear_int32_accumulation_extremes(backend, kind, dtype):
    """The largest codes times the largest sub-block scales against activations at the row maximum, every
    product of a lane with the same sign: the int32 sums per super-block (rows_k) and per block (rows_b32) must not
    overflow or lose bits in their conversion to fp32; x = -max flips the sign."""
    name, device = backend
    if name != "cpu":
        pytest.skip("the CUDA backend has no kquant_linear yet")
    k = 512
    w = kquants.KQuantWeight.single(kind, _extreme_blocks(kind, 3, k), k)
    x = torch.full((2, k), -1.99)       # just below a power of two: the fixed point's largest limbs (-2^14 / -32640)
    x[1] = 1.99
    x = x.to(dtype)
    want = (x.double() @ w.dequantize(torch.float64).t()).float()
    out = ops.kquant_linear(x, w, backend=name).float()
    torch.testing.assert_close(out, want, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=0)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


# The block types kquant_linear_avx2.cpp has kernels for (vnni256::kquant_supports): a type added later runs the
# portable path at the avx2 / avx512 levels, which is not bit-identical to the VNNI kernels.
AVX2_KERNEL_TYPES = ("Q4_K", "Q5_K", "Q6_K", "Q2_K", "Q3_K", "Q5_0", "Q5_1", "Q8_0")


# The 256-bit integer kernels (kquant_linear_avx2.cpp, at the avx2 and avx512 levels) against the AVX512-VNNI
# ones: the same prepared activations, the same exact int32 sums per lane (vpmaddwd + vpaddd, or AVX-VNNI's
# vpdpwssd, is vpdpwssd lane by lane) and the same fp32 operations per lane in the same order, so the outputs are
# equal bit for bit, not merely close: any difference is a bug in the port. Both levels run these kernels up to
# kMaxGemvRows (64) activation rows. Needs a CPU with AVX512-VNNI; the tolerance tests above cover the 256-bit
# kernels on any AVX2 CPU.
@pytest.mark.parametrize("kind", AVX2_KERNEL_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kquant_linear_avx2_equals_vnni_bitwise(kind, dtype):
    from op_fixtures import _cpu_isas
    if "avx512_vnni" not in _cpu_isas():
        pytest.skip("no AVX512-VNNI on this CPU to compare the 256-bit integer kernels with")
    k = 1280 if kquants.BLOCKS[kind][0] == 256 else 608  # Q5_0 / Q5_1 / Q8_0: 19 blocks, a partial group of 16
    w = kquants.KQuantWeight.single(kind, random_blocks(kind, 29, k, seed=7), k)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(13, k, generator=g)
    x[3] *= 1e-20  # a row whose fixed point has a large exponent
    x = x.to(dtype)
    for m in (1, 2, 3, 4, 5, 8, 13):
        def run():
            return ops.kquant_linear(x[:m], w, backend="cpu")
        want = _at_isa("avx512_vnni", run)
        for level in ("avx2", "avx512"):
            got = _at_isa(level, run)
            assert torch.equal(_bits(got), _bits(want)), \
                f"{kind} {level} vs avx512_vnni, m={m}: max diff {(got - want).abs().max().item()}"


@pytest.mark.parametrize("kind", AVX2_KERNEL_TYPES)
def test_kquant_linear_avx2_extremes_equal_vnni_bitwise(kind):
    """The int32 lane bound cases of test_kquant_linear_int32_accumulation_extremes, compared bit for bit."""
    from op_fixtures import _cpu_isas
    if "avx512_vnni" not in _cpu_isas():
        pytest.skip("no AVX512-VNNI on this CPU to compare the 256-bit integer kernels with")
    w = kquants.KQuantWeight.single(kind, _extreme_blocks(kind, 3, 512), 512)
    x = torch.full((2, 512), -1.99)
    x[1] = 1.99
    for dtype in (torch.float32, torch.bfloat16):
        def run():
            return ops.kquant_linear(x.to(dtype), w, backend="cpu")
        assert torch.equal(_bits(_at_isa("avx2", run)), _bits(_at_isa("avx512_vnni", run)))


# The prefill GEMM path (gemm.cpp's tiles; kquant::linear hands it every m from the GEMV crossover, at the latest
# from cpu_max_gemv_rows() + 1): a Q4_K_M-like fused weight of several types, odd and even m around its register
# tile's rows (16 / 32 per panel), with and without bias, both activation dtypes.
_GEMM_PARTS = (("Q4_K", 24), ("Q6_K", 13), ("Q5_K", 3), ("Q2_K", 5), ("Q3_K", 4), ("Q5_0", 7), ("Q5_1", 6),
               ("Q8_0", 2))


@pytest.mark.parametrize("m", [65, 97, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kquant_linear_gemm_rows_mixed_segments(backend, m, dtype, matches_reference):
    name, device = backend
    if name != "cpu":
        pytest.skip("the CUDA backend has no kquant_linear yet")
    k = 768    # three super-blocks, 24 blocks of 32: more than one K block of the GEMM's tile on every CPU
    w = kquants.concat_rows([kquants.KQuantWeight.single(kind, random_blocks(kind, rows, k, seed=rows), k)
                             for kind, rows in _GEMM_PARTS])
    n = sum(rows for _, rows in _GEMM_PARTS)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if m % 2 else None
    out = ops.kquant_linear(x, w, bias, backend=name)
    assert out.dtype == dtype and out.shape == (m, n)
    want = x.double() @ w.dequantize(torch.float64).t() + (0 if bias is None else bias.double())
    low = torch.nn.functional.linear(x, w.dequantize(dtype), bias)
    matches_reference(out, want.float(), low)


@pytest.mark.parametrize("kind", kquants.TYPES)
def test_kquant_linear_gemm_dequantizes_exactly(backend, kind):
    """One-hot activation rows pick single weights: every output is 1 * w plus products with exact zeros, so
    the fp32 GEMM must return the dequantized weight (kquant_dequantize, the reference decoding) bit for bit.
    Any difference in the GEMM's own block decoding (cpu/ggml_dequant.h) shows here. 256 rows: the GEMM's range."""
    name, device = backend
    if name != "cpu":
        pytest.skip("the CUDA backend has no kquant_linear yet")
    k = 256
    w = kquants.KQuantWeight.single(kind, random_blocks(kind, 19, k, seed=7), k)
    out = ops.kquant_linear(torch.eye(k), w, backend=name)
    assert torch.equal(out, w.dequantize(torch.float32).t())


# The AMX GEMM (csrc/cpu/gemm_amx_quant.cpp, GgmlCodes) for the block types whose weight is code * scale + offset per
# group of 32, and Q6_K / Q2_K / Q3_K (a scale per 16 weights: groups of 16 for every segment of a weight holding one):
# kquant::gemm runs it at the top ISA level where the CPU has AMX-BF16, and kquant::linear hands kquant::gemm every
# row count from cpu::amx_kquant_from_rows. Through the op (the backend fixture runs each case at every ISA level
# this CPU has: below the top one the VNNI / fp32 GEMM paths, so the old path stays tested on AMX machines and the
# only one on others) and through the test hook cpu_kquant_linear_amx (the kernel whatever the rows and level;
# skipped where it does not run).
AMX_TYPES = ("Q8_0", "Q4_K", "Q5_K", "Q5_0", "Q5_1", "Q6_K", "Q2_K", "Q3_K")


def _amx(x, w):
    """The AMX GEMM's fp32 output, or None where it does not run (no AMX, LLAMA_FAST_AMX=0, a type it does not
    take, inf / NaN in x)."""
    out = torch.ops.llama_fast.cpu_kquant_linear_amx(x, [s.blocks for s in w.segments],
                                                     [kquants.TYPE_IDS[s.kind] for s in w.segments])
    return out[0] if out else None


def _amx_runs() -> bool:
    try:
        from llama_fast.ops import cpu  # noqa: F401  (loads the extension)
        w = kquants.KQuantWeight.single("Q8_0", random_blocks("Q8_0", 1, 32, seed=0), 32)
        return _amx(torch.ones(1, 32), w) is not None
    except (ImportError, RuntimeError, AttributeError):
        return False


needs_amx = pytest.mark.skipif(not _amx_runs(), reason="the AMX GEMM does not run here (no AMX-BF16, no tile "
                               "permission from the OS, or LLAMA_FAST_AMX=0); the op-level tests cover the other paths")


def _weight(kind: str, n: int, k: int, seed: int) -> kquants.KQuantWeight:
    return kquants.KQuantWeight.single(kind, random_blocks(kind, n, k, seed=seed), k)


@needs_amx
@pytest.mark.parametrize("kind", AMX_TYPES)
@pytest.mark.parametrize("m", [1, 5, 16, 33, 70, 129])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_amx_kquant_kernel_matches_reference(threads, kind, m, dtype, matches_reference):
    """The kernel itself: N = 83 (a partial 16-row weight block and a partial pair), K = 1280 (five super-blocks,
    40 groups of 32: chunks of 512 and a partial one; Q6_K / Q2_K / Q3_K 80 groups of 16, chunks of 256). m <= 8:
    the small-m loop (m = 1 and 5: its one- and two-tile layouts of fp32 digits)."""
    k = 1280
    w = _weight(kind, 83, k, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    out = _amx(x, w)
    assert out is not None and out.dtype == torch.float32 and out.shape == (m, 83)
    want = x.double() @ w.dequantize(torch.float64).t()
    # the op's output is fp32 for either x dtype (x bf16 is exact in fp32): PyTorch's own error in fp32
    low = torch.nn.functional.linear(x.float(), w.dequantize(torch.float32))
    matches_reference(out, want.float(), low)


@needs_amx
@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_amx_kquant_kernel_several_passes(threads, kind, dtype, matches_reference):
    """m = 530: 34 16-row activation blocks, more than one pass over the weights holds (kPassBlocks = 32 in
    gemm_amx_quant.cpp): a pass of 32 blocks, then one of 2 whose last is partial. N = 45 (a pair with a tail)."""
    k, m = 512, 530
    w = _weight(kind, 45, k, seed=7)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    out = _amx(x, w)
    assert out is not None and out.shape == (m, 45)
    want = x.double() @ w.dequantize(torch.float64).t()
    matches_reference(out, want.float(), torch.nn.functional.linear(x.float(), w.dequantize(torch.float32)))


@needs_amx
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_amx_kquant_fused_mixed_segments(threads, dtype, matches_reference):
    """A fused weight of every supported type (as SmolLM2's q/k/v in one linear), segment boundaries inside 16-row
    weight blocks, m = 70."""
    k = 512
    w = kquants.concat_rows([_weight(kind, rows, k, seed=rows) for kind, rows in
                             (("Q4_K", 21), ("Q8_0", 9), ("Q5_K", 5), ("Q5_0", 17), ("Q5_1", 3), ("Q4_K", 13))])
    x = torch.randn(70, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = _amx(x, w)
    assert out is not None
    want = x.double() @ w.dequantize(torch.float64).t()
    matches_reference(out, want.float(), torch.nn.functional.linear(x.float(), w.dequantize(torch.float32)))


@needs_amx
@pytest.mark.parametrize("m", [3, 70, 530])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_amx_kquant_fused_with_q6k(threads, m, dtype, matches_reference):
    """Q6_K / Q2_K / Q3_K segments among the others (as Q4_K_M's fused q/k/v with v in Q6_K): each run of segments
    of one group size (16 or 32) its own GEMM, written to its columns. Runs of one and of several segments, segment
    and run boundaries inside 16-row weight blocks, K = 768 (48 groups of 16: chunks of 256), the small-m loop
    (m = 3), the general one (m = 70) and several passes (m = 530)."""
    k = 768
    w = kquants.concat_rows([_weight(kind, rows, k, seed=rows) for kind, rows in
                             (("Q4_K", 21), ("Q6_K", 9), ("Q8_0", 5), ("Q2_K", 17), ("Q6_K", 3), ("Q5_1", 3),
                              ("Q5_K", 13), ("Q3_K", 6), ("Q5_0", 4))])
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    out = _amx(x, w)
    assert out is not None
    want = x.double() @ w.dequantize(torch.float64).t()
    matches_reference(out, want.float(), torch.nn.functional.linear(x.float(), w.dequantize(torch.float32)))


@needs_amx
@pytest.mark.parametrize("rows", [range(256), range(5, 256, 37)])
def test_amx_kquant_one_hot_rows_dequantize_exactly(rows):
    """One-hot activation rows pick single weights: each output is scale * (code * 1) + offset * 1 plus groups of
    exact zeros (fma(s, 0, acc) == acc), so the kernel must return the reference dequantization (code * scale +
    offset, one rounding) bit for bit: any wrong code or scale in the weight side's decoding shows here. A fused
    weight of every type it takes (three runs: Q6_K in groups of 16, Q4_K to Q5_1 in groups of 32 with Q4_K /
    Q5_K's scales decoded per super-block, Q2_K / Q3_K in groups of 16), 256 rows (the general loop) and 7 (the small-m
    loop)."""
    k = 512
    w = kquants.concat_rows([_weight(kind, rows_, k, seed=rows_) for kind, rows_ in
                             (("Q6_K", 19), ("Q4_K", 11), ("Q5_K", 6), ("Q8_0", 7), ("Q5_0", 5), ("Q5_1", 3),
                              ("Q2_K", 10), ("Q3_K", 8))])
    x = torch.eye(k)[list(rows)]
    out = _amx(x, w)
    assert out is not None
    assert torch.equal(out, w.dequantize(torch.float32)[:, list(rows)].t())


@needs_amx
def test_amx_kquant_declines_nan():
    """inf / NaN in x: the kernel declines (the op then takes the fp32 GEMM), groups of 32 and of 16."""
    k = 256
    q4 = _weight("Q4_K", 16, k, seed=1)
    q6 = kquants.concat_rows([q4, _weight("Q6_K", 4, k, seed=2)])
    x = torch.randn(20, k)
    assert _amx(x, q4) is not None and _amx(x, q6) is not None
    for bad in (float("nan"), float("inf")):
        x[17, 3] = bad
        assert _amx(x, q4) is None and _amx(x, q6) is None


@pytest.mark.parametrize("kind", AMX_TYPES)
@pytest.mark.parametrize("m", [8, 16, 33, 129])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kquant_linear_amx_rows_match_reference(backend, kind, m, dtype, matches_reference):
    """Through the op at every ISA level, at row counts from the AMX crossover (cpu::amx_kquant_from_rows) to
    prefill: the AMX GEMM at the top level on an AMX CPU, the VNNI GEMV / fp32 GEMM below. A bias on odd m."""
    name, device = backend
    if name != "cpu":
        pytest.skip("the CUDA backend has no kquant_linear yet")
    k = 768 if kquants.BLOCKS[kind][0] == 256 else 576
    w = _weight(kind, 45, k, seed=m)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(45, generator=g).to(dtype) if m % 2 else None
    out = ops.kquant_linear(x, w, bias, backend=name)
    assert out.dtype == dtype and out.shape == (m, 45)
    want = x.double() @ w.dequantize(torch.float64).t() + (0 if bias is None else bias.double())
    low = torch.nn.functional.linear(x, w.dequantize(dtype), bias)
    matches_reference(out, want.float(), low)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kquant_linear_amx_rows_propagate_inf_and_nan(backend, dtype, matches_reference):
    """inf / NaN in a prefill-sized x: the AMX GEMM declines, the fp32 GEMM propagates them as the reference does."""
    name, device = backend
    if name != "cpu":
        pytest.skip("the CUDA backend has no kquant_linear yet")
    k = 256
    w = kquants.concat_rows([_weight("Q4_K", 20, k, seed=3), _weight("Q8_0", 12, k, seed=4)])
    x = torch.randn(40, k, generator=torch.Generator().manual_seed(2))
    x[5, 7] = float("nan")
    x[30, 9] = float("inf")
    x = x.to(dtype)
    want = x.double() @ w.dequantize(torch.float64).t()
    out = ops.kquant_linear(x, w, backend=name)
    assert torch.equal(torch.isnan(out), torch.isnan(want)) and torch.equal(torch.isinf(out), torch.isinf(want))
    assert torch.equal(out[torch.isinf(want)].double(), want[torch.isinf(want)])  # the same signs
    rows = [r for r in range(40) if r not in (5, 30)]  # every other row finite, against the reference
    low = torch.nn.functional.linear(x[rows], w.dequantize(dtype))
    matches_reference(out[rows], want[rows].float(), low)
