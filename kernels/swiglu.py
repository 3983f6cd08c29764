"""SwiGLU activation: silu(gate) * up, alone and fused into the gate/up projection.

silu_and_mul: [..., 2I] = [gate | up] -> [..., I], an elementwise kernel over (row, column block).
gate_up_silu: x [..., K] @ w_gate_up[2I, K].T -> silu(gate) * up [..., I] in one GEMM: each program computes
the matching gate and up tiles (rows n and I + n of the weight) and applies the activation in registers,
so the [.., 2I] intermediate never reaches memory (it is the largest activation of a Llama layer).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (CompileCase, autotune, check, check_float, check_last_dim_contiguous,
                      check_same_device, jit_function, m_bucket)

# Elementwise: 1024-element blocks are 2 KB of fp16 per operand, 8 elements (one 16-byte vector) per thread
# at 4 warps; larger blocks for long rows cut the program count without hurting occupancy.
SILU_CONFIGS = [triton.Config({"BLOCK": 1024}, num_warps=4), triton.Config({"BLOCK": 2048}, num_warps=8),
                triton.Config({"BLOCK": 4096}, num_warps=8)]


@autotune(SILU_CONFIGS, key=["I"])
@triton.jit
def _silu_and_mul_kernel(GU, OUT, I, gu_row_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    gate = tl.load(GU + row * gu_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(GU + row * gu_row_stride + I + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(OUT + row * I + cols, out.to(OUT.dtype.element_ty), mask=mask)


@torch.library.custom_op("llama_fast_triton::silu_and_mul", mutates_args=())
def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    check_float("gate_up", gate_up)
    check(gate_up.dim() >= 1 and gate_up.shape[-1] % 2 == 0,
          f"gate_up's last dimension must be even ([gate | up]), got {tuple(gate_up.shape)}")
    check_last_dim_contiguous("gate_up", gate_up)
    i = gate_up.shape[-1] // 2
    gu = gate_up.reshape(-1, 2 * i)
    out = torch.empty(gate_up.shape[:-1] + (i,), dtype=gate_up.dtype, device=gate_up.device)
    if out.numel():
        grid = lambda meta: (gu.shape[0], triton.cdiv(i, meta["BLOCK"]))  # noqa: E731
        _silu_and_mul_kernel[grid](gu, out, i, gu.stride(0))
    return out


@silu_and_mul.register_fake
def _(gate_up):
    return gate_up.new_empty(gate_up.shape[:-1] + (gate_up.shape[-1] // 2,))


# Fused gate/up GEMM. Two accumulators (gate and up) double the registers of a plain GEMM tile, so tiles
# are one notch smaller than a cuBLAS-class GEMM: 128x64 (x2 accumulators) with BLOCK_K 64 holds
# (128 + 2 x 64) x 64 x 2 B = 32 KB per stage, x 3-4 stages = 96-128 KB of shared memory: fits the A100
# (163 KB) and the H100 (227 KB). The first config (16 rows) is the decode shape: a weight-streaming GEMV
# where more CTAs (small BLOCK_N) matter more than reuse.
GATE_UP_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=4),
]


@autotune(GATE_UP_CONFIGS, key=["M_BUCKET", "I", "K"])
@triton.jit
def _gate_up_silu_kernel(X, WG, WU, OUT, M, I, K, M_BUCKET, x_row_stride,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < I
    x_ptrs = X + offs_m[:, None].to(tl.int64) * x_row_stride + offs_k[None, :]
    w_offs = offs_n[None, :].to(tl.int64) * K + offs_k[:, None]                  # [BLOCK_K, BLOCK_N] = w.T
    wg_ptrs = WG + w_offs
    wu_ptrs = WU + w_offs
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k + k0 < K
        x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        wg = tl.load(wg_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        wu = tl.load(wu_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc_g = tl.dot(x, wg, acc_g, input_precision="ieee")
        acc_u = tl.dot(x, wu, acc_u, input_precision="ieee")
        x_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K
        wu_ptrs += BLOCK_K
    out = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(OUT + offs_m[:, None].to(tl.int64) * I + offs_n[None, :], out.to(OUT.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@torch.library.custom_op("llama_fast_triton::gate_up_silu", mutates_args=())
def gate_up_silu(x: torch.Tensor, w_gate_up: torch.Tensor) -> torch.Tensor:
    """silu(x @ w_gate_up[:I].T) * (x @ w_gate_up[I:].T) for w_gate_up [2I, K] = [gate; up], in one GEMM
    with fp32 accumulation; the activation is applied before rounding (more exact than linear then
    silu_and_mul)."""
    check_float("x", x)
    check(w_gate_up.dtype == x.dtype, f"w_gate_up dtype {w_gate_up.dtype} differs from x dtype {x.dtype}",
          TypeError)
    check(w_gate_up.dim() == 2 and w_gate_up.shape[0] % 2 == 0 and w_gate_up.shape[1] == x.shape[-1],
          f"w_gate_up must be [2I, K] with K = {x.shape[-1]}, got {tuple(w_gate_up.shape)}")
    check_same_device(x=x, w_gate_up=w_gate_up)
    check_last_dim_contiguous("x", x)
    w = w_gate_up.contiguous()
    i, k = w.shape[0] // 2, w.shape[1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    out = torch.empty(x.shape[:-1] + (i,), dtype=x.dtype, device=x.device)
    if out.numel():
        grid = lambda meta: (triton.cdiv(i, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_M"]))  # noqa: E731
        _gate_up_silu_kernel[grid](x2, w[:i], w[i:], out, m, i, k, m_bucket(m), x2.stride(0))
    return out


@gate_up_silu.register_fake
def _(x, w_gate_up):
    return x.new_empty(x.shape[:-1] + (w_gate_up.shape[0] // 2,))


def compile_cases() -> list[CompileCase]:
    cases = []
    for dtype in ("bf16",):                     # fp16 compiles to the same instructions but for conversions
        sig = {"GU": f"*{dtype}", "OUT": f"*{dtype}", "I": "i32", "gu_row_stride": "i64", "BLOCK": "constexpr"}
        cases.append(CompileCase(f"silu_and_mul[{dtype}]", jit_function(_silu_and_mul_kernel), sig, {},
                                 SILU_CONFIGS))
        sig = {"X": f"*{dtype}", "WG": f"*{dtype}", "WU": f"*{dtype}", "OUT": f"*{dtype}", "M": "i32", "I": "i32", "K": "i32",
               "M_BUCKET": "i32", "x_row_stride": "i64",
               "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
        cases.append(CompileCase(f"gate_up_silu[{dtype}]", jit_function(_gate_up_silu_kernel), sig, {},
                                 GATE_UP_CONFIGS))
    return cases
