"""The linear layer the model uses: a dense weight or a weight-only quantized one, behind llama_fast.ops."""
from __future__ import annotations

import torch
from torch import nn

from llama_fast import ops
from llama_fast.kquants import KQuantWeight, Segment
from llama_fast.quant import QuantizedWeight, quantize
from llama_fast.weights_version import TracksWeights


class Linear(TracksWeights):
    """y = x @ W.T (+ bias). W is dense (`weight`, an nn.Parameter [N, K]), quantized (`qweight`, `scales`,
    `offsets` and, for act-order weights, `input_perm` buffers in the format of llama_fast.quant) or ggml blocks
    kept as stored (`kquant_blocks_<i>` buffers, one per row segment, of the types `kquant_kinds`;
    llama_fast.kquants). `backend` is set by the model (see ops).
    output_sizes: for a fused layer, the row counts of the layers stacked in it (qkv_proj: q, k, v), which
    the model's packed_modules_mapping names; one entry, out_features, for a plain layer."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=None, device=None,
                 output_sizes: tuple[int, ...] | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.output_sizes = tuple(output_sizes) if output_sizes is not None else (out_features,)
        if sum(self.output_sizes) != out_features:
            raise ValueError(f"output_sizes {self.output_sizes} do not add up to out_features={out_features}")
        self.backend: str | None = None
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)
        self.bits: int | None = None
        self.group_size: int | None = None
        self.kquant_kinds: tuple[str, ...] | None = None
        # Tensor parallelism (llama_fast.parallel): turns this rank's partial output into the whole one, e.g. the
        # all-reduce of a row-parallel layer or the gather of a vocab-sharded head. The bias is added after it,
        # so that it counts once.
        self.combine_output = None

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    def set_quantized(self, qw: QuantizedWeight, name: str | None = None) -> None:
        """Replaces the weight (dense or quantized) by `qw`, whose shape must match the layer's."""
        name = name or "linear weight"
        qw.check(name)
        if qw.shape != (self.out_features, self.in_features):
            raise ValueError(f"{name}: quantized weight has shape {qw.shape}, layer expects "
                             f"{(self.out_features, self.in_features)}")
        self.weight = None
        for buffer, value in (("qweight", qw.qweight), ("scales", qw.scale), ("offsets", qw.offset),
                              ("input_perm", qw.input_perm)):
            self._buffers.pop(buffer, None)
            self.register_buffer(buffer, value)
        self.bits, self.group_size = qw.bits, qw.group_size

    @property
    def kquant(self) -> bool:
        """Whether the weight is held as ggml blocks (llama_fast.kquants.KQuantWeight)."""
        return self.kquant_kinds is not None

    def set_kquant(self, w: KQuantWeight, name: str | None = None) -> None:
        """Replaces the weight by ggml blocks `w` (kept as they are), whose shape must match the layer's."""
        name = name or "linear weight"
        if w.shape != (self.out_features, self.in_features):
            raise ValueError(f"{name}: block weight has shape {w.shape}, layer expects "
                             f"{(self.out_features, self.in_features)}")
        if self.quantized:
            raise ValueError(f"{name}: the layer already holds an int{self.bits} weight")
        self.weight = None
        for buffer in [b for b in self._buffers if b.startswith("kquant_blocks_")]:
            del self._buffers[buffer]
        for i, segment in enumerate(w.segments):
            self.register_buffer(f"kquant_blocks_{i}", segment.blocks)
        self.kquant_kinds = w.kinds

    def kquant_weight(self) -> KQuantWeight:
        blocks = [self._buffers[f"kquant_blocks_{i}"] for i in range(len(self.kquant_kinds))]
        kw = self.__dict__.get("_kquant_weight")   # reused while the buffers are the same tensors
        if kw is None or len(kw.segments) != len(blocks) or \
                not all(s.blocks is b for s, b in zip(kw.segments, blocks)):
            kw = KQuantWeight([Segment(k, b) for k, b in zip(self.kquant_kinds, blocks)], self.in_features)
            self.__dict__["_kquant_weight"] = kw
        return kw

    def quantize_(self, bits: int, group_size: int = 128, symmetric: bool = False,
                  scale_dtype: torch.dtype | None = None, name: str | None = None) -> "Linear":
        """Quantizes the dense weight in place (round to nearest, see llama_fast.quant.quantize)."""
        if self.quantized:
            raise ValueError(f"{name or 'linear weight'} is already quantized (int{self.bits})")
        self.set_quantized(quantize(self.weight.data, bits, group_size, symmetric, scale_dtype,
                                    name=name or "linear weight"), name)
        return self

    def dequantize_(self, dtype: torch.dtype | None = None) -> "Linear":
        """Turns a quantized layer back into a dense one (weight = qweight dequantized, in `dtype`, default
        the bias's dtype or else the scales')."""
        if self.kquant:
            dense = self.kquant_weight().dequantize(dtype or (self.bias.dtype if self.bias is not None
                                                             else torch.float32))
            for i in range(len(self.kquant_kinds)):
                del self._buffers[f"kquant_blocks_{i}"]
            self.__dict__.pop("_kquant_weight", None)
            self.kquant_kinds = None
            self.weight = nn.Parameter(dense, requires_grad=False)
            return self
        if not self.quantized:
            return self
        dtype = dtype or (self.bias.dtype if self.bias is not None else self.scales.dtype)
        dense = self.quantized_weight().dequantize(dtype)
        for buffer in ("qweight", "scales", "offsets", "input_perm"):
            self._buffers.pop(buffer, None)
        self.__dict__.pop("_quantized_weight", None)
        self.weight = nn.Parameter(dense, requires_grad=False)
        self.bits = self.group_size = None
        return self

    def quantized_weight(self) -> QuantizedWeight:
        # Built once and reused while the buffers are the same tensors (module.to() replaces them): the
        # forward of every decode step asks for it, and building one validates all its parts.
        qw = self.__dict__.get("_quantized_weight")
        perm = self._buffers.get("input_perm")
        if (qw is None or qw.qweight is not self.qweight or qw.scale is not self.scales
                or qw.offset is not self.offsets or qw.input_perm is not perm):
            qw = QuantizedWeight(self.qweight, self.scales, self.offsets, self.bits, self.group_size, perm)
            self.__dict__["_quantized_weight"] = qw
        return qw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        combine = self.combine_output
        bias = self.bias if combine is None else None
        if self.bits is not None:
            y = ops.quant_linear(x, self.quantized_weight(), bias, backend=self.backend)
        elif self.kquant_kinds is not None:
            y = ops.kquant_linear(x, self.kquant_weight(), bias, backend=self.backend)
        else:
            y = ops.linear(x, self.weight, bias, backend=self.backend)
        if combine is None:
            return y
        y = combine(y)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        q = f", bits={self.bits}, group_size={self.group_size}" if self.quantized else ""
        if self.kquant:
            q = f", blocks={'+'.join(self.kquant_kinds)}"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{q}"


def dequantize_linears_(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Makes every quantized Linear of `model` dense again (in `dtype`), in place."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.dequantize_(dtype)
    return model
