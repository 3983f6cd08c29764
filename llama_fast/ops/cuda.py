"""The "cuda" backend: hand-written CUDA kernels of llama_fast._C (csrc/cuda) for CUDA tensors."""
from __future__ import annotations

import torch

from llama_fast import _native


def unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"it runs on CUDA tensors only, not {device.type}"
    if _native.missing_reason():
        return _native.missing_reason()
    if not _native.has_cuda_kernels():
        return "llama_fast._C was built without CUDA kernels (rebuild with CUDA_HOME set and LLAMA_FAST_CUDA=1)"
    return None
