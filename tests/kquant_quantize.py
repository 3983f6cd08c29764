"""A plain K-quant quantizer (numpy) for test fixtures, written from the block layouts of llama_fast.kquants /
llama.cpp's ggml-common.h: Q4_K, Q5_K, Q6_K, Q3_K, Q2_K super-blocks of 256 weights.

Round to nearest with each sub-block's range (min/max or absmax) and the sub-block scales themselves quantized
to the format's 4/6/8-bit integers under one fp16 super-block scale; it does not do llama.cpp's iterative
scale search (make_qkx2_quants etc.), so its error is somewhat larger than llama.cpp's, but every file it writes
is a valid K-quant file (gguf.quants.dequantize reads it; tests/test_kquant_fixtures.py checks the error).
Used only when llama-cpp-python's llama_model_quantize is not installed (tests/data/make_kquant_fixtures.py).
"""
from __future__ import annotations

import numpy as np

QK_K = 256


def _f16(values: np.ndarray) -> np.ndarray:
    """[B] float -> [B, 2] uint8 (little-endian fp16)."""
    return values.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _safe_div(a, b):
    return np.divide(a, b, out=np.zeros_like(a, dtype=np.float32), where=b != 0)


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins [B, 8] -> Q4_K / Q5_K's 12 bytes (the inverse of kquants.k_scale_min)."""
    out = np.zeros((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = (mn[:, 0:4] & 63) | ((mn[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((mn[:, 4:8] & 0x0F) << 4)
    return out


def _affine(x: np.ndarray, levels: int, scale_bits: int):
    """x [B, S, L] -> (d, dmin [B] fp16-rounded, sc, mn [B, S] ints, q [B, S, L] in 0..levels) with
    x ~ d*sc*q - dmin*mn."""
    lo = np.minimum(x.min(-1), 0.0)
    hi = x.max(-1)
    top = (1 << scale_bits) - 1
    s = (hi - lo) / levels
    d = (s.max(-1) / top).astype(np.float16).astype(np.float32)
    dmin = ((-lo).max(-1) / top).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(_safe_div(s, d[:, None])), 0, top).astype(np.uint8)
    mn = np.clip(np.rint(_safe_div(-lo, dmin[:, None])), 0, top).astype(np.uint8)
    step = d[:, None] * sc
    q = np.clip(np.rint(_safe_div(x + (dmin[:, None] * mn)[..., None], step[..., None])), 0, levels).astype(np.uint8)
    return d, dmin, sc, mn, q


def quantize_q4_k(x: np.ndarray, high_bit: bool = False) -> np.ndarray:
    """[B, 256] float -> Q4_K (or Q5_K with high_bit) blocks [B, 144 / 176]."""
    levels = 31 if high_bit else 15
    d, dmin, sc, mn, q = _affine(x.reshape(-1, 8, 32), levels, 6)
    q = q.reshape(-1, 4, 2, 32)                    # 64-weight chunks: first 32 low nibbles, next 32 high
    qs = ((q[:, :, 0] & 0x0F) | ((q[:, :, 1] & 0x0F) << 4)).reshape(-1, 128)
    parts = [_f16(d), _f16(dmin), _pack_k_scales(sc, mn)]
    if high_bit:
        bits = (q.reshape(-1, 8, 32) >> 4) & 1     # bit j of byte l: weight 32 j + l
        parts.append((bits << np.arange(8, dtype=np.uint8)[None, :, None]).sum(1).astype(np.uint8))
    return np.concatenate(parts + [qs], axis=1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """[B, 256] -> Q6_K [B, 210]: 16 sub-blocks of 16, int8 scales, codes q - 32 in -32..31."""
    xs = x.reshape(-1, 16, 16)
    s = np.abs(xs).max(-1) / 31
    d = (s.max(-1) / 127).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(_safe_div(s, d[:, None])), -128, 127).astype(np.int8)
    step = d[:, None] * sc
    q = (np.clip(np.rint(_safe_div(xs, step[..., None])), -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 4, 32)
    ql = np.concatenate([(q[:, :, 0] & 0x0F) | ((q[:, :, 2] & 0x0F) << 4),
                         (q[:, :, 1] & 0x0F) | ((q[:, :, 3] & 0x0F) << 4)], axis=2)   # [B, 2, 64]
    qh = sum(((q[:, :, g] >> 4) & 3) << (2 * g) for g in range(4)).astype(np.uint8)  # [B, 2, 32]
    return np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8), _f16(d)], axis=1)


def quantize_q3_k(x: np.ndarray) -> np.ndarray:
    """[B, 256] -> Q3_K [B, 110]: codes -4..3, 6-bit scales (biased by 32) under an fp16 d."""
    xs = x.reshape(-1, 16, 16)
    s = np.abs(xs).max(-1) / 4
    d = (s.max(-1) / 31).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(_safe_div(s, d[:, None])), -32, 31).astype(np.int16)
    step = d[:, None] * sc
    q = (np.clip(np.rint(_safe_div(xs, step[..., None])), -4, 3) + 4).astype(np.uint8).reshape(-1, 256)
    low = (q & 3).reshape(-1, 2, 4, 32)
    qs = sum(low[:, :, g] << (2 * g) for g in range(4)).astype(np.uint8).reshape(-1, 64)
    hb = (q >> 2).reshape(-1, 8, 32)               # bit j of hmask[l]: weight 32 j + l
    hmask = (hb << np.arange(8, dtype=np.uint8)[None, :, None]).sum(1).astype(np.uint8)
    u = (sc + 32).astype(np.uint8)
    scales = np.zeros((x.shape[0], 12), np.uint8)
    scales[:, 0:8] = (u[:, 0:8] & 0x0F) | ((u[:, 8:16] & 0x0F) << 4)
    for j in range(16):
        scales[:, 8 + j % 4] |= ((u[:, j] >> 4) & 3) << (2 * (j // 4))
    return np.concatenate([hmask, qs, scales, _f16(d)], axis=1)


def quantize_q2_k(x: np.ndarray) -> np.ndarray:
    """[B, 256] -> Q2_K [B, 84]: codes 0..3, 4-bit scales and mins per 16."""
    d, dmin, sc, mn, q = _affine(x.reshape(-1, 16, 16), 3, 4)
    q = q.reshape(-1, 2, 4, 32)
    qs = sum(q[:, :, g] << (2 * g) for g in range(4)).astype(np.uint8).reshape(-1, 64)
    return np.concatenate([(sc | (mn << 4)).astype(np.uint8), qs, _f16(d), _f16(dmin)], axis=1)


QUANTIZERS = {"Q4_K": quantize_q4_k, "Q5_K": lambda x: quantize_q4_k(x, high_bit=True), "Q6_K": quantize_q6_k,
              "Q3_K": quantize_q3_k, "Q2_K": quantize_q2_k}


def quantize(w: np.ndarray, kind: str) -> np.ndarray:
    """[N, K] float (K a multiple of 256) -> uint8 [N, K / 256 * block bytes] of `kind`."""
    n, k = w.shape
    assert k % QK_K == 0, (kind, w.shape)
    blocks = QUANTIZERS[kind](np.ascontiguousarray(w, dtype=np.float32).reshape(-1, QK_K))
    return blocks.reshape(n, -1)
