"""Rotary position embedding in place on q and k in one launch (HF rotate_half convention).

    out[:D/2] = x1 * cos - x2 * sin,   out[D/2:] = x2 * cos + x1 * sin,   x1 = x[:D/2], x2 = x[D/2:]

One program per token rotates all of its query heads and then all of its key heads, so cos/sin of the
token's position are loaded once. q and k may be strided views (e.g. slices of a fused QKV projection): only
the head dimension must be contiguous.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from llama_fast.ops import fake

from ._common import CompileCase, check, check_float, check_last_dim_contiguous, check_same_device


@triton.jit
def _rotate_heads(X, stride_h, n_heads, c, s, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    for h0 in range(0, n_heads, BLOCK_H):
        mask = (h0 + heads < n_heads) & (d < HALF)
        ptr = X + (h0 + heads) * stride_h + d
        x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptr, (x1 * c - x2 * s).to(X.dtype.element_ty), mask=mask)
        tl.store(ptr + HALF, (x2 * c + x1 * s).to(X.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(Q, K, POS, COS, SIN, T, HQ, HKV, max_pos,
                   q_stride_b, q_stride_t, q_stride_h, k_stride_b, k_stride_t, k_stride_h,
                   pos_stride_b, pos_stride_t,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0)
    b = (token // T).to(tl.int64)
    t = (token % T).to(tl.int64)
    pos = tl.load(POS + b * pos_stride_b + t * pos_stride_t).to(tl.int64)
    # The wrapper checks the range on the host when it can; out-of-range positions never read out of bounds.
    pos = tl.minimum(tl.maximum(pos, 0), max_pos - 1)
    d = tl.arange(0, BLOCK_D)[None, :]
    c = tl.load(COS + pos * HALF + d, mask=d < HALF, other=0.0)
    s = tl.load(SIN + pos * HALF + d, mask=d < HALF, other=0.0)
    _rotate_heads(Q + b * q_stride_b + t * q_stride_t, q_stride_h, HQ, c, s, HALF, BLOCK_H, BLOCK_D)
    _rotate_heads(K + b * k_stride_b + t * k_stride_t, k_stride_h, HKV, c, s, HALF, BLOCK_H, BLOCK_D)


def _check(q, k, positions, cos, sin):
    check_float("q", q)
    check_float("k", k)
    check(q.dim() == 4 and k.dim() == 4, f"q and k must be [B,T,H,D], got {tuple(q.shape)} and {tuple(k.shape)}")
    b, t, _, d = q.shape
    check(k.shape[:2] == (b, t) and k.shape[3] == d,
          f"k {tuple(k.shape)} must match q {tuple(q.shape)} in batch, tokens and head_dim")
    check(d % 2 == 0, f"head_dim must be even, got {d}")
    check(positions.shape == (b, t), f"positions must be [B,T] = {(b, t)}, got {tuple(positions.shape)}")
    check(positions.dtype in (torch.int32, torch.int64), f"positions must be int32 or int64, got {positions.dtype}",
          TypeError)
    for name, table in (("cos", cos), ("sin", sin)):
        check(table.dtype == torch.float32, f"{name} must be float32, got {table.dtype}", TypeError)
        check(table.dim() == 2 and table.shape[1] == d // 2,
              f"{name} must be [max_pos, {d // 2}], got {tuple(table.shape)}")
    check(cos.shape == sin.shape, f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ")
    check_last_dim_contiguous("q", q)
    check_last_dim_contiguous("k", k)
    check_same_device(q=q, k=k, positions=positions, cos=cos, sin=sin)
    if positions.numel() and not q.is_cuda:
        # On the GPU this check would cost a device sync per layer; the model's cache bounds positions there.
        lo, hi = int(positions.min()), int(positions.max())
        check(0 <= lo and hi < cos.shape[0], f"positions must lie in [0, {cos.shape[0]}), got [{lo}, {hi}]",
              IndexError)


@torch.library.custom_op("llama_fast_triton::rotary_", mutates_args=("q", "k"))
def rotary_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor) -> None:
    _check(q, k, positions, cos, sin)
    b, t, hq, d = q.shape
    if b * t == 0:
        return
    cos, sin = cos.contiguous(), sin.contiguous()
    block_h = min(triton.next_power_of_2(max(hq, k.shape[2])), 16)
    # No autotuning: the kernel works in place, and a tuner would rotate the inputs once per config it tries.
    # 4 warps cover 16 heads x 64 half-dims in 16-byte vectors.
    _rotary_kernel[(b * t,)](q, k, positions, cos, sin, t, hq, k.shape[2], cos.shape[0],
                             *q.stride()[:3], *k.stride()[:3], *positions.stride(),
                             HALF=d // 2, BLOCK_H=block_h, BLOCK_D=triton.next_power_of_2(d // 2), num_warps=4)


rotary_.register_fake(fake.rotary_)


def rotary(q, k, positions, cos, sin):
    """The llama_fast.ops.rotary contract: rotates q and k in place and returns them."""
    rotary_(q, k, positions, cos, sin)
    return q, k


def compile_cases() -> list[CompileCase]:
    sig = {"Q": "*bf16", "K": "*bf16", "POS": "*i64", "COS": "*fp32", "SIN": "*fp32", "T": "i32", "HQ": "i32",
           "HKV": "i32", "max_pos": "i32", **{n: "i64" for n in ("q_stride_b", "q_stride_t", "q_stride_h",
                                                               "k_stride_b", "k_stride_t", "k_stride_h",
                                                               "pos_stride_b", "pos_stride_t")},
           "HALF": "constexpr", "BLOCK_H": "constexpr", "BLOCK_D": "constexpr"}
    return [CompileCase(f"rotary[D={d}]", _rotary_kernel, sig, {"HALF": d // 2, "BLOCK_H": 16, "BLOCK_D": d // 2},
                        [triton.Config({}, num_warps=4)]) for d in (64, 128)]
