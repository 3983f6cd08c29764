"""The "cpu" backend: C++ kernels of llama_fast._C (csrc/cpu) for CPU tensors."""
from __future__ import annotations

import torch

from llama_fast import _native

# The C++ kernels take fp32 and bf16 activations; backend=None sends other dtypes (fp16) to the reference.
DTYPES = (torch.float32, torch.bfloat16)


def unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"it runs on CPU tensors only, not {device.type}"
    return _native.missing_reason()


def rms_norm(x, weight, eps):
    return torch.ops.llama_fast.rms_norm(x, weight, eps)
