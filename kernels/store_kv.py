"""Writes new keys and values into the static KV cache: k_cache[b, slots[b, t]] = k[b, t] (same for v).

One program per (batch, token) copies that token's Hkv x D keys and values; negative slots (left padding)
write nothing. k and v may be strided views (slices of a fused QKV projection).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from llama_fast.ops import fake

from ._common import CompileCase, check, check_last_dim_contiguous, check_same_device


@triton.jit
def _store_kv_kernel(KC, VC, K, V, SLOTS, T, S, H, D,
                     kc_sb, kc_ss, kc_sh, vc_sb, vc_ss, vc_sh, k_sb, k_st, k_sh, v_sb, v_st, v_sh,
                     slot_sb, slot_st, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0)
    b = (token // T).to(tl.int64)
    t = (token % T).to(tl.int64)
    slot = tl.load(SLOTS + b * slot_sb + t * slot_st).to(tl.int64)
    if (slot >= 0) & (slot < S):          # the host checks the range when it can; never write out of bounds
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < H) & (d < D)
        k = tl.load(K + b * k_sb + t * k_st + h * k_sh + d, mask=mask)
        v = tl.load(V + b * v_sb + t * v_st + h * v_sh + d, mask=mask)
        tl.store(KC + b * kc_sb + slot * kc_ss + h * kc_sh + d, k.to(KC.dtype.element_ty), mask=mask)
        tl.store(VC + b * vc_sb + slot * vc_ss + h * vc_sh + d, v.to(VC.dtype.element_ty), mask=mask)


@torch.library.custom_op("llama_fast_triton::store_kv_", mutates_args=("k_cache", "v_cache"))
def store_kv_(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              slots: torch.Tensor) -> None:
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v)):
        check(t.dim() == 4, f"{name} must be 4-D [B,S|T,Hkv,D], got {tuple(t.shape)}")
        check_last_dim_contiguous(name, t)
    check(k_cache.shape == v_cache.shape, f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    check(k.shape == v.shape, f"k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    b, t, h, d = k.shape
    check(k_cache.shape[0] == b and k_cache.shape[2:] == (h, d),
          f"cache {tuple(k_cache.shape)} does not match k/v {tuple(k.shape)} in batch, heads or head_dim")
    check(slots.shape == (b, t), f"slots must be [B,T] = {(b, t)}, got {tuple(slots.shape)}")
    check(slots.dtype in (torch.int32, torch.int64), f"slots must be int32 or int64, got {slots.dtype}", TypeError)
    check_same_device(k_cache=k_cache, v_cache=v_cache, k=k, v=v, slots=slots)
    if slots.numel() and not k.is_cuda:
        hi = int(slots.max())     # on the GPU a device sync; the model's cache raises on overflow there
        check(hi < k_cache.shape[1], f"slot {hi} is past the cache length {k_cache.shape[1]}", IndexError)
    if b * t == 0:
        return
    _store_kv_kernel[(b * t,)](k_cache, v_cache, k, v, slots, t, k_cache.shape[1], h, d,
                               *k_cache.stride()[:3], *v_cache.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                               *slots.stride(), BLOCK_H=triton.next_power_of_2(h), BLOCK_D=triton.next_power_of_2(d),
                               num_warps=4)


store_kv_.register_fake(fake.store_kv_)


def store_kv(k_cache, v_cache, k, v, slots):
    store_kv_(k_cache, v_cache, k, v, slots)


def compile_cases() -> list[CompileCase]:
    sig = {"KC": "*bf16", "VC": "*bf16", "K": "*bf16", "V": "*bf16", "SLOTS": "*i32", "T": "i32", "S": "i32",
           "H": "i32", "D": "i32",
           **{f"{p}_s{x}": "i64" for p in ("kc", "vc") for x in "bsh"},
           **{f"{p}_s{x}": "i64" for p in ("k", "v") for x in "bth"},
           "slot_sb": "i64", "slot_st": "i64", "BLOCK_H": "constexpr", "BLOCK_D": "constexpr"}
    return [CompileCase("store_kv", _store_kv_kernel, sig, {"BLOCK_H": 8, "BLOCK_D": 128},
                        [triton.Config({}, num_warps=4)])]
