"""Which reader turns a checkpoint's quantized linears into llama_fast.quant weights, from its
quantization_config (config.json, or the quantize_config.json / quant_config.json AutoGPTQ and AutoAWQ wrote
beside it): llama_fast's own format, GPTQ, AWQ or compressed-tensors.

Every reader has `parts` (the tensor name suffixes of a quantized linear `x`: x.<part>), `required` (those
that must be there) and `weight(base, parts) -> QuantizedWeight` (ValueError naming the problem). Methods not
listed here (bitsandbytes, fp8, ...) are refused with an error: nothing is dequantized silently.
"""
from __future__ import annotations

import json
import os

import torch

from llama_fast.formats import awq, compressed_tensors, gptq
from llama_fast.quant import QuantizedWeight

LLAMA_FAST_METHOD = "llama_fast"
# Files older quantizers wrote next to config.json instead of a quantization_config entry.
SIDECAR_FILES = {"quantize_config.json": gptq.METHOD, "quant_config.json": awq.METHOD}


class LlamaFastFormat:
    """llama_fast's own: x.qweight / x.scales / x.offsets / x.input_perm as llama_fast.quant defines them."""

    parts = ("qweight", "scales", "offsets", "input_perm")
    required = ("qweight", "scales")

    def weight(self, base: str, parts: dict[str, torch.Tensor]) -> QuantizedWeight:
        return QuantizedWeight.from_parts(parts["qweight"], parts["scales"], parts.get("offsets"), name=base,
                                          input_perm=parts.get("input_perm"))


_READERS = {LLAMA_FAST_METHOD: lambda config: LlamaFastFormat(), gptq.METHOD: gptq.GptqFormat,
            awq.METHOD: awq.AwqFormat, compressed_tensors.METHOD: compressed_tensors.CompressedTensorsFormat}


def checkpoint_quantization(directory: str, config_entry: dict | None) -> dict | None:
    """config.json's quantization_config, or else the one a sidecar file holds (None: not quantized by a
    known tool)."""
    if config_entry is not None:
        return config_entry
    for name, method in SIDECAR_FILES.items():
        file = os.path.join(directory, name)
        if os.path.isfile(file):
            try:
                with open(file, encoding="utf-8") as f:
                    entry = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
            if not isinstance(entry, dict):
                raise ValueError(f"{file}: expected a JSON object")
            return {"quant_method": method, **entry}
    return None


def reader_for(quantization: dict | None):
    """The reader for a quantization_config (None: llama_fast's own format, which unquantized checkpoints
    may hold too)."""
    if quantization is None:
        return LlamaFastFormat()
    if not isinstance(quantization, dict):
        raise ValueError(f"quantization_config must be a JSON object, got {type(quantization).__name__}")
    method = str(quantization.get("quant_method", "")).lower()
    if method not in _READERS:
        raise ValueError(f"config.json has a quantization_config of method {quantization.get('quant_method')!r}; "
                         f"llama_fast reads {', '.join(repr(m) for m in _READERS)} quantized checkpoints")
    return _READERS[method](quantization)
