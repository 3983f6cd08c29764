"""Causal GQA attention: a FlashAttention-2 style prefill kernel and a split-K flash-decoding kernel.

Contract (llama_fast.ops.attention): q [B,Tq,Hq,D], k/v [B,Tk,Hkv,D]; keys 0..kv_lens[b]-1 are valid and
query i sits at position kv_lens[b]-Tq+i (bottom-right causal); a query row with no valid key gives zeros.
Softmax runs in fp32 with the online (running max / running sum) rescaling, in base 2: q is pre-scaled by
scale * log2(e) so every exponential is one exp2.

Prefill: one program per (block of BLOCK_M queries, query head); the kv head is head // group, so K/V are
read in place, never repeated. The key loop stops at the block's last causal key. Tuning is keyed on the
query count rounded up to a power of two (TQ_BUCKET), not on every prompt length.

Decode (few query rows): one program per (key split, batch, kv head) holds every query row of the GQA group
(Tq * group rows, padded to 16 for tl.dot) and streams its share of the keys once for all of them: each K/V
tile is loaded once per group, not once per query head. Splitting the keys over programs fills the GPU when
B * Hkv alone is far below the SM count (batch-1 decode of a 7B model: 32 programs for 108-132 SMs). Each
split writes an unnormalised partial output with its running max and sum; a reduce kernel merges them.
"""
from __future__ import annotations

import math

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
    num_sms,
)

LOG2E = 1.4426950408889634
# A finite "minus infinity" for the running max: a row whose keys are all masked keeps m = NEG_BIG and
# l = 0, and exp2(-inf - NEG_BIG) = 0 instead of the NaN that (-inf) - (-inf) would give.
NEG_BIG = tl.constexpr(-1.0e30)

# Prefill tiles. Q tile [BLOCK_M, D] and the fp32 accumulator stay in registers; K and V tiles [BLOCK_N, D]
# stream through shared memory, num_stages deep. fp16, D=128, 128x64 x 3 stages: 2 x 16 KB x 3 = 96 KB of
# shared memory (plus layout scratch: 128 KB reported), under the A100's 163 KB and the H100's 227 KB; 8 warps
# give each warp 16 query rows of the 128 (the mma M). With D=128, 4 warps holding 64 rows x 128 of fp32
# accumulator plus the Q tile exceed 255 registers on sm_80 and spill (.ci/check_triton_cubins.py), so the
# 4-warp 64-row tiles with 64-key tiles are for D <= 64 only. The first config is also the interpreter's.
PREFILL_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=4),
]
PREFILL_CONFIGS_SMALL_D = PREFILL_CONFIGS + [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=3),
]

# Decode is bandwidth-bound: the knobs are the key-tile length (bytes in flight per load) and the pipeline
# depth that hides HBM latency. 64 keys x D=128 x fp16 = 16 KB per K or V tile; 4 stages = 128 KB, which
# only the H100 holds with room to spare, so the A100 picks among the 2-3 stage configs.
DECODE_CONFIGS = [
    triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=4),
]

# Up to this many query rows per kv head (Tq * group) the decode kernel's single row tile holds them all.
DECODE_MAX_ROWS = 64


@triton.jit
def _prefill_kernel(Q, K, V, O, KV_LENS, qk_scale, TQ, TK, HQ, TQ_BUCKET,
                    q_sb, q_st, q_sh, k_sb, k_st, k_sh, v_sb, v_st, v_sh, o_sb, o_st, o_sh,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                    HAS_KV_LENS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HQ).to(tl.int64)
    h = bh % HQ
    kvh = (h // GROUP).to(tl.int64)
    kv_len = TK
    if HAS_KV_LENS:
        kv_len = tl.load(KV_LENS + b).to(tl.int32)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q_pos = kv_len - TQ + offs_m                                  # bottom-right aligned query positions
    q = tl.load(Q + b * q_sb + h * q_sh + offs_m[:, None] * q_st + offs_d[None, :],
                mask=(offs_m[:, None] < TQ) & d_mask[None, :], other=0.0)
    q = (q.to(tl.float32) * qk_scale).to(Q.dtype.element_ty)

    m_i = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = K + b * k_sb + kvh * k_sh
    v_base = V + b * v_sb + kvh * v_sh
    end = kv_len
    if CAUSAL:
        end = tl.minimum(kv_len, kv_len - TQ + (pid_m + 1) * BLOCK_M)   # the block's last query position + 1
    for start_n in range(0, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < kv_len
        k = tl.load(k_base + offs_n[:, None] * k_st + offs_d[None, :], mask=n_valid[:, None] & d_mask[None, :],
                    other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
        valid = n_valid[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= q_pos[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + offs_n[:, None] * v_st + offs_d[None, :], mask=n_valid[:, None] & d_mask[None, :],
                    other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(V.dtype.element_ty), v, input_precision="ieee")
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = tl.where(l_i[:, None] > 0, acc / l_safe[:, None], 0.0)   # rows without a valid key -> zeros
    tl.store(O + b * o_sb + h * o_sh + offs_m[:, None] * o_st + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < TQ) & d_mask[None, :])


_PREFILL_KEY = ["TQ_BUCKET", "HEAD_DIM", "GROUP"]
_prefill_small_d = autotune(PREFILL_CONFIGS_SMALL_D, _PREFILL_KEY)(_prefill_kernel)
_prefill_any_d = autotune(PREFILL_CONFIGS, _PREFILL_KEY)(_prefill_kernel)


@autotune(DECODE_CONFIGS, key=["HEAD_DIM", "GROUP", "ROWS_PAD"])
@triton.jit
def _decode_split_kernel(Q, K, V, ACC, ML, KV_LENS, qk_scale, TQ, TK, HKV, split_len,
                         q_sb, q_st, q_sh, k_sb, k_st, k_sh, v_sb, v_st, v_sh,
                         GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         CAUSAL: tl.constexpr, HAS_KV_LENS: tl.constexpr, ROWS_PAD: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    split = tl.program_id(0)
    n_splits = tl.num_programs(0)
    bkv = tl.program_id(1)
    b = (bkv // HKV).to(tl.int64)
    kvh = (bkv % HKV).to(tl.int64)
    kv_len = TK
    if HAS_KV_LENS:
        kv_len = tl.load(KV_LENS + b).to(tl.int32)

    # Row r of the tile is query token r // GROUP of query head kvh * GROUP + r % GROUP.
    rows = tl.arange(0, ROWS_PAD)
    t = rows // GROUP
    h = kvh * GROUP + rows % GROUP
    row_valid = t < TQ
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(Q + b * q_sb + t[:, None] * q_st + h[:, None] * q_sh + offs_d[None, :],
                mask=row_valid[:, None] & d_mask[None, :], other=0.0)
    q = (q.to(tl.float32) * qk_scale).to(Q.dtype.element_ty)
    q_pos = kv_len - TQ + t

    start = split * split_len
    # No causal bound on the key range: the last query row sits at kv_len - 1, so every valid key is seen by it.
    end = tl.minimum(start + split_len, kv_len)
    m_i = tl.full([ROWS_PAD], NEG_BIG, tl.float32)
    l_i = tl.zeros([ROWS_PAD], tl.float32)
    acc = tl.zeros([ROWS_PAD, BLOCK_D], tl.float32)
    k_base = K + b * k_sb + kvh * k_sh
    v_base = V + b * v_sb + kvh * v_sh
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < end
        k = tl.load(k_base + offs_n[:, None] * k_st + offs_d[None, :], mask=n_valid[:, None] & d_mask[None, :],
                    other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
        valid = n_valid[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= q_pos[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + offs_n[:, None] * v_st + offs_d[None, :], mask=n_valid[:, None] & d_mask[None, :],
                    other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(V.dtype.element_ty), v, input_precision="ieee")
        m_i = m_new
    # Partials: ACC [B*HKV, n_splits, ROWS_PAD, BLOCK_D] fp32, ML [B*HKV, n_splits, 2, ROWS_PAD] fp32.
    part = (bkv.to(tl.int64) * n_splits + split)
    tl.store(ACC + part * ROWS_PAD * BLOCK_D + rows[:, None] * BLOCK_D + offs_d[None, :], acc)
    tl.store(ML + part * 2 * ROWS_PAD + rows, m_i)
    tl.store(ML + part * 2 * ROWS_PAD + ROWS_PAD + rows, l_i)


@triton.jit
def _decode_reduce_kernel(ACC, ML, O, TQ, HKV, n_splits, o_sb, o_st, o_sh,
                          GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                          ROWS_PAD: tl.constexpr, BLOCK_S: tl.constexpr):
    # One program per (batch, kv head, query row of the group): merges the splits' partial softmaxes.
    bkv = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1)
    b = bkv // HKV
    kvh = bkv % HKV
    splits = tl.arange(0, BLOCK_S)
    s_mask = splits < n_splits
    part = bkv * n_splits + splits
    m = tl.load(ML + part * 2 * ROWS_PAD + row, mask=s_mask, other=NEG_BIG)
    l = tl.load(ML + part * 2 * ROWS_PAD + ROWS_PAD + row, mask=s_mask, other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.math.exp2(m - m_max)                                   # each split's rescale to the common max
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.load(ACC + part[:, None] * ROWS_PAD * BLOCK_D + row * BLOCK_D + offs_d[None, :],
                  mask=s_mask[:, None], other=0.0)
    num = tl.sum(acc * w[:, None], axis=0)
    den = tl.sum(l * w, axis=0)
    out = tl.where(den > 0, num / tl.where(den > 0, den, 1.0), 0.0)  # no valid key -> zeros
    t = row // GROUP
    h = kvh * GROUP + row % GROUP
    tl.store(O + b * o_sb + t * o_st + h * o_sh + offs_d, out.to(O.dtype.element_ty), mask=offs_d < HEAD_DIM)


def _check(q, k, v, kv_lens):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t)
        check(t.dim() == 4, f"{name} must be [B,T,H,D], got {tuple(t.shape)}")
        check_last_dim_contiguous(name, t)
    check(q.dtype == k.dtype == v.dtype, f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}", TypeError)
    b, _, hq, d = q.shape
    check(k.shape == v.shape, f"k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    check(k.shape[0] == b and k.shape[3] == d, f"k/v {tuple(k.shape)} must match q {tuple(q.shape)} in batch "
                                               "and head_dim")
    check(k.shape[2] > 0 and hq % k.shape[2] == 0, f"query heads ({hq}) must be a multiple of kv heads "
                                                    f"({k.shape[2]})")
    check_same_device(q=q, k=k, v=v, kv_lens=kv_lens)
    if kv_lens is not None:
        check(kv_lens.shape == (b,), f"kv_lens must be [B] = [{b}], got {tuple(kv_lens.shape)}")
        check(kv_lens.dtype in (torch.int32, torch.int64), f"kv_lens must be int32, got {kv_lens.dtype}", TypeError)
        if not q.is_cuda and b:
            # A device sync on the GPU; there the model's cache guarantees the bound.
            lo, hi = int(kv_lens.min()), int(kv_lens.max())
            check(0 <= lo and hi <= k.shape[1], f"kv_lens must lie in [0, {k.shape[1]}], got [{lo}, {hi}]")


def _lens(kv_lens, q):
    return kv_lens.contiguous() if kv_lens is not None else q.new_zeros(1, dtype=torch.int32)  # unused dummy


def prefill_attention(q, k, v, causal=True, kv_lens=None, scale=None):
    """The FlashAttention-2 style kernel for any number of query rows."""
    _check(q, k, v, kv_lens)
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    qk_scale = (d ** -0.5 if scale is None else scale) * LOG2E
    grid = lambda meta: (triton.cdiv(tq, meta["BLOCK_M"]), b * hq)  # noqa: E731
    kernel = _prefill_small_d if d <= 64 else _prefill_any_d
    kernel[grid](q, k, v, out, _lens(kv_lens, q), qk_scale, tq, tk, hq, triton.next_power_of_2(tq),
                          *_bth(q), *_bth(k), *_bth(v), *_bth(out),
                          GROUP=hq // hkv, HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), CAUSAL=causal,
                          HAS_KV_LENS=kv_lens is not None)
    return out


def _bth(t):
    """Strides of batch, token and head (the head dimension itself is contiguous)."""
    return t.stride(0), t.stride(1), t.stride(2)


def decode_num_splits(batch_kv_heads: int, tk: int, device: torch.device) -> int:
    """Enough key splits for about two programs per SM, with at least 128 keys per split (fewer keys make
    the reduce cost more than the split saves)."""
    want = math.ceil(2 * num_sms(device) / max(batch_kv_heads, 1))
    return max(1, min(want, math.ceil(tk / 128)))


def decode_attention(q, k, v, causal=True, kv_lens=None, scale=None, num_splits=None):
    """Split-K flash-decoding for few query rows per kv head (Tq * group <= DECODE_MAX_ROWS)."""
    _check(q, k, v, kv_lens)
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    check(tq * group <= DECODE_MAX_ROWS, f"decode attention holds at most {DECODE_MAX_ROWS} query rows per kv "
                                         f"head, got Tq * group = {tq * group}")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if num_splits is None:
        num_splits = decode_num_splits(b * hkv, tk, q.device)
    num_splits = max(1, min(num_splits, max(tk, 1)))
    split_len = math.ceil(max(tk, 1) / num_splits)
    rows_pad = max(16, triton.next_power_of_2(tq * group))      # tl.dot needs M >= 16
    block_d = triton.next_power_of_2(d)
    acc = torch.empty((b * hkv, num_splits, rows_pad, block_d), dtype=torch.float32, device=q.device)
    ml = torch.empty((b * hkv, num_splits, 2, rows_pad), dtype=torch.float32, device=q.device)
    qk_scale = (d ** -0.5 if scale is None else scale) * LOG2E
    _decode_split_kernel[(num_splits, b * hkv)](
        q, k, v, acc, ml, _lens(kv_lens, q), qk_scale, tq, tk, hkv, split_len, *_bth(q), *_bth(k), *_bth(v),
        GROUP=group, HEAD_DIM=d, BLOCK_D=block_d, CAUSAL=causal, HAS_KV_LENS=kv_lens is not None,
        ROWS_PAD=rows_pad)
    _decode_reduce_kernel[(b * hkv, tq * group)](
        acc, ml, out, tq, hkv, num_splits, *_bth(out), GROUP=group, HEAD_DIM=d, BLOCK_D=block_d,
        ROWS_PAD=rows_pad, BLOCK_S=triton.next_power_of_2(num_splits), num_warps=4)
    return out


@torch.library.custom_op("llama_fast_triton::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              kv_lens: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    group = q.shape[2] // max(k.shape[2], 1) if q.dim() == 4 and k.dim() == 4 else 1
    if q.dim() == 4 and q.shape[1] * group <= DECODE_MAX_ROWS:
        return decode_attention(q, k, v, causal, kv_lens, scale)
    return prefill_attention(q, k, v, causal, kv_lens, scale)


attention.register_fake(fake.attention)


def compile_cases() -> list[CompileCase]:
    strides = lambda *names: {f"{p}_s{x}": "i64" for p in names for x in "bth"}  # noqa: E731
    cases = []
    for dtype, dims in (("fp16", (64, 128)), ("bf16", (128,))):       # bf16: the register-heaviest D only
        for d in dims:
            sig = {"Q": f"*{dtype}", "K": f"*{dtype}", "V": f"*{dtype}", "O": f"*{dtype}", "KV_LENS": "*i32",
                   "qk_scale": "fp32", "TQ": "i32", "TK": "i32", "HQ": "i32", "TQ_BUCKET": "i32",
                   **strides("q", "k", "v", "o"),
                   "GROUP": "constexpr", "HEAD_DIM": "constexpr", "BLOCK_D": "constexpr", "CAUSAL": "constexpr",
                   "HAS_KV_LENS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
            cases.append(CompileCase(f"attention_prefill[{dtype},D={d}]", _prefill_kernel, sig,
                                     {"GROUP": 4, "HEAD_DIM": d, "BLOCK_D": d, "CAUSAL": True, "HAS_KV_LENS": True},
                                     PREFILL_CONFIGS_SMALL_D if d <= 64 else PREFILL_CONFIGS))
            sig = {"Q": f"*{dtype}", "K": f"*{dtype}", "V": f"*{dtype}", "ACC": "*fp32", "ML": "*fp32",
                   "KV_LENS": "*i32", "qk_scale": "fp32", "TQ": "i32", "TK": "i32", "HKV": "i32",
                   "split_len": "i32", **strides("q", "k", "v"),
                   "GROUP": "constexpr", "HEAD_DIM": "constexpr", "BLOCK_D": "constexpr", "CAUSAL": "constexpr",
                   "HAS_KV_LENS": "constexpr", "ROWS_PAD": "constexpr", "BLOCK_N": "constexpr"}
            for group in (1, 8):
                cases.append(CompileCase(f"attention_decode[{dtype},D={d},group={group}]",
                                         jit_function(_decode_split_kernel), sig,
                                         {"GROUP": group, "HEAD_DIM": d, "BLOCK_D": d, "CAUSAL": True,
                                          "HAS_KV_LENS": True, "ROWS_PAD": 16}, DECODE_CONFIGS))
        sig = {"ACC": "*fp32", "ML": "*fp32", "O": f"*{dtype}", "TQ": "i32", "HKV": "i32", "n_splits": "i32",
               **strides("o"), "GROUP": "constexpr", "HEAD_DIM": "constexpr", "BLOCK_D": "constexpr",
               "ROWS_PAD": "constexpr", "BLOCK_S": "constexpr"}
        cases.append(CompileCase(f"attention_decode_reduce[{dtype}]", _decode_reduce_kernel, sig,
                                 {"GROUP": 4, "HEAD_DIM": 128, "BLOCK_D": 128, "ROWS_PAD": 16, "BLOCK_S": 64},
                                 [triton.Config({}, num_warps=4)]))
    return cases
