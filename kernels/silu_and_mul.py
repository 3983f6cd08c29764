"""SwiGLU activation: silu_and_mul, [..., 2I] = [gate | up] -> silu(gate) * up [..., I], an elementwise kernel
over (row, column block)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from llama_fast.ops import fake

from ._common import CompileCase, autotune, check, check_float, check_last_dim_contiguous, jit_function

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


silu_and_mul.register_fake(fake.silu_and_mul)


def compile_cases() -> list[CompileCase]:
    cases = []
    for dtype in ("bf16",):                     # fp16 compiles to the same instructions but for conversions
        sig = {"GU": f"*{dtype}", "OUT": f"*{dtype}", "I": "i32", "gu_row_stride": "i64", "BLOCK": "constexpr"}
        cases.append(CompileCase(f"silu_and_mul[{dtype}]", jit_function(_silu_and_mul_kernel), sig, {},
                                 SILU_CONFIGS))
    return cases
