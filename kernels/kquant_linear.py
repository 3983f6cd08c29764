"""x @ W^T for W in ggml's K-quant / Q5_0 / Q5_1 / Q8_0 blocks read as stored (llama_fast.kquants; the byte layouts are
those of csrc/common/ggml_blocks.h, which the CPU and CUDA kernels share):

    out[m, n] = sum_k x[m, k] * (code[n, k] * scale[n, k // 16] + offset[n, k // 16])   (+ bias[n])

Each program takes BLOCK_N weight rows and BLOCK_M activation rows and walks K in steps of SUB weights (64 of
a 256-weight K-quant block: a whole block as one [BLOCK_N, 256] fp32 tile spilled registers on sm_80 / sm_90;
32 = one Q5_0 / Q5_1 / Q8_0 block): it gathers the bytes, decodes every weight's integer code and its
sub-block's (scale, offset) in fp32 (the products gguf.quants computes, multiply then add), and accumulates
x @ w^T with an fp32 tl.dot (ieee precision: no tf32 rounding of the weights). A weight of several row
segments of different types (Q4_K_M's fused q/k/v) is one launch per segment, each writing its columns.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from llama_fast.ops import fake

from ._common import CompileCase, check, check_same_device

# ids of llama_fast.kquants.TYPE_IDS
Q4_K, Q5_K, Q6_K, Q2_K, Q3_K, Q5_0, Q5_1, Q8_0 = range(8)
BLOCK_WEIGHTS = {Q4_K: 256, Q5_K: 256, Q6_K: 256, Q2_K: 256, Q3_K: 256, Q5_0: 32, Q5_1: 32, Q8_0: 32}
BLOCK_BYTES = {Q4_K: 144, Q5_K: 176, Q6_K: 210, Q2_K: 84, Q3_K: 110, Q5_0: 22, Q5_1: 24, Q8_0: 34}
GEMV_MAX_ROWS = 16
# (BLOCK_M, BLOCK_N, num_warps): decode pads M to the 16 of the mma shape; prefill reuses a weight tile over
# 64 rows. A 256-weight block decoded for 32 rows is an [32, 256] fp32 tile: 64 registers per thread at 4 warps.
GEMV_CONFIG = (16, 32, 4)
GEMM_CONFIG = (64, 32, 8)


@triton.jit
def _byte(base, off, mask):
    return tl.load(base + off, mask=mask, other=0).to(tl.int32)


@triton.jit
def _f16(base, off, mask):
    """The little-endian fp16 at byte `off` of each row's block, as fp32 (exact)."""
    bits = _byte(base, off, mask) | (_byte(base, off + 1, mask) << 8)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _decode(b, e, mask, TYPE: tl.constexpr):
    """b: [BLOCK_N, 1] pointers to one block per row; e: [1, BW] weight indices. -> (code, scale, offset) fp32
    [BLOCK_N, BW]: the weight is code * scale + offset (ggml_blocks.h: block_code, block_scales)."""
    if TYPE == 0 or TYPE == 1:  # Q4_K / Q5_K
        j = e // 32
        a = _byte(b, 4 + j, mask)
        bb = _byte(b, 8 + j, mask)
        c = _byte(b, j, mask)
        sc = tl.where(j < 4, a & 63, (bb & 0x0F) | ((c >> 6) << 4))
        mn = tl.where(j < 4, bb & 63, (bb >> 4) | ((a >> 6) << 4))
        scale = _f16(b, 0, mask) * sc.to(tl.float32)
        offset = -(_f16(b, 2, mask) * mn.to(tl.float32))
        qs_at = 16 if TYPE == 0 else 48
        q = (_byte(b, qs_at + 32 * (e // 64) + (e % 32), mask) >> (4 * ((e // 32) % 2))) & 0x0F
        if TYPE == 1:
            q = q | (((_byte(b, 16 + (e % 32), mask) >> (e // 32)) & 1) << 4)
    elif TYPE == 2:  # Q6_K
        half = e // 128
        g = (e // 32) % 4
        l = e % 32
        low = (_byte(b, 64 * half + 32 * (g % 2) + l, mask) >> (4 * (g // 2))) & 0x0F
        high = (_byte(b, 128 + 32 * half + l, mask) >> (2 * g)) & 3
        q = (low | (high << 4)) - 32
        s = _byte(b, 192 + e // 16, mask)
        scale = _f16(b, 208, mask) * tl.where(s >= 128, s - 256, s).to(tl.float32)
        offset = tl.full(q.shape, -0.0, tl.float32)
    elif TYPE == 3:  # Q2_K
        half = e // 128
        g = (e // 32) % 4
        q = (_byte(b, 16 + 32 * half + e % 32, mask) >> (2 * g)) & 3
        s = _byte(b, e // 16, mask)
        scale = _f16(b, 80, mask) * (s & 0x0F).to(tl.float32)
        offset = -(_f16(b, 82, mask) * (s >> 4).to(tl.float32))
    elif TYPE == 4:  # Q3_K
        half = e // 128
        g = (e // 32) % 4
        low = (_byte(b, 32 + 32 * half + e % 32, mask) >> (2 * g)) & 3
        hbit = (_byte(b, e % 32, mask) >> (e // 32)) & 1
        q = low - 4 * (1 - hbit)
        j = e // 16
        sl = (_byte(b, 96 + j % 8, mask) >> (4 * (j // 8))) & 0x0F
        sh = (_byte(b, 104 + j % 4, mask) >> (2 * (j // 4))) & 3
        scale = _f16(b, 108, mask) * ((sl | (sh << 4)) - 32).to(tl.float32)
        offset = tl.full(q.shape, -0.0, tl.float32)
    elif TYPE == 7:  # Q8_0: d, then 32 int8 codes
        c = _byte(b, 2 + e, mask)
        q = tl.where(c >= 128, c - 256, c)
        scale = tl.broadcast_to(_f16(b, 0, mask), q.shape)
        offset = tl.full(q.shape, -0.0, tl.float32)
    else:  # Q5_0 / Q5_1: qs low nibbles = weights 0..15, high = 16..31; bit e of the u32 qh = the 5th bit
        start = 2 if TYPE == 5 else 4
        low = (_byte(b, start + 4 + e % 16, mask) >> (4 * (e // 16))) & 0x0F
        high = (_byte(b, start + e // 8, mask) >> (e % 8)) & 1
        q = low | (high << 4)
        scale = tl.broadcast_to(_f16(b, 0, mask), q.shape)
        if TYPE == 5:
            q = q - 16
            offset = tl.full(q.shape, -0.0, tl.float32)
        else:
            offset = tl.broadcast_to(_f16(b, 2, mask), q.shape)
    return q.to(tl.float32), scale, offset


@triton.jit
def _kquant_matmul_kernel(X, W, BIAS, OUT, M, N, K, row_bytes, x_row_stride, out_row_stride,
                          TYPE: tl.constexpr, BW: tl.constexpr, BB: tl.constexpr, SUB: tl.constexpr,
                          HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    e0 = tl.arange(0, SUB)[None, :]
    n_mask = (rn < N)[:, None]
    m_mask = (rm < M)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rows = W + rn[:, None].to(tl.int64) * row_bytes
    for kk in range(0, K, SUB):
        blk = kk // BW
        e = kk % BW + e0                                   # weight indices within the block
        code, scale, offset = _decode(rows + blk * BB, e, n_mask, TYPE)
        w = code * scale + offset                          # [BLOCK_N, SUB] fp32, exact
        x = tl.load(X + rm[:, None].to(tl.int64) * x_row_stride + kk + e0, mask=m_mask, other=0.0)
        acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    out = OUT + rm[:, None].to(tl.int64) * out_row_stride + rn[None, :]
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=m_mask & (rn < N)[None, :])


def _check(x, blocks, types, bias):
    check(x.dtype in (torch.float32, torch.float16, torch.bfloat16), f"x must be fp32/fp16/bf16, got {x.dtype}")
    check(len(blocks) == len(types) and len(blocks) > 0, "need one type per block tensor")
    k = x.shape[-1]
    for b, t in zip(blocks, types):
        check(t in BLOCK_WEIGHTS, f"unknown block type id {t}")
        check(b.dtype == torch.uint8 and b.dim() == 2, f"blocks must be 2-D uint8, got {b.dtype} {tuple(b.shape)}")
        check(k % BLOCK_WEIGHTS[t] == 0 and b.shape[1] == k // BLOCK_WEIGHTS[t] * BLOCK_BYTES[t],
              f"blocks {tuple(b.shape)} of type id {t} do not hold rows of K={k}")
    n = sum(b.shape[0] for b in blocks)
    check(bias is None or tuple(bias.shape) == (n,), f"bias must be [{n}]")
    check_same_device(x=x, bias=bias, **{f"blocks{i}": b for i, b in enumerate(blocks)})


@torch.library.custom_op("llama_fast_triton::kquant_linear", mutates_args=())
def kquant_linear_op(x: torch.Tensor, blocks: list[torch.Tensor], types: list[int],
                     bias: torch.Tensor | None) -> torch.Tensor:
    _check(x, blocks, types, bias)
    k = x.shape[-1]
    n = sum(b.shape[0] for b in blocks)
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out.reshape(x.shape[:-1] + (n,))
    block_m, block_n, warps = GEMV_CONFIG if m <= GEMV_MAX_ROWS else GEMM_CONFIG
    col = 0
    for b, t in zip(blocks, types):
        rows = b.shape[0]
        if rows:
            seg_out = out[:, col:col + rows]
            seg_bias = bias[col:col + rows] if bias is not None else x2
            grid = (triton.cdiv(rows, block_n), triton.cdiv(m, block_m))
            _kquant_matmul_kernel[grid](x2, b.contiguous(), seg_bias, seg_out, m, rows, k, b.shape[1], x2.stride(0),
                                        out.stride(0), TYPE=t, BW=BLOCK_WEIGHTS[t], BB=BLOCK_BYTES[t],
                                        SUB=min(64, BLOCK_WEIGHTS[t]),
                                        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
                                        num_warps=warps)
        col += rows
    return out.reshape(x.shape[:-1] + (n,))


kquant_linear_op.register_fake(fake.kquant_linear)


def kquant_linear(x, weight, bias=None):
    """The llama_fast.ops.kquant_linear contract for a llama_fast.kquants.KQuantWeight."""
    from llama_fast.kquants import TYPE_IDS
    return kquant_linear_op(x, [s.blocks for s in weight.segments], [TYPE_IDS[s.kind] for s in weight.segments],
                            bias)


def compile_cases() -> list[CompileCase]:
    """Every block type, decode and prefill tilings, fp16 activations (bf16 and fp32 differ only in the load)."""
    cases = []
    for t in BLOCK_WEIGHTS:
        sig = {"X": "*fp16", "W": "*u8", "BIAS": "*fp16", "OUT": "*fp16", "M": "i32", "N": "i32", "K": "i32",
               "row_bytes": "i32", "x_row_stride": "i64", "out_row_stride": "i64", "TYPE": "constexpr",
               "BW": "constexpr", "BB": "constexpr", "SUB": "constexpr", "HAS_BIAS": "constexpr",
               "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
        for name, (bm, bn, warps) in (("gemv", GEMV_CONFIG), ("gemm", GEMM_CONFIG)):
            cases.append(CompileCase(f"kquant_{name}[type={t}]", _kquant_matmul_kernel, sig,
                                     {"TYPE": t, "BW": BLOCK_WEIGHTS[t], "BB": BLOCK_BYTES[t],
                                      "SUB": min(64, BLOCK_WEIGHTS[t]), "HAS_BIAS": False},
                                     [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps)]))
    return cases
