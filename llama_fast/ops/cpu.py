"""The "cpu" backend: C++ kernels of llama_fast._C (csrc/cpu) for CPU tensors."""
from __future__ import annotations

import torch

from llama_fast import _native


def unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"it runs on CPU tensors only, not {device.type}"
    return _native.missing_reason()


def rms_norm(x, weight, eps):
    return torch.ops.llama_fast.rms_norm(x, weight, eps)
