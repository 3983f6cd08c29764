"""RMSNorm and fused residual-add + RMSNorm: one program per row, the whole row in registers.

    y = weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)        (statistics in fp32, as transformers)

A row of a Llama hidden state (2-8 K elements) fits in registers, so one read of x and one write of y is
the minimum traffic; the kernel is bandwidth-bound and the only tuning knob is the warp count per row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from llama_fast.ops import fake

from ._common import (
    CompileCase,
    autotune,
    check,
    check_float,
    check_last_dim_contiguous,
    check_same_device,
    jit_function,
)

# num_warps per row. A row of 4096 fp16 is 8 KB: 4 warps give 16 elements (two 16-byte loads) per thread;
# 8 and 16 warps suit 8K-16K rows, where fewer threads would need too many registers. Rows are independent
# CTAs, so occupancy comes from the number of rows, not from the config.
CONFIGS = [triton.Config({}, num_warps=w) for w in (4, 8, 16)]


@autotune(CONFIGS, key=["H"])
@triton.jit
def _rms_norm_kernel(X, R, W, Y, RES_OUT, H, x_row_stride, r_row_stride, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(X + row * x_row_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # Added in fp32 and rounded to the activation dtype: exactly PyTorch's `x + residual`.
        r = tl.load(R + row * r_row_stride + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(RES_OUT + row * H + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=0) / H + eps)
    normed = (xf * inv_rms).to(X.dtype.element_ty)      # transformers rounds before the weight multiply
    w = tl.load(W + cols, mask=mask, other=0.0)
    y = normed.to(tl.float32) * w.to(tl.float32)
    tl.store(Y + row * H + cols, y.to(Y.dtype.element_ty), mask=mask)


def _rows(name: str, t: torch.Tensor, h: int) -> torch.Tensor:
    check_last_dim_contiguous(name, t)
    return t.reshape(-1, h)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    check_float("x", x)
    check(weight.dtype == x.dtype, f"weight dtype {weight.dtype} differs from x dtype {x.dtype} (the activations' "
                                   f"dtype)", TypeError)
    check(x.dim() >= 1 and x.shape[-1] > 0, f"x must have a non-empty last dimension, got {tuple(x.shape)}")
    h = x.shape[-1]
    check(weight.shape == (h,), f"weight must have shape ({h},) to match x {tuple(x.shape)}, got "
                                f"{tuple(weight.shape)}")
    check_same_device(x=x, weight=weight, residual=residual)
    weight = weight.contiguous()
    x2 = _rows("x", x, h)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if residual is not None:
        check(residual.shape == x.shape and residual.dtype == x.dtype,
              f"residual must match x ({tuple(x.shape)}, {x.dtype}), got {tuple(residual.shape)}, {residual.dtype}")
        r2 = _rows("residual", residual, h)
        new_residual = torch.empty_like(x, memory_format=torch.contiguous_format)
    else:
        r2, new_residual = x2, out   # unused by the kernel when HAS_RESIDUAL is False
    rows = x2.shape[0]
    if rows > 0:
        _rms_norm_kernel[(rows,)](x2, r2, weight, out, new_residual, h, x2.stride(0), r2.stride(0), eps,
                                  HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(h))
    return out, new_residual


@torch.library.custom_op("llama_fast_triton::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return _launch(x, None, weight, eps)[0]


rms_norm.register_fake(fake.rms_norm)


@torch.library.custom_op("llama_fast_triton::fused_add_rms_norm", mutates_args=())
def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(x, residual, weight, eps)


fused_add_rms_norm.register_fake(fake.fused_add_rms_norm)


def compile_cases() -> list[CompileCase]:
    sig = {"X": "*fp16", "R": "*fp16", "W": "*fp16", "Y": "*fp16", "RES_OUT": "*fp16", "H": "i32",
           "x_row_stride": "i64", "r_row_stride": "i64", "eps": "fp32",
           "HAS_RESIDUAL": "constexpr", "BLOCK": "constexpr"}
    fn = jit_function(_rms_norm_kernel)
    return [CompileCase(f"rms_norm[H={h},residual={res}]", fn, sig, {"HAS_RESIDUAL": res, "BLOCK": h}, CONFIGS)
            for h in (1024, 8192) for res in (False, True)]
