"""Triton kernels of llama_fast (installed as llama_fast.kernels): the "triton" backend.

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set before triton
is first imported), which is how the tests check the kernels on machines without a GPU.

Each op family lives in its own file (kernel, launcher, checks): norm, rope, flash_attention, swiglu,
quant_matmul, kv_cache. Each op and is registered as a torch custom op in the
llama_fast_triton namespace with a fake implementation, so torch.compile and CUDA graphs see opaque ops.
The functions below follow the llama_fast.ops contracts (same arguments, minus `backend`); gate_up_silu is
an extra fused op the model may call directly.
"""
from __future__ import annotations

import importlib
import os
import sys

import torch


def unavailable_reason(device: torch.device) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e})"
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) < (8, 0):
            return "the Triton kernels need a GPU of compute capability 8.0 or newer"
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported), "
            f"got a {device.type} tensor")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dense x @ weight.T (+ bias): cuBLAS through torch. A Triton GEMM would at best tie with it for
    dense half-precision weights; the Triton work is in quant_linear and gate_up_silu."""
    return torch.nn.functional.linear(x, weight, bias)


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# This directory is also importable as the top-level package `kernels` whenever the repository root is on
# sys.path (`python -m pytest` run from it, PYTHONPATH=.), and transformers imports `kernels` when it probes
# for the Hugging Face package of that name (transformers.utils.import_utils.is_kernels_available). A second
# copy of the modules below would run each torch.library.custom_op again: torch then destroys the first
# definition of every llama_fast_triton op while llama_fast.kernels keeps calling it through a dangling
# dispatcher handle (a use-after-free: a segfault or a std::bad_alloc in a later op call, depending on what
# reused the memory; pytorch/pytorch#98541, #125234). So any other name for this package is an alias of
# llama_fast.kernels.
if __name__ != "llama_fast.kernels":
    sys.modules[__name__] = importlib.import_module("llama_fast.kernels")
elif _triton_importable():          # else unavailable_reason says why; the ops below need triton
    from .flash_attention import attention  # noqa: F401
    from .quant_matmul import quant_linear  # noqa: F401
    from .quant_linear_kquant import kquant_linear  # noqa: F401
    from .norm import fused_add_rms_norm, rms_norm  # noqa: F401
    from .rope import rotary  # noqa: F401
    from .swiglu import gate_up_silu, silu_and_mul  # noqa: F401
    from .kv_cache import store_kv  # noqa: F401
