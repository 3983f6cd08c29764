"""GPTQ checkpoints (quantization_config.quant_method "gptq", or an AutoGPTQ quantize_config.json).

A quantized linear `x` [N out, K in] is stored as
    x.qweight  int32 [K / p, N]   p = 32 / bits codes per word, packed along K (code i of a word at bits i*bits)
    x.qzeros   int32 [G, N / p]   zero points, packed along N the same way
    x.scales   fp16  [G, N]
    x.g_idx    int32 [K]          the group of each input feature (k // group_size unless act-order)
and dequantizes as  w[n, k] = scales[g, n] * (q[k, n] - z[g, n]),  g = g_idx[k], where z is the stored zero
plus one for checkpoint_format "gptq" (v1: AutoGPTQ stored zero - 1) and the stored zero for "gptq_v2".
group_size -1 is one group over K. desc_act (act-order) makes g_idx a permutation of the groups: it loads as
an input permutation of the weight (llama_fast.quant), exact and without dequantizing.
Supported: bits 4 and 8; sym true or false (the zeros say it). Not supported, with an error: 2 and 3 bits,
and the repacked kernel layouts (marlin, bitblas, ...).
"""
from __future__ import annotations

import torch

from llama_fast.formats.zero_point import (
    PackedAxis,
    check_packed_parts,
    split_group_index,
    unpack_int32,
    zero_point_weight,
)
from llama_fast.quant import QuantizedWeight

METHOD = "gptq"
FORMATS = ("gptq", "gptq_v2")


class GptqFormat:
    """The parts of a GPTQ linear and how they become a QuantizedWeight, for one quantization_config."""

    parts = ("qweight", "qzeros", "scales", "g_idx")
    required = ("qweight", "qzeros", "scales")

    def __init__(self, config: dict):
        self.bits = config.get("bits")
        if self.bits not in (4, 8):
            raise ValueError(f"GPTQ with bits={self.bits!r} is not supported: llama_fast reads 4- and 8-bit GPTQ "
                             "(2- and 3-bit codes have no kernel here)")
        group_size = config.get("group_size", 128)
        if not isinstance(group_size, int) or (group_size <= 0 and group_size != -1):
            raise ValueError(f"GPTQ group_size must be a positive integer or -1, got {group_size!r}")
        self.group_size = group_size
        layout = config.get("checkpoint_format", config.get("format", "gptq"))
        if config.get("is_marlin_format"):
            layout = "marlin"
        if layout not in FORMATS:
            raise ValueError(f"GPTQ checkpoint_format {layout!r} is not supported: llama_fast reads the "
                             f"{' and '.join(FORMATS)} layouts (kernel-specific repacked layouts such as marlin "
                             "or bitblas need the original GPTQ checkpoint)")
        self.zero_plus_one = layout == "gptq"

    def shard_axes(self, base: str, part: str, dtype: torch.dtype) -> tuple[PackedAxis | None, PackedAxis | None]:
        """(N axis, K axis) of a stored part (formats.zero_point); None: the part is read whole along it
        (one group over K: the same scale for every input column, so each rank's slice is one group)."""
        per = 32 // self.bits
        group = None if self.group_size == -1 else PackedAxis(0, self.group_size)
        return {"qweight": (PackedAxis(1, 1), PackedAxis(0, per)),
                "qzeros": (PackedAxis(1, per), group),
                "scales": (PackedAxis(1, 1), group)}.get(part, (None, None))     # g_idx: see localize

    def localize(self, base: str, parts: dict[str, torch.Tensor], split_dim: int, size: int) -> None:
        if "g_idx" in parts:
            g_idx = split_group_index(base, parts.pop("g_idx"), split_dim, self.group_size)
            if g_idx is not None:
                parts["g_idx"] = g_idx

    def weight(self, base: str, parts: dict[str, torch.Tensor]) -> QuantizedWeight:
        bits, per = self.bits, 32 // self.bits
        qweight, qzeros, scales = parts["qweight"], parts["qzeros"], parts["scales"]
        check_packed_parts(base, qweight, qzeros, scales)
        k, n = qweight.shape[0] * per, qweight.shape[1]
        groups = 1 if self.group_size == -1 else k // self.group_size
        if (self.group_size != -1 and k % self.group_size) or tuple(scales.shape) != (groups, n) \
                or tuple(qzeros.shape) != (groups, -(-n // per)):
            raise ValueError(f"{base}: GPTQ parts do not fit together: qweight {tuple(qweight.shape)} (K={k}, "
                             f"N={n}), scales {tuple(scales.shape)}, qzeros {tuple(qzeros.shape)}, "
                             f"group_size {self.group_size}")
        codes = unpack_int32(qweight, bits, dim=0).t()               # [N, K]
        zeros = unpack_int32(qzeros, bits, dim=1)[:, :n].t()         # [N, G]
        zeros = zeros.to(torch.int16) + 1 if self.zero_plus_one else zeros
        return zero_point_weight(codes, scales.t(), zeros, bits, parts.get("g_idx"), name=base)
