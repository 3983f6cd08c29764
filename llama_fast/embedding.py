"""The token table of the model: dense (nn.Embedding as is), or a quantized file's table kept as stored.

A quantized GGUF's token table (Q8_0, Q4_0, Q4_1, K-quants; or our int4 / int8 format) used to be dequantized
at load into a dense table for the lookup: 113 MB in fp32 for SmolLM2's 49152 x 576, 2.1 GB for Llama 3's
128256 x 4096, more than an int4 8B model's layers. Here the table stays in its blocks and a lookup
dequantizes only the rows its ids name. Each row is dequantized by the same per-row formula
(`QuantizedWeight.dequantize` / `KQuantWeight.dequantize`, elementwise over a row's codes and its own scales),
so the rows equal those of the whole table dequantized, then indexed, bit for bit.

The table is held as buffers, like a quantized Linear's (`qweight`, `scales`, `offsets`, or `kquant_blocks_<i>`
with `kquant_kinds`): a tied lm_head is given the same tensors, so the table exists once for both.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llama_fast.kquants import KQuantWeight, Segment
from llama_fast.quant import QuantizedWeight


class Embedding(nn.Embedding):
    """nn.Embedding whose table may be a quantized weight kept as stored (`set_native`); `weight` is then None
    and `dtype` the dtype of the rows a lookup returns (the model's)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype=None, device=None):
        super().__init__(num_embeddings, embedding_dim, dtype=dtype, device=device)
        self.weight.requires_grad_(False)
        self.bits: int | None = None          # a QuantizedWeight table: its bits and group size
        self.group_size: int | None = None
        self.kquant_kinds: tuple[str, ...] | None = None   # a KQuantWeight table: its segments' block types
        self._native_dtype: torch.dtype | None = None

    @property
    def native(self) -> bool:
        return self.bits is not None or self.kquant_kinds is not None

    @property
    def dtype(self) -> torch.dtype:
        return self._native_dtype if self.native else self.weight.dtype

    @property
    def device(self) -> torch.device:
        if not self.native:
            return self.weight.device
        return (self.qweight if self.bits is not None else self.kquant_blocks_0).device

    def set_native(self, value: QuantizedWeight | KQuantWeight, name: str = "embedding table") -> None:
        """Keeps `value` ([num_embeddings, embedding_dim]) as the table; lookups return the weight's dtype."""
        if tuple(value.shape) != (self.num_embeddings, self.embedding_dim):
            raise ValueError(f"{name}: quantized table has shape {tuple(value.shape)}, the embedding expects "
                             f"{(self.num_embeddings, self.embedding_dim)}")
        if self.native:
            raise ValueError(f"{name}: the embedding already holds a quantized table")
        self._native_dtype = self.dtype
        self.weight = None
        if isinstance(value, KQuantWeight):
            for i, segment in enumerate(value.segments):
                self.register_buffer(f"kquant_blocks_{i}", segment.blocks)
            self.kquant_kinds = value.kinds
            return
        value.check(name)
        if value.input_perm is not None:
            raise ValueError(f"{name}: a token table cannot have an input permutation (act-order)")
        self.register_buffer("qweight", value.qweight)
        self.register_buffer("scales", value.scale)
        self.register_buffer("offsets", value.offset)
        self.bits, self.group_size = value.bits, value.group_size

    def native_weight(self) -> QuantizedWeight | KQuantWeight:
        """The table as stored (views of the buffers)."""
        if self.kquant_kinds is not None:
            return KQuantWeight([Segment(kind, self._buffers[f"kquant_blocks_{i}"])
                                 for i, kind in enumerate(self.kquant_kinds)], self.embedding_dim)
        return QuantizedWeight(self.qweight, self.scales, self.offsets, self.bits, self.group_size)

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() on the module: a native table's lookup dtype follows, as a dense weight's would
        # (its scales follow too: they are floating-point buffers).
        if self._native_dtype is not None:
            self._native_dtype = fn(torch.empty(0, dtype=self._native_dtype)).dtype
        return super()._apply(fn, recurse)

    def dequantized(self) -> torch.Tensor:
        """The whole table, dense in `dtype` (for saving in the dense HF layout)."""
        if not self.native:
            return self.weight
        return self.forward(torch.arange(self.num_embeddings, device=self.device))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # ids are checked by the model (forward), as for the dense lookup; decode_step feeds sampled ones
        if not self.native:
            return F.embedding(input_ids, self.weight)
        flat = input_ids.reshape(-1)
        table = self.native_weight()
        if isinstance(table, KQuantWeight):
            rows = _kquant_rows(table, flat)
        else:
            rows = table.take_rows(flat).dequantize(torch.float32)
        return rows.to(self._native_dtype).reshape(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        if self.kquant_kinds is not None:
            return f"{super().extra_repr()}, blocks={'+'.join(self.kquant_kinds)}"
        return super().extra_repr() + (f", bits={self.bits}, group_size={self.group_size}" if self.native else "")


def _kquant_rows(w: KQuantWeight, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of a block weight dequantized to fp32, each from the row segment holding it. No host read (the
    CUDA-graph decode step embeds through this): every segment dequantizes the rows at the clamped ids and a
    mask keeps the ones that are its own."""
    if len(w.segments) == 1:
        return w.take_rows(ids).dequantize(torch.float32)
    out = torch.zeros(ids.numel(), w.k, dtype=torch.float32, device=ids.device)
    start = 0
    for s in w.segments:
        local = (ids - start).clamp(0, s.rows - 1)
        rows = KQuantWeight.single(s.kind, s.blocks[local], w.k).dequantize(torch.float32)
        mine = (ids >= start) & (ids < start + s.rows)
        out = torch.where(mine[:, None], rows, out)
        start += s.rows
    return out
