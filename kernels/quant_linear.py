"""Weight-only int8 / int4 dequant-matmul on the packed format of llama_fast.quant:

    out[m, n] = sum_k x[m, k] * (q[n, k] * scale[n, k // g] + offset[n, k // g])  (+ bias[n])

int4 bytes hold element 2j in the low nibble and 2j + 1 in the high nibble, so a tile of packed bytes
[BLOCK_K / 2, BLOCK_N] unpacks into the even-k and the odd-k halves of the weight tile; the x tile, read
contiguously, is split into its even and odd columns to match, and two tl.dot calls cover the tile.

GEMV (decode): when a K tile lies inside one quantization group (g % BLOCK_K == 0, the usual g = 64 / 128 /
per channel), the integer codes go into tl.dot unscaled (0..15 and -128..127 are exact in fp16 and bf16) and
the group's scale and offset are applied once per tile and output: acc += (x @ q) * scale + rowsum(x) *
offset. No per-element dequant math in the bandwidth-bound loop, and more exact than rounding the
dequantized weight to fp16. GEMM (prefill), and GEMV with g smaller than the tile: each weight element is
dequantized in fp32 and rounded to x's dtype before the dot (the second accumulator of the per-tile form
would cost 64 registers per thread in a 128x128 tile and spill; per-element work is amortised over
BLOCK_M rows there).

One kernel, two tilings: a GEMV tiling for decode (M <= 8 rows, padded to the 16 of the mma shape, which
costs nothing in a bandwidth-bound kernel) that spreads the weight over many CTAs, and a GEMM tiling for
prefill that reuses each weight tile across 64-128 rows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from llama_fast.ops import fake

from ._common import CompileCase, autotune, check, check_float, check_last_dim_contiguous, check_same_device, m_bucket

GEMV_MAX_ROWS = 8

# Decode (GEMV): the weight streams from HBM once, so what matters is bytes in flight: about 25 KB per SM to
# cover HBM latency at 2-3.3 TB/s. N / BLOCK_N CTAs must also fill the 108 (A100) / 132 (H100) SMs:
# BLOCK_N 16-32 gives 128-256 CTAs for N = 4096. BLOCK_K 256 int4 = 128 contiguous bytes per weight row and
# stage (full 128-byte transactions); 3-4 stages keep 12-32 KB in flight per CTA, far under either SMEM limit.
# The first config (BLOCK_K 64) is also the interpreter's: it covers the g < BLOCK_K path for g = 32.
GEMV_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 256}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=4),
]

# Prefill (GEMM): compute-bound for M >= ~100; 128x128 output tiles with 8 warps approach the mma peak on
# both GPUs. Per stage: x 128x64 fp16 = 16 KB + packed weight <= 8 KB, plus the dequantized operand staged
# in shared memory: 3-4 stages stay under the A100's 163 KB. BLOCK_K 128 with 128x128 tiles spills (the
# dequantized [BLOCK_K, BLOCK_N] operand lives in registers before the dot), as .ci/check_triton_cubins.py
# showed, so K tiles stay at 64.
GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=4),
]


@triton.jit
def _quant_matmul_kernel(X, QW, SCALE, OFFSET, BIAS, OUT, M, N, K, M_BUCKET, x_row_stride,
                         BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_OFFSET: tl.constexpr,
                         HAS_BIAS: tl.constexpr, SCALE_AFTER_DOT: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    n_groups = K // GROUP_SIZE
    x_rows = X + offs_m[:, None].to(tl.int64) * x_row_stride
    s_rows = SCALE + offs_n.to(tl.int64) * n_groups                          # [BLOCK_N]
    o_rows = OFFSET + offs_n.to(tl.int64) * n_groups
    ONE_GROUP: tl.constexpr = GROUP_SIZE % BLOCK_K == 0                       # the K tile is in one group
    PACK: tl.constexpr = 2 if BITS == 4 else 1
    HALF: tl.constexpr = BLOCK_K // PACK                                      # codes per lane (even / odd)
    offs_h = tl.arange(0, HALF)
    offs_k = tl.arange(0, BLOCK_K)
    qw_rows = QW + offs_n[None, :].to(tl.int64) * (K // PACK)                 # [1, BLOCK_N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        byte = k0 // PACK + offs_h                                            # [HALF]
        k_mask = byte < K // PACK
        wmask = k_mask[:, None] & n_mask[None, :]
        codes = tl.load(qw_rows + byte[:, None], mask=wmask, other=0)          # [HALF, BLOCK_N]
        x = tl.load(x_rows + k0 + offs_k[None, :], mask=m_mask[:, None] & (k0 + offs_k < K)[None, :], other=0.0)
        if BITS == 4:
            q_a = codes & 0xF                                                 # even k: low nibble
            q_b = codes >> 4                                                  # odd k: high nibble
            # x read contiguously (vectorized), then split into its even and odd columns in registers.
            x_a, x_b = tl.split(tl.reshape(x, [BLOCK_M, HALF, 2]))
            k_a = 2 * byte
        else:
            q_a = codes
            x_a = x
            k_a = byte
        if ONE_GROUP:                                  # one scale (and offset) per column for the tile
            s_a = tl.load(s_rows + k0 // GROUP_SIZE, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            o_a = tl.load(o_rows + k0 // GROUP_SIZE, mask=n_mask, other=0.0).to(tl.float32)[None, :] \
                if HAS_OFFSET else 0.0
        else:                                          # gathered per element; cached, the groups are few
            g_a = (k_a // GROUP_SIZE)[:, None]
            s_a = tl.load(s_rows[None, :] + g_a, mask=wmask, other=0.0).to(tl.float32)
            o_a = tl.load(o_rows[None, :] + g_a, mask=wmask, other=0.0).to(tl.float32) if HAS_OFFSET else 0.0
        s_b, o_b = s_a, o_a
        if BITS == 4 and GROUP_SIZE % 2 != 0 and not ONE_GROUP:   # an odd group size can split a byte
            g_b = ((k_a + 1) // GROUP_SIZE)[:, None]
            s_b = tl.load(s_rows[None, :] + g_b, mask=wmask, other=0.0).to(tl.float32)
            o_b = tl.load(o_rows[None, :] + g_b, mask=wmask, other=0.0).to(tl.float32) if HAS_OFFSET else 0.0
        if SCALE_AFTER_DOT and ONE_GROUP:
            part = tl.dot(x_a, q_a.to(X.dtype.element_ty), input_precision="ieee")
            if BITS == 4:
                part = tl.dot(x_b, q_b.to(X.dtype.element_ty), part, input_precision="ieee")
            acc += part * s_a
            if HAS_OFFSET:                             # sum_k x[m, k] * offset[n] for the tile
                x_sum = tl.sum(x_a.to(tl.float32), axis=1)
                if BITS == 4:
                    x_sum += tl.sum(x_b.to(tl.float32), axis=1)
                acc += x_sum[:, None] * o_a
        else:
            w_a = q_a.to(tl.float32) * s_a + o_a                              # dequantized in fp32
            acc = tl.dot(x_a, w_a.to(X.dtype.element_ty), acc, input_precision="ieee")
            if BITS == 4:
                w_b = q_b.to(tl.float32) * s_b + o_b
                acc = tl.dot(x_b, w_b.to(X.dtype.element_ty), acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], acc.to(OUT.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


_gemv = autotune(GEMV_CONFIGS, key=["M_BUCKET", "N", "K"])(_quant_matmul_kernel)
_gemm = autotune(GEMM_CONFIGS, key=["M_BUCKET", "N", "K"])(_quant_matmul_kernel)


def _check(x, qweight, scale, offset, bits, group_size, bias):
    check_float("x", x)
    check(bits in (4, 8), f"bits must be 4 or 8, got {bits}")
    want = torch.uint8 if bits == 4 else torch.int8
    check(qweight.dtype == want, f"int{bits} qweight must be {want}, got {qweight.dtype}", TypeError)
    check(qweight.dim() == 2, f"qweight must be 2-D, got {tuple(qweight.shape)}")
    n, k = qweight.shape[0], qweight.shape[1] * (2 if bits == 4 else 1)
    check(x.shape[-1] == k, f"x's last dimension {x.shape[-1]} does not match the weight's K = {k}")
    check(group_size > 0 and k % group_size == 0, f"group_size {group_size} must divide K = {k}")
    check_float("scale", scale)
    check(scale.shape == (n, k // group_size), f"scale must be [{n}, {k // group_size}], got {tuple(scale.shape)}")
    if offset is not None:
        check_float("offset", offset)
        check(offset.shape == scale.shape, f"offset must be {tuple(scale.shape)}, got {tuple(offset.shape)}")
    if bias is not None:
        check_float("bias", bias)
        check(bias.shape == (n,), f"bias must be [{n}], got {tuple(bias.shape)}")
    check_last_dim_contiguous("x", x)
    check_same_device(x=x, qweight=qweight, scale=scale, offset=offset, bias=bias)


@torch.library.custom_op("llama_fast_triton::quant_linear", mutates_args=())
def quant_linear_op(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                    bits: int, group_size: int, bias: torch.Tensor | None) -> torch.Tensor:
    _check(x, qweight, scale, offset, bits, group_size, bias)
    n = qweight.shape[0]
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    out = torch.empty(x.shape[:-1] + (n,), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    if k == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand_as(out))
    qweight, scale = qweight.contiguous(), scale.contiguous()
    offset = offset.contiguous() if offset is not None else scale       # dummy pointer when absent
    gemv = m <= GEMV_MAX_ROWS
    kernel = _gemv if gemv else _gemm
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_M"]))  # noqa: E731
    kernel[grid](x2, qweight, scale, offset, bias if bias is not None else scale, out, m, n, k, m_bucket(m),
                 x2.stride(0), BITS=bits, GROUP_SIZE=group_size, HAS_OFFSET=offset is not scale,
                 HAS_BIAS=bias is not None, SCALE_AFTER_DOT=gemv)
    return out


quant_linear_op.register_fake(fake.quant_linear)


def quant_linear(x, qweight, bias=None):
    """The llama_fast.ops.quant_linear contract for a llama_fast.quant.QuantizedWeight."""
    return quant_linear_op(x, qweight.qweight, qweight.scale, qweight.offset, qweight.bits, qweight.group_size,
                           bias)


def compile_cases() -> list[CompileCase]:
    """fp16 for every format and tiling; bf16 (the same code but for the dot's operand type) for the usual
    int4 g=128 only, to keep the check fast."""
    cases = []
    formats = [("fp16", 4, 32), ("fp16", 4, 128), ("fp16", 8, 32), ("fp16", 8, 128), ("bf16", 4, 128)]
    for dtype, bits, group in formats:
        sig = {"X": f"*{dtype}", "QW": "*u8" if bits == 4 else "*i8", "SCALE": f"*{dtype}",
               "OFFSET": f"*{dtype}", "BIAS": f"*{dtype}", "OUT": f"*{dtype}", "M": "i32", "N": "i32",
               "K": "i32", "M_BUCKET": "i32", "x_row_stride": "i64", "BITS": "constexpr",
               "GROUP_SIZE": "constexpr", "HAS_OFFSET": "constexpr", "HAS_BIAS": "constexpr",
               "SCALE_AFTER_DOT": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
               "BLOCK_K": "constexpr"}
        fixed = {"BITS": bits, "GROUP_SIZE": group, "HAS_OFFSET": bits == 4, "HAS_BIAS": False}
        cases.append(CompileCase(f"quant_gemv[{dtype},int{bits},g={group}]", _quant_matmul_kernel, sig,
                                 {**fixed, "SCALE_AFTER_DOT": True}, GEMV_CONFIGS))
        cases.append(CompileCase(f"quant_gemm[{dtype},int{bits},g={group}]", _quant_matmul_kernel, sig,
                                 {**fixed, "SCALE_AFTER_DOT": False}, GEMM_CONFIGS))
    return cases
