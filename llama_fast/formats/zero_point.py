"""What the GPTQ, AWQ and compressed-tensors readers share: codes packed into int32 words, and weights of
the zero-point form

    w[n, k] = scale[n, g(k)] * (q[n, k] - zero[n, g(k)])          (q, zero unsigned integers)

turned into llama_fast.quant's affine form without dequantizing: the same codes (int4 as they are, int8
shifted by 128 into int8), the same scales, offset = -zero * scale (int8: (128 - zero) * scale). A g(k)
that is not k // group_size (GPTQ act-order, g_idx) becomes an input permutation that sorts K by group.

Exactness: q and zero are integers below 2^9 and a fp16 / bf16 scale has at most 11 significant bits, so
q * scale, zero * scale and (q - zero) * scale all fit fp32's 24 bits exactly; llama_fast's fp32 dequant
q * scale + offset therefore equals the formula exactly. The offset is kept in the scales' dtype when that
holds it exactly (symmetric files: offset = -8 * scale), else scales and offsets are widened to fp32
(a few percent more memory, no rounding).

Tensor parallelism (llama_fast.parallel.sharded_load) reads a rank's slice of each stored part without
unpacking it: each reader's `shard_axes(base, part, dtype)` says along which stored dimension the weight's
output rows N and input columns K run in that part, and how many weights one stored element there covers
(`PackedAxis`: codes per int32 word, weights per group); `localize` then fixes what the slice leaves stale
(a stored shape, a group index).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from llama_fast.quant import SCALE_DTYPES, QuantizedWeight, pack_int4


def unpack_int32(words: torch.Tensor, bits: int, dim: int, positions: list[int] | None = None) -> torch.Tensor:
    """uint8 codes from int32 words holding 32 // bits codes each, expanded along `dim` (0 or 1): word j
    gives codes j * per .. j * per + per - 1. Code i of a word sits at bits [p * bits, (p + 1) * bits) with
    p = positions[i] (default p = i; AWQ interleaves)."""
    if words.dtype != torch.int32 or words.dim() != 2:
        raise ValueError(f"packed codes must be a 2-D int32 tensor, got {words.dtype} of shape {tuple(words.shape)}")
    per = 32 // bits
    positions = positions or list(range(per))
    rows, cols = words.shape
    shape = (rows * per, cols) if dim == 0 else (rows, cols * per)
    out = torch.empty(shape, dtype=torch.uint8, device=words.device)
    view = out.view(rows, per, cols) if dim == 0 else out.view(rows, cols, per)
    mask = (1 << bits) - 1
    for i, p in enumerate(positions):
        # one int32 temporary of the packed size at a time, not one per code
        codes = torch.bitwise_and(torch.bitwise_right_shift(words, p * bits), mask)
        if dim == 0:
            view[:, i, :] = codes
        else:
            view[:, :, i] = codes
    return out


class PackedAxis(NamedTuple):
    """A weight dimension (N or K) in a stored part: it runs along the part's dimension `dim`, `per` weights
    to a stored element (so a slice of it must start and end on a multiple of `per`)."""
    dim: int
    per: int


def split_group_index(base: str, g_idx: torch.Tensor | None, split_dim: int, group_size: int | None):
    """A rank's g_idx (the group of each input feature): whole for a column-parallel slice (dim 0: K is whole);
    for a row-parallel one (dim 1) the slice holds whole contiguous groups, so g_idx is dropped (None:
    contiguous groups). Act-order (g_idx not k // group_size) cannot be split by input columns: its groups
    are scattered over all of K."""
    if g_idx is None or split_dim == 0:
        return g_idx
    k = g_idx.shape[0] if g_idx.dim() == 1 else -1
    contiguous = g_idx.dim() == 1 and not g_idx.is_floating_point() and torch.equal(
        g_idx.to(torch.int64), torch.arange(k) // (group_size if group_size and group_size > 0 else k))
    if not contiguous:
        raise ValueError(f"{base}: act-order (desc_act: g_idx is not k // group_size) scatters each quantization "
                         "group over all input columns, so this row-parallel layer cannot be split by input "
                         "columns over tensor-parallel ranks (column-parallel layers are fine); use a checkpoint "
                         "quantized without desc_act")
    return None


def check_packed_parts(base: str, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> None:
    """GPTQ's and AWQ's qweight / qzeros are 2-D int32, scales 2-D (their shapes are each format's)."""
    for part, t in (("qweight", qweight), ("qzeros", qzeros)):
        if t.dtype != torch.int32 or t.dim() != 2:
            raise ValueError(f"{base}.{part}: expected a 2-D int32 tensor, got {t.dtype} {tuple(t.shape)}")
    if scales.dim() != 2:
        raise ValueError(f"{base}.scales: expected a 2-D tensor, got shape {tuple(scales.shape)}")


def zero_point_weight(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                      g_idx: torch.Tensor | None = None, name: str = "weight") -> QuantizedWeight:
    """codes uint8 [N, K] (0 .. 2^bits - 1, K in input feature order), scale float [N, G], zero integer
    [N, G] (the real zero point), g_idx [K] (the group of each input feature; None: contiguous groups)
    -> the QuantizedWeight computing exactly scale * (codes - zero) (see the module docstring)."""
    if bits not in (4, 8):
        raise ValueError(f"{name}: {bits}-bit codes are not supported (4 and 8 are)")
    n, k = codes.shape
    if scale.dim() != 2 or scale.shape[0] != n or tuple(zero.shape) != tuple(scale.shape):
        raise ValueError(f"{name}: scales {tuple(scale.shape)} and zero points {tuple(zero.shape)} do not fit "
                         f"a [{n}, {k}] weight")
    if scale.dtype not in SCALE_DTYPES:
        raise ValueError(f"{name}: scales must be fp16, bf16 or fp32, got {scale.dtype}")
    groups = scale.shape[1]
    if groups == 0 or k % groups != 0:
        raise ValueError(f"{name}: {groups} groups do not split K={k} evenly")
    group_size = k // groups
    perm = None if g_idx is None else _group_order(g_idx, k, groups, group_size, name)
    if perm is not None:
        codes = codes[:, perm]

    zero32, scale32 = zero.to(torch.float32), scale.to(torch.float32)
    if bits == 4:
        qweight = pack_int4(codes)
        offset32 = -(zero32 * scale32)
    else:
        qweight = (codes.to(torch.int16) - 128).to(torch.int8)
        offset32 = (128 - zero32) * scale32
    offset = offset32.to(scale.dtype)
    if not torch.equal(offset.to(torch.float32), offset32):   # the narrow dtype would round it: keep fp32
        scale, offset = scale32, offset32
    if bits == 8 and not offset.any():
        offset = None                                          # symmetric int8: llama_fast's plain form
    return QuantizedWeight(qweight.contiguous(), scale.contiguous(),
                           None if offset is None else offset.contiguous(), bits, group_size, perm)


def _group_order(g_idx: torch.Tensor, k: int, groups: int, group_size: int, name: str) -> torch.Tensor | None:
    """The permutation of K that makes each group contiguous (None if they already are), after checking that
    g_idx names every group exactly group_size times."""
    if g_idx.dim() != 1 or g_idx.shape[0] != k or g_idx.is_floating_point():
        raise ValueError(f"{name}: g_idx must be an integer tensor of shape ({k},), got {g_idx.dtype} "
                         f"of shape {tuple(g_idx.shape)}")
    g = g_idx.to(torch.int64)
    if bool((g < 0).any()) or bool((g >= groups).any()):
        raise ValueError(f"{name}: g_idx holds groups outside 0..{groups - 1}")
    if torch.equal(g, torch.arange(k, device=g.device) // group_size):
        return None
    if not bool((torch.bincount(g, minlength=groups) == group_size).all()):
        raise ValueError(f"{name}: g_idx does not give every group {group_size} input features; such a "
                         "layout has no exact group-wise form")
    return torch.sort(g, stable=True).indices
