"""ggml's block-quantized weights that our affine int4/int8 format cannot hold at the same bits per weight:
the K-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K; super-blocks of QK_K = 256 weights) and the 5-bit Q5_0 / Q5_1
(blocks of 32). They stay in the file's bytes (`KQuantWeight`), and the kernels decode them on the fly
(csrc/common/ggml_blocks.h for C++/CUDA, csrc/cpu/kquant_linear.cpp, kernels/kquant_linear.py).
Q8_0 is one of these types only as a segment of a fused weight whose other parts are (a Q4_K_M file of SmolLM2
has v_proj in Q8_0 next to q/k in Q5_0): `from_q8_0` re-packs it into its file bytes, so the fused layer stays
native; a weight all in Q8_0 stays a llama_fast.quant weight (llama_fast/formats/gguf.py).

Block layouts (llama.cpp ggml-common.h; every multi-byte field little-endian, d / dmin fp16):
    Q4_K (144 B): d, dmin, scales[12], qs[128]          8 sub-blocks of 32, 6-bit scale sc and min m each
    Q5_K (176 B): d, dmin, scales[12], qh[32], qs[128]  as Q4_K plus a 5th bit per weight
    Q6_K (210 B): ql[128], qh[64], scales[16] (int8), d 16 sub-blocks of 16
    Q2_K  (84 B): scales[16] (4-bit sc | 4-bit m << 4), qs[64], d, dmin
    Q3_K (110 B): hmask[32], qs[64], scales[12] (16 6-bit, biased by 32), d
    Q5_0  (22 B): d, qh (u32), qs[16]                   one block of 32
    Q5_1  (24 B): d, m, qh (u32), qs[16]
    Q8_0  (34 B): d, qs[32] (int8)

Every one of them dequantizes as   w = code * scale + offset   with an integer code per weight and an fp32
(scale, offset) per sub-block of 16 weights (a sub-block of 32 repeats its pair), where
    Q4_K, Q5_K: code = q (0..15 / 0..31), scale = d * sc, offset = -(dmin * m)
    Q2_K:       code = q (0..3),          scale = d * sc, offset = -(dmin * m)
    Q3_K:       code = q - 4*(1-hbit) (-4..3), scale = d * (sc - 32)
    Q6_K:       code = q - 32 (-32..31),  scale = d * sc
    Q5_0:       code = q - 16 (-16..15),  scale = d
    Q5_1:       code = q (0..31),         scale = d, offset = m
    Q8_0:       code = q (-128..127),     scale = d
`decode` computes exactly these fp32 products in the order gguf.quants does, and `dequantize` multiplies
then adds without an fma: x - y and x + (-y) are the same IEEE operation, so the result equals
gguf.quants.dequantize bit for bit (tests/test_kquants.py checks every type on random and real blocks).

A linear layer may fuse parts of different types (a Q4_K_M file keeps q/k in Q4_K and v in Q6_K):
KQuantWeight is a stack of row segments, each of one type.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

QK_K = 256
SUB_BLOCK = 16  # the granularity of (scale, offset) in the decoded form

# type -> (weights per block, bytes per block)
BLOCKS = {
    "Q2_K": (QK_K, 84),
    "Q3_K": (QK_K, 110),
    "Q4_K": (QK_K, 144),
    "Q5_K": (QK_K, 176),
    "Q6_K": (QK_K, 210),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q8_0": (32, 34),
}
TYPES = tuple(BLOCKS)
# ids the C++ / CUDA / Triton kernels use for the types (csrc/common/ggml_blocks.h: enum class BlockType)
TYPE_IDS = {"Q4_K": 0, "Q5_K": 1, "Q6_K": 2, "Q2_K": 3, "Q3_K": 4, "Q5_0": 5, "Q5_1": 6, "Q8_0": 7}


def row_bytes(kind: str, k: int) -> int:
    weights, nbytes = BLOCKS[kind]
    return k // weights * nbytes


def check_shape(kind: str, n: int, k: int, name: str = "weight") -> None:
    if kind not in BLOCKS:
        raise ValueError(f"{name}: {kind} is not a block type of llama_fast.kquants (supported: {', '.join(TYPES)})")
    weights = BLOCKS[kind][0]
    if k <= 0 or k % weights:
        raise ValueError(f"{name}: {kind} needs rows of a multiple of {weights} weights, got K={k}")


@dataclass(frozen=True)
class Segment:
    """Rows of one block type: uint8 [rows, row_bytes(kind, K)], the file's bytes."""
    kind: str
    blocks: torch.Tensor

    @property
    def rows(self) -> int:
        return self.blocks.shape[0]


class KQuantWeight:
    """A [N, K] weight as ggml blocks, kept as stored: row segments of one block type each (see the module
    docstring). `dequantize` equals gguf.quants.dequantize bit for bit."""

    def __init__(self, segments, k: int, name: str = "weight"):
        self.segments = tuple(segments)
        self.k = int(k)
        if not self.segments:
            raise ValueError(f"{name}: a KQuantWeight needs at least one segment")
        for s in self.segments:
            check_shape(s.kind, s.rows, self.k, name)
            b = s.blocks
            if b.dtype != torch.uint8 or b.dim() != 2 or b.shape[1] != row_bytes(s.kind, self.k):
                raise ValueError(f"{name}: {s.kind} rows of K={self.k} must be uint8 [rows, "
                                 f"{row_bytes(s.kind, self.k)}], got {b.dtype} {tuple(b.shape)}")

    @classmethod
    def single(cls, kind: str, blocks: torch.Tensor, k: int, name: str = "weight") -> "KQuantWeight":
        return cls([Segment(kind, blocks)], k, name)

    @property
    def shape(self) -> tuple[int, int]:
        return sum(s.rows for s in self.segments), self.k

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(s.kind for s in self.segments)

    @property
    def device(self) -> torch.device:
        return self.segments[0].blocks.device

    @property
    def nbytes(self) -> int:
        return sum(s.blocks.numel() for s in self.segments)

    def to(self, *args, **kwargs) -> "KQuantWeight":
        """Moves the blocks to a device (a dtype argument does not apply: the bytes are the weight)."""
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is None:
            return self
        return KQuantWeight([Segment(s.kind, s.blocks.to(device)) for s in self.segments], self.k)

    def take_rows(self, index: torch.Tensor) -> "KQuantWeight":
        """Rows in the order `index` (a permutation of one segment's rows: whole rows of blocks move)."""
        if len(self.segments) != 1:
            raise ValueError("take_rows: only a single-type weight can be permuted")
        s = self.segments[0]
        return KQuantWeight([Segment(s.kind, s.blocks[index])], self.k)

    def decode(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (codes int8 [N, K], scale fp32 [N, K/16], offset fp32 [N, K/16]) with w = code*scale + offset."""
        parts = [decode_blocks(s.kind, s.blocks, self.k) for s in self.segments]
        return tuple(torch.cat(p) for p in zip(*parts))

    def dequantize(self, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """[N, K] dense weight in fp32 (bit-identical to gguf.quants), then cast to `dtype`."""
        codes, scale, offset = self.decode()
        n, k = self.shape
        w = codes.reshape(n, k // SUB_BLOCK, SUB_BLOCK).float()
        w.mul_(scale.unsqueeze(-1))   # one multiply, then one add: no fma, as numpy
        w.add_(offset.unsqueeze(-1))
        return w.reshape(n, k).to(dtype or torch.float32)

    def __repr__(self) -> str:
        n, k = self.shape
        return f"KQuantWeight([{n}, {k}], {'+'.join(f'{s.rows}x{s.kind}' for s in self.segments)})"


def from_q8_0(weight, name: str = "weight") -> KQuantWeight | None:
    """A llama_fast.quant weight that is exactly GGUF Q8_0 (int8 codes, one fp16 scale per 32, no offset, no
    input permutation) re-packed into Q8_0 blocks: the same bytes per weight as the file. None for any other."""
    if (getattr(weight, "bits", None) != 8 or weight.group_size != 32 or weight.offset is not None
            or weight.scale.dtype != torch.float16 or getattr(weight, "input_perm", None) is not None):
        return None
    codes = weight.qweight
    n, k = codes.shape
    d = weight.scale.reshape(n, k // 32, 1).contiguous().view(torch.uint8)        # [n, k/32, 2]
    q = codes.reshape(n, k // 32, 32).contiguous().view(torch.uint8)
    return KQuantWeight.single("Q8_0", torch.cat([d, q], dim=-1).reshape(n, -1), k, name)


def concat_rows(parts: list[KQuantWeight]) -> KQuantWeight:
    """Stacks weights along N (q/k/v into qkv); neighbouring segments of one type merge into one."""
    k = parts[0].k
    if any(p.k != k for p in parts):
        raise ValueError(f"concat_rows: parts differ in K: {[p.k for p in parts]}")
    merged: list[Segment] = []
    for s in (s for p in parts for s in p.segments):
        if merged and merged[-1].kind == s.kind:
            merged[-1] = Segment(s.kind, torch.cat([merged[-1].blocks, s.blocks]))
        else:
            merged.append(s)
    return KQuantWeight(merged, k)


def slice_rows(w: KQuantWeight, start: int, end: int) -> KQuantWeight:
    """Rows start..end-1 (the inverse of concat_rows)."""
    out, row = [], 0
    for s in w.segments:
        lo, hi = max(start - row, 0), min(end - row, s.rows)
        if lo < hi:
            out.append(Segment(s.kind, s.blocks[lo:hi]))
        row += s.rows
    return KQuantWeight(out, w.k)


# ---- decoding: bytes -> (codes, scale, offset) -------------------------------------------------------------

def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 little-endian -> fp32 [...] (exact)."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _bits(byte: torch.Tensor, shifts, mask: int) -> torch.Tensor:
    """byte [..., L] -> [..., len(shifts), L]: (byte >> s) & mask for each shift s."""
    s = torch.tensor(shifts, dtype=torch.uint8, device=byte.device).reshape(len(shifts), 1)
    return (byte.unsqueeze(-2) >> s) & mask


def k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K's 12 scale bytes [B, 12] -> eight 6-bit scales and eight 6-bit mins, uint8 [B, 8] each.
    Bytes 0-3: scales 0-3 (low 6 bits) and the high 2 bits of scales 4-7; bytes 4-7: the same for the mins;
    bytes 8-11: the low 4 bits of scales 4-7 (low nibble) and of mins 4-7 (high nibble)."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def decode_blocks(kind: str, raw: torch.Tensor, k: int):
    """uint8 [N, row_bytes] of `kind` -> (codes int8 [N, K], scale fp32 [N, K/16], offset fp32 [N, K/16])."""
    n = raw.shape[0]
    weights, nbytes = BLOCKS[kind]
    b = raw.reshape(-1, nbytes)     # one block per row
    nb = b.shape[0]
    if kind in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        sc, mn = k_scale_min(b[:, 4:16])
        scale = d[:, None] * sc.float()                  # [B, 8] per 32 weights
        offset = -(dmin[:, None] * mn.float())
        qs = b[:, -128:].reshape(nb, 4, 1, 32)           # 64 weights per 32 bytes: low nibbles first
        q = _bits(qs.squeeze(2), (0, 4), 0x0F)           # [B, 4, 2, 32]
        if kind == "Q5_K":
            qh = _bits(b[:, 16:48], range(8), 1)         # [B, 8, 32]: bit j of byte l -> weight 32j + l
            q = q.reshape(nb, 8, 32) | (qh << 4)
        codes = q.reshape(nb, weights).to(torch.int8)
        scale, offset = scale.repeat_interleave(2, -1), offset.repeat_interleave(2, -1)
    elif kind == "Q6_K":
        ql, qh, sc, d = b[:, 0:128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
        low = _bits(ql.reshape(nb, 2, 64), (0, 4), 0x0F).reshape(nb, 2, 4, 32)  # half, (nibble, 32-byte half)
        high = _bits(qh.reshape(nb, 2, 32), (0, 2, 4, 6), 0x03)                 # [B, 2, 4, 32]
        codes = ((low | (high << 4)).to(torch.int16) - 32).to(torch.int8).reshape(nb, weights)
        scale = d[:, None] * sc.view(torch.int8).float()
    elif kind == "Q2_K":
        sc, qs, d, dmin = b[:, 0:16], b[:, 16:80], _f16(b[:, 80:82]), _f16(b[:, 82:84])
        scale = d[:, None] * (sc & 0x0F).float()
        offset = -(dmin[:, None] * (sc >> 4).float())
        codes = _bits(qs.reshape(nb, 2, 32), (0, 2, 4, 6), 0x03).reshape(nb, weights).to(torch.int8)
    elif kind == "Q3_K":
        hmask, qs, sc, d = b[:, 0:32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
        low = (_bits(sc[:, 0:8], (0, 4), 0x0F)).reshape(nb, 16)
        high = (_bits(sc[:, 8:12], (0, 2, 4, 6), 0x03)).reshape(nb, 16)
        scale = d[:, None] * ((low | (high << 4)).to(torch.int16) - 32).float()
        ql = _bits(qs.reshape(nb, 2, 32), (0, 2, 4, 6), 0x03).reshape(nb, weights).to(torch.int16)
        hb = _bits(hmask, range(8), 1).reshape(nb, weights).to(torch.int16)
        codes = (ql - ((1 - hb) << 2)).to(torch.int8)   # a clear high bit subtracts 4
    elif kind == "Q8_0":
        codes = b[:, 2:].contiguous().view(torch.int8)
        scale = _f16(b[:, 0:2])[:, None].expand(nb, 2)
    else:  # Q5_0 / Q5_1
        d = _f16(b[:, 0:2])
        start = 2 if kind == "Q5_0" else 4
        qh = b[:, start:start + 4]
        qs = b[:, start + 4:start + 20]
        high = _bits(qh, range(8), 1).transpose(1, 2).reshape(nb, 32)  # bit e of the u32 -> weight e
        q = _bits(qs, (0, 4), 0x0F).reshape(nb, 32) | (high << 4)
        if kind == "Q5_0":
            codes = (q.to(torch.int16) - 16).to(torch.int8)
        else:
            codes = q.to(torch.int8)
            offset = _f16(b[:, 2:4])[:, None].expand(nb, 2)
        scale = d[:, None].expand(nb, 2)
    if kind in ("Q6_K", "Q3_K", "Q5_0", "Q8_0"):
        offset = torch.full_like(scale, -0.0)   # x + (-0.0) == x for every x, -0.0 included (+0.0 is not)
    per_row = k // SUB_BLOCK
    return (codes.reshape(n, k), scale.reshape(n, per_row).contiguous(), offset.reshape(n, per_row).contiguous())
