"""AWQ checkpoints (quantization_config.quant_method "awq", version "gemm"; AutoAWQ's w_bit / q_group_size
spellings too).

A quantized linear `x` [N out, K in] is stored as
    x.qweight  int32 [K, N / 8]   8 codes per word along N, in the order [0, 2, 4, 6, 1, 3, 5, 7]: nibble p
                                  (bits 4p .. 4p+3) holds column 8j + order[p]
    x.qzeros   int32 [G, N / 8]   zero points, packed the same way
    x.scales   fp16  [G, N]
and dequantizes as  w[n, k] = scales[k // G, n] * (q[k, n] - z[k // G, n])  (no off-by-one). Modules in
modules_to_not_convert are stored dense (x.weight) and load as such. Only the GEMM layout with zero points
is read; the GEMV / marlin / exllama / ipex layouts and zero_point false raise an error.
"""
from __future__ import annotations

import torch

from llama_fast.formats.zero_point import PackedAxis, check_packed_parts, unpack_int32, zero_point_weight
from llama_fast.quant import QuantizedWeight

METHOD = "awq"
# Column 8j + i of a word sits in nibble NIBBLE_OF_COLUMN[i] (the inverse of the pack order [0,2,4,6,1,3,5,7]).
NIBBLE_OF_COLUMN = [0, 4, 1, 5, 2, 6, 3, 7]


class AwqFormat:
    parts = ("qweight", "qzeros", "scales")
    required = parts

    def __init__(self, config: dict):
        bits = config.get("bits", config.get("w_bit"))
        if bits != 4:
            raise ValueError(f"AWQ with bits={bits!r} is not supported: llama_fast reads 4-bit AWQ")
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"AWQ version {version!r} is not supported: llama_fast reads the 'gemm' layout")
        if not config.get("zero_point", True):
            raise ValueError("AWQ with zero_point=false is not supported: llama_fast reads zero-point AWQ")
        self.group_size = config.get("group_size", config.get("q_group_size", 128))
        if not isinstance(self.group_size, int) or (self.group_size <= 0 and self.group_size != -1):
            raise ValueError(f"AWQ group_size must be a positive integer or -1, got {self.group_size!r}")

    def shard_axes(self, base: str, part: str, dtype: torch.dtype) -> tuple[PackedAxis | None, PackedAxis | None]:
        """(N axis, K axis) of a stored part (formats.zero_point): codes and zeros 8 to a word along N (the
        interleave stays inside a word), K unpacked; one group over K is read whole."""
        group = None if self.group_size == -1 else PackedAxis(0, self.group_size)
        return {"qweight": (PackedAxis(1, 8), PackedAxis(0, 1)),
                "qzeros": (PackedAxis(1, 8), group),
                "scales": (PackedAxis(1, 1), group)}.get(part, (None, None))

    def localize(self, base: str, parts: dict[str, torch.Tensor], split_dim: int, size: int) -> None:
        pass     # every AWQ part is sliced in place

    def weight(self, base: str, parts: dict[str, torch.Tensor]) -> QuantizedWeight:
        qweight, qzeros, scales = parts["qweight"], parts["qzeros"], parts["scales"]
        check_packed_parts(base, qweight, qzeros, scales)
        k, n = qweight.shape[0], qweight.shape[1] * 8
        groups = 1 if self.group_size == -1 else k // self.group_size
        if (self.group_size != -1 and k % self.group_size) or tuple(scales.shape) != (groups, n) \
                or tuple(qzeros.shape) != (groups, n // 8):
            raise ValueError(f"{base}: AWQ parts do not fit together: qweight {tuple(qweight.shape)} (K={k}, "
                             f"N={n}), scales {tuple(scales.shape)}, qzeros {tuple(qzeros.shape)}, "
                             f"group_size {self.group_size}")
        codes = unpack_int32(qweight, 4, dim=1, positions=NIBBLE_OF_COLUMN).t()     # [N, K]
        zeros = unpack_int32(qzeros, 4, dim=1, positions=NIBBLE_OF_COLUMN).t()      # [N, G]
        return zero_point_weight(codes, scales.t(), zeros, 4, name=base)
