"""Weight-only quantization: the affine group-wise format (docs/DESIGN.md, "Quantized weight format").

    w[n, k] = q[n, k] * scale[n, k // g] + offset[n, k // g]        (g = group_size; g = K is per channel)

int8: q in [-128, 127] stored as int8 [N, K]; offset is None (zero).
int4: q in [0, 15], two per byte as uint8 [N, K // 2]: element k = 2j sits in the LOW nibble of byte j and
      k = 2j + 1 in the HIGH nibble (csrc/common/quant_format.h holds the same definition for C++/CUDA).
scale / offset: [N, K // g] in fp16, bf16 or fp32.

This one form holds GGUF Q4_0 (offset = -8 * scale), Q4_1 (scale, min) and Q8_0 exactly, and AWQ/GPTQ zero
points (offset = -zero * scale). Backends may repack to faster layouts at load time; this layout is what is
serialized: a quantized linear `x` is saved as x.qweight / x.scales / x.offsets (llama_fast.loading), and
GGUF files load into it without requantizing (llama_fast.formats.gguf).

input_perm (optional, int64 [K]): the codes' columns are a permutation of the input features: code column j
belongs to input feature input_perm[j]. GPTQ's act-order checkpoints (g_idx) load this way: sorting K by
group makes every group contiguous, so the affine format above holds them exactly, and each kernel gathers
the activations once per call (`kernel_input`). dequantize() returns the weight in input feature order.

quantize() is round to nearest: int4 asymmetric (offset = group min, scale = range / 15) or symmetric
(codes 1..15 around 8); int8 symmetric (codes -127..127, no offset). linear.Linear holds the result as its
qweight / scales / offsets buffers and runs it through ops.quant_linear.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (4, 8)
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class QuantizedWeight:
    qweight: torch.Tensor           # int8 [N, K] (bits 8) or uint8 [N, K // 2] (bits 4)
    scale: torch.Tensor             # [N, K // group_size]
    offset: torch.Tensor | None     # [N, K // group_size] or None (zero)
    bits: int
    group_size: int
    input_perm: torch.Tensor | None = None   # int64 [K]: code column j is input feature input_perm[j]

    def __post_init__(self):
        self.check()
        self._derived: dict = {}       # tensors derived from this weight, made once (see `cached`)

    def cached(self, key, make):
        """`make()` computed once per key for this weight (a weight that changes is a new QuantizedWeight)."""
        value = self._derived.get(key)
        if value is None:
            value = self._derived[key] = make()
        return value

    def scales_like(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scale, offset) in `dtype`: the tensors themselves when they have it, else copies made once (kernels
        that read them in the activation dtype call this on every step)."""
        if self.scale.dtype == dtype:
            return self.scale, self.offset
        return self.cached(("scales", dtype), lambda: (
            self.scale.to(dtype), None if self.offset is None else self.offset.to(dtype)))

    def check(self, name: str = "quantized weight") -> None:
        """Raises ValueError naming `name` if the parts do not form a valid weight of this format."""
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"{name}: bits must be 4 or 8, got {self.bits}")
        code_dtype = torch.int8 if self.bits == 8 else torch.uint8
        if self.qweight.dtype != code_dtype or self.qweight.dim() != 2:
            raise ValueError(f"{name}: int{self.bits} codes must be a 2-D {code_dtype} tensor, got "
                             f"{self.qweight.dtype} of shape {tuple(self.qweight.shape)}")
        n, k = self.shape
        if self.group_size <= 0 or k % self.group_size != 0:
            raise ValueError(f"{name}: group_size {self.group_size} does not divide K={k}")
        groups = (n, k // self.group_size)
        for part, t in (("scale", self.scale), ("offset", self.offset)):
            if t is None:
                continue
            if t.dtype not in SCALE_DTYPES:
                raise ValueError(f"{name}: {part} must be fp16, bf16 or fp32, got {t.dtype}")
            if tuple(t.shape) != groups:
                raise ValueError(f"{name}: {part} has shape {tuple(t.shape)}, expected {groups} "
                                 f"for a [{n}, {k}] weight in groups of {self.group_size}")
        if self.offset is not None and self.offset.dtype != self.scale.dtype:
            raise ValueError(f"{name}: offset dtype {self.offset.dtype} differs from scale dtype {self.scale.dtype}")
        if self.input_perm is not None:
            perm = self.input_perm
            if perm.dtype != torch.int64 or tuple(perm.shape) != (k,):
                raise ValueError(f"{name}: input_perm must be an int64 tensor of shape ({k},), got {perm.dtype} "
                                 f"of shape {tuple(perm.shape)}")
            if not torch.equal(torch.sort(perm).values, torch.arange(k, device=perm.device)):
                raise ValueError(f"{name}: input_perm is not a permutation of 0..{k - 1}")

    @classmethod
    def from_parts(cls, qweight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                   name: str = "quantized weight", input_perm: torch.Tensor | None = None) -> "QuantizedWeight":
        """Rebuilds a weight from its serialized tensors (bits from the code dtype, group size from the
        number of scale columns), e.g. from a checkpoint's `qweight` / `scales` / `offsets` / `input_perm`."""
        if qweight.dtype not in (torch.int8, torch.uint8) or qweight.dim() != 2 or scale.dim() != 2:
            raise ValueError(f"{name}: expected 2-D int8/uint8 codes and 2-D scales, got {qweight.dtype} "
                             f"{tuple(qweight.shape)} and {tuple(scale.shape)}")
        bits = 8 if qweight.dtype == torch.int8 else 4
        k = qweight.shape[1] * (2 if bits == 4 else 1)
        if scale.shape[1] == 0 or k % scale.shape[1] != 0:
            raise ValueError(f"{name}: {scale.shape[1]} scale columns do not divide K={k}")
        try:
            return cls(qweight, scale, offset, bits, k // scale.shape[1], input_perm)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None

    @property
    def shape(self) -> tuple[int, int]:
        n = self.qweight.shape[0]
        k = self.qweight.shape[1] * (2 if self.bits == 4 else 1)
        return n, k

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the scales (and of the dequantized weight by default)."""
        return self.scale.dtype

    @property
    def nbytes(self) -> int:
        parts = (self.qweight, self.scale, self.offset)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def kernel_input(self, x: torch.Tensor) -> tuple[torch.Tensor, "QuantizedWeight"]:
        """(x, self) for a weight without an input permutation; else x's features gathered into the codes'
        column order and the weight without the permutation: what a kernel multiplies. Every kernel backend's
        quant_linear starts with it (the reference dequantizes, which undoes the permutation instead)."""
        if self.input_perm is None:
            return x, self
        plain = self.__dict__.get("_kernel_form")     # built once per weight: each decode step asks
        if plain is None:
            plain = QuantizedWeight(self.qweight, self.scale, self.offset, self.bits, self.group_size)
            self.__dict__["_kernel_form"] = plain
        return x.index_select(-1, self.input_perm), plain

    def unpack(self) -> torch.Tensor:
        """The integer codes q as int16 [N, K] (values 0..15 for int4, -128..127 for int8), in stored column
        order (see input_perm)."""
        return self._codes().to(torch.int16)

    def _codes(self) -> torch.Tensor:
        """The codes in their narrowest dtype: int8 [N, K], or uint8 [N, K] for int4."""
        if self.bits == 8:
            return self.qweight
        n, half = self.qweight.shape
        codes = torch.empty(n, half, 2, dtype=torch.uint8, device=self.qweight.device)
        torch.bitwise_and(self.qweight, 0x0F, out=codes[..., 0])   # even k: low nibble
        torch.bitwise_right_shift(self.qweight, 4, out=codes[..., 1])  # odd k: high nibble
        return codes.reshape(n, 2 * half)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """[N, K] dense weight, q * scale + offset computed in fp32 (a multiply, then an add: no fma, so
        GGUF tensors come out bit-identical to gguf's own dequantization), returned in `dtype` (default:
        the scales' dtype), its columns in input feature order (input_perm undone)."""
        n, k = self.shape
        groups = k // self.group_size
        w = self._codes().reshape(n, groups, self.group_size).float()
        w.mul_(self.scale.float().unsqueeze(-1))
        if self.offset is not None:
            w.add_(self.offset.float().unsqueeze(-1))
        w = w.reshape(n, k)
        if self.input_perm is not None:
            ordered = torch.empty_like(w)
            ordered[:, self.input_perm] = w
            w = ordered
        return w.to(dtype or self.dtype)

    def take_rows(self, index: torch.Tensor) -> "QuantizedWeight":
        """Rows in the order `index` (whole rows: codes with their own scales and offsets)."""
        offset = None if self.offset is None else self.offset[index]
        return QuantizedWeight(self.qweight[index], self.scale[index], offset, self.bits, self.group_size,
                               self.input_perm)

    def to(self, *args, **kwargs) -> "QuantizedWeight":
        """Moves to a device; a floating dtype applies to the scales and offsets only."""
        def move(t, float_too):
            if t is None:
                return None
            if float_too:
                return t.to(*args, **kwargs)
            dev = torch._C._nn._parse_to(*args, **kwargs)[0]
            return t if dev is None else t.to(dev)
        return QuantizedWeight(move(self.qweight, False), move(self.scale, True), move(self.offset, True),
                               self.bits, self.group_size, move(self.input_perm, False))


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] codes in 0..15 (K even) -> uint8 [N, K // 2], even k in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def quantize(w: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = False,
             scale_dtype: torch.dtype | None = None, name: str = "weight") -> QuantizedWeight:
    """Round-to-nearest group-wise quantization of a floating w [N, K]; group_size=-1 (or K) is per channel.

    int4 asymmetric: offset = the group minimum, scale = range / 15, codes 0..15. int4 symmetric:
    scale = absmax / 7, codes 1..15 around 8 (offset = -8 * scale). int8 is always symmetric (codes
    -127..127, no offset), as the format defines. scale_dtype defaults to w's dtype. The offset is rounded
    down and the scale up to scale_dtype, so the grid still covers the group and every element is within
    scale / 2 of its dequantized value (up to fp32 rounding).
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{name}: bits must be 4 or 8, got {bits}")
    if w.dim() != 2:
        raise ValueError(f"{name}: quantize expects a 2-D weight [N, K], got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"{name}: quantize expects a floating-point weight, got {w.dtype}")
    n, k = w.shape
    if group_size in (-1, None):
        group_size = k
    if group_size <= 0 or k % group_size != 0:
        hint = next((g for g in (128, 64, 32) if g < group_size and k % g == 0), None)
        raise ValueError(f"{name}: group_size {group_size} does not divide K={k}"
                         + (f" (group_size={hint} does)" if hint else ""))
    if bits == 4 and k % 2 != 0:
        raise ValueError(f"{name}: int4 needs an even K, got K={k}")
    scale_dtype = scale_dtype or w.dtype
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"{name}: scale_dtype must be fp16, bf16 or fp32, got {scale_dtype}")
    if not torch.isfinite(w).all():
        raise ValueError(f"{name}: cannot quantize a weight holding inf or nan")
    wg = w.float().reshape(n, k // group_size, group_size)

    if bits == 8 or symmetric:
        qmax = 127 if bits == 8 else 7
        absmax = wg.abs().amax(-1, keepdim=True)
        scale = _round_to(torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax)), scale_dtype, up=True)
        q = torch.clamp(torch.round(wg / scale.float()), -qmax, qmax)
        if bits == 8:
            return QuantizedWeight(q.reshape(n, k).to(torch.int8), scale.squeeze(-1), None, 8, group_size)
        offset = (scale.float() * -8).to(scale_dtype)  # exact: a power-of-two multiple
        return QuantizedWeight(pack_int4((q + 8).reshape(n, k)), scale.squeeze(-1), offset.squeeze(-1), 4,
                               group_size)

    lo = _round_to(wg.amin(-1, keepdim=True), scale_dtype, up=False)
    hi = wg.amax(-1, keepdim=True)
    span = hi - lo.float()
    scale = _round_to(torch.where(span > 0, span / 15, torch.ones_like(span)), scale_dtype, up=True)
    q = torch.clamp(torch.round((wg - lo.float()) / scale.float()), 0, 15)
    return QuantizedWeight(pack_int4(q.reshape(n, k)), scale.squeeze(-1), lo.squeeze(-1), 4, group_size)


def _round_to(x: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """fp32 x -> dtype, rounded toward +inf (up) or -inf instead of to nearest."""
    y = x.to(dtype)
    wrong = y.float() < x if up else y.float() > x
    if not wrong.any():
        return y
    toward = torch.full_like(y, float("inf") if up else float("-inf"))
    return torch.where(wrong, torch.nextafter(y, toward), y)


def concat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Stacks weights along N (output rows), e.g. q/k/v into one fused QKV weight. Groups run along K, so
    this is exact; all parts must share bits, group size, K and scale dtype."""
    first = parts[0]
    for p in parts[1:]:
        if (p.bits, p.group_size, p.shape[1], p.scale.dtype) != (first.bits, first.group_size, first.shape[1],
                                                                  first.scale.dtype):
            raise ValueError("concat_rows: parts differ in bits, group size, K or scale dtype: "
                             f"{[(q.bits, q.group_size, q.shape[1], q.scale.dtype) for q in parts]}")
        if (p.offset is None) != (first.offset is None):
            raise ValueError("concat_rows: some parts have offsets and some do not")
        if not _same_perm(p.input_perm, first.input_perm):
            raise InputPermMismatch("concat_rows: the parts permute their input features differently (GPTQ "
                                    "act-order g_idx that differ between layers fused into one)")
    offset = None if first.offset is None else torch.cat([p.offset for p in parts])
    return QuantizedWeight(torch.cat([p.qweight for p in parts]), torch.cat([p.scale for p in parts]), offset,
                           first.bits, first.group_size, first.input_perm)


class InputPermMismatch(ValueError):
    """Weights that permute their inputs differently cannot share one activation gather."""


def _same_perm(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is b or (a is not None and b is not None and torch.equal(a, b))


def slice_rows(qw: QuantizedWeight, start: int, end: int) -> QuantizedWeight:
    """Rows start..end-1 of a quantized weight (the inverse of concat_rows, for saving fused weights)."""
    offset = None if qw.offset is None else qw.offset[start:end]
    return QuantizedWeight(qw.qweight[start:end], qw.scale[start:end], offset, qw.bits, qw.group_size,
                           qw.input_perm)
