"""Backend selection for llama_fast.ops.

A backend is a module that defines some of the op functions (same names and arguments as llama_fast.ops,
minus `backend`), `unavailable_reason(device) -> str | None` and optionally `DTYPES`, the activation dtypes
its kernels take (all when absent). backend=None picks the first backend in the device's preference list that
can run here, takes the input's dtype and implements the op (so an fp16 model on the CPU, which the C++
kernels do not take, runs on the reference); naming a backend that cannot run, or that lacks the op, raises
BackendUnavailableError saying why, and a dtype its kernels do not take is the kernels' error to name.
"""
from __future__ import annotations

import importlib

import torch

BACKENDS = ("torch", "cpu", "triton", "cuda")

_MODULES = {
    "torch": "llama_fast.ops.reference",
    "cpu": "llama_fast.ops.cpu",
    "cuda": "llama_fast.ops.cuda",
    "triton": "llama_fast.kernels",
}

# Fastest first. "torch" (the reference) runs everywhere and ends every list.
_PREFERENCE = {
    "cpu": ("cpu", "torch"),
    "cuda": ("cuda", "triton", "torch"),
}

_resolved: dict = {}


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run the requested op on this device."""


def _module(backend: str):
    return importlib.import_module(_MODULES[backend])


def check_backend_name(backend) -> None:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)} or None")


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run on `device`, or None when it can."""
    check_backend_name(backend)
    try:
        mod = _module(backend)
    except ImportError as e:  # e.g. triton not installed
        return f"its module {_MODULES[backend]} does not import ({e})"
    return mod.unavailable_reason(device)


def default_backend(device) -> str:
    """The fastest backend that runs on `device` (for from_pretrained's backend=None)."""
    device = torch.device(device)
    for name in _PREFERENCE.get(device.type, ("torch",)):
        if unavailable_reason(name, device) is None:
            return name
    return "torch"


def _takes(module, dtype) -> bool:
    dtypes = getattr(module, "DTYPES", None)
    return dtypes is None or dtype is None or dtype in dtypes


def resolve(op: str, backend: str | None, device: torch.device, dtype: torch.dtype | None = None):
    """The function implementing `op` for `dtype` tensors on `device`."""
    key = (op, backend, device.type, device.index, dtype)
    fn = _resolved.get(key)
    if fn is not None:
        return fn
    if backend is None:
        for name in _PREFERENCE.get(device.type, ("torch",)):
            if unavailable_reason(name, device) is None and hasattr(_module(name), op) \
                    and _takes(_module(name), dtype):
                fn = getattr(_module(name), op)
                break
    else:
        reason = unavailable_reason(backend, device)
        if reason is not None:
            raise BackendUnavailableError(f"backend {backend!r} cannot run on {device}: {reason}")
        fn = getattr(_module(backend), op, None)
        if fn is None:
            raise BackendUnavailableError(f"backend {backend!r} does not implement {op}")
    _resolved[key] = fn
    return fn
