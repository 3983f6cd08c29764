"""Triton kernels of llama_fast (installed as llama_fast.kernels): the "triton" backend.

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set before triton
is first imported), which is how the tests check the kernels on machines without a GPU.
"""
from __future__ import annotations

import os

import torch


def unavailable_reason(device: torch.device) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e})"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported), "
            f"got a {device.type} tensor")
