"""Triton kernels of llama_fast (installed as llama_fast.kernels): the "triton" backend.

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set before triton
is first imported), which is how the tests check the kernels on machines without a GPU.

Each op lives in the file of its name (kernel, launcher, checks): rms_norm (with fused_add_rms_norm), rotary,
attention, silu_and_mul, quant_linear, store_kv, as in csrc/cpu, csrc/cuda and tests. The package attribute of
that name is the op function, not the module: reach a module with `kernel_module("rms_norm")` (or
importlib.import_module). Each op is registered as a torch custom op in the
llama_fast_triton namespace with a fake implementation, so torch.compile and CUDA graphs see opaque ops.
The functions below follow the llama_fast.ops contracts (same arguments, minus `backend`).
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
    dense half-precision weights; the Triton work is in quant_linear."""
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
    from .attention import attention  # noqa: F401
    from .kquant_linear import kquant_linear  # noqa: F401
    from .quant_linear import quant_linear  # noqa: F401
    from .rms_norm import fused_add_rms_norm, rms_norm  # noqa: F401
    from .rotary import rotary  # noqa: F401
    from .silu_and_mul import silu_and_mul  # noqa: F401
    from .store_kv import store_kv  # noqa: F401

# The Triton op files, one per op (the order .ci/check_triton_cubins.py compiles them in).
KERNEL_MODULES = ("rms_norm", "rotary", "attention", "silu_and_mul", "quant_linear", "kquant_linear", "store_kv")


def kernel_module(op: str):
    """The module of the Triton kernels of `op` (the package attribute `op` is the op function itself)."""
    return importlib.import_module(f"llama_fast.kernels.{op}")
