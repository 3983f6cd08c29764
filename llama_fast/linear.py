"""The linear layer the model uses: a dense weight or a weight-only quantized one, behind llama_fast.ops."""
from __future__ import annotations

import torch
from torch import nn

from llama_fast import ops
from llama_fast.quant import QuantizedWeight


class Linear(nn.Module):
    """y = x @ W.T (+ bias). W is dense (`weight`, an nn.Parameter [N, K]) or quantized (`qweight`, `scales`,
    `offsets` buffers in the format of llama_fast.quant). `backend` is set by the model (see ops)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=None, device=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.backend: str | None = None
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)
        self.bits: int | None = None
        self.group_size: int | None = None

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    def set_quantized(self, qw: QuantizedWeight) -> None:
        """Replaces the dense weight by `qw` (shape must match)."""
        if qw.shape != (self.out_features, self.in_features):
            raise ValueError(f"quantized weight has shape {qw.shape}, layer expects "
                             f"{(self.out_features, self.in_features)}")
        self.weight = None
        self.register_buffer("qweight", qw.qweight)
        self.register_buffer("scales", qw.scale)
        self.register_buffer("offsets", qw.offset)
        self.bits, self.group_size = qw.bits, qw.group_size

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.qweight, self.scales, self.offsets, self.bits, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits is not None:
            return ops.quant_linear(x, self.quantized_weight(), self.bias, backend=self.backend)
        return ops.linear(x, self.weight, self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        q = f", bits={self.bits}, group_size={self.group_size}" if self.quantized else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{q}"
