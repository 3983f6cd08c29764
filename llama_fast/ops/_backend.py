"""Backend selection for llama_fast.ops.

A backend is a module that defines some of the op functions (same names and arguments as llama_fast.ops,
minus `backend`), `unavailable_reason(device) -> str | None`, optionally `DTYPES`, the activation dtypes its
kernels take (all when absent), and optionally `unsupported_<op>(*args) -> str | None` for shapes its kernels
do not cover (e.g. the CUDA attention's head dims).

The fallback rule:
- An explicitly requested backend runs or raises: BackendUnavailableError saying why when it cannot run here,
  lacks the op or does not cover the shape; a dtype its kernels do not take is the kernels' error to name.
- backend=None picks the first backend in the device's preference list that can run here, takes the input's
  dtype, implements the op and covers the shape (so an fp16 model on the CPU, which the C++ kernels do not
  take, runs on the reference). When that is not the device's first choice it warns once per reason
  (BackendFallbackWarning), naming the backend it passed over and why.
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


class BackendFallbackWarning(RuntimeWarning):
    """backend=None runs an op on a slower backend than the device's first choice."""


_warned: set = set()


def warn_fallback(op: str, chosen: str, passed_over: list) -> None:
    """Warns once per distinct reason that backend=None passed over a faster backend."""
    key = tuple(reason for _, reason in passed_over)
    if key in _warned:
        return
    _warned.add(key)
    import warnings

    why = "; ".join(f"{name!r}: {reason}" for name, reason in passed_over)
    warnings.warn(f"llama_fast.ops: {op} (and any op for the same reason) runs on backend {chosen!r}, not on "
                  f"{why}", BackendFallbackWarning, stacklevel=4)


_loaded: dict = {}


def _module(backend: str):
    # A dict lookup after the first import (torch.compile traces this; it refuses importlib).
    module = _loaded.get(backend)
    if module is None:
        module = _loaded[backend] = importlib.import_module(_MODULES[backend])
    return module


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
        passed_over = []
        for name in _PREFERENCE.get(device.type, ("torch",)):
            reason = unavailable_reason(name, device)
            if reason is None and not hasattr(_module(name), op):
                reason = f"it does not implement {op}"
            if reason is None and not _takes(_module(name), dtype):
                reason = f"its kernels do not take {dtype}"
            if reason is None:
                fn = getattr(_module(name), op)
                if passed_over:
                    warn_fallback(op, name, passed_over)
                break
            passed_over.append((name, reason))
    else:
        reason = unavailable_reason(backend, device)
        if reason is not None:
            raise BackendUnavailableError(f"backend {backend!r} cannot run on {device}: {reason}")
        fn = getattr(_module(backend), op, None)
        if fn is None:
            raise BackendUnavailableError(f"backend {backend!r} does not implement {op}")
    _resolved[key] = fn
    return fn


def shape_gap(op: str, backend: str, *args) -> str | None:
    """Why `backend`'s kernels do not cover these arguments of `op` (its `unsupported_<op>` hook), or None."""
    check = getattr(_module(backend), f"unsupported_{op}", None)
    return None if check is None else check(*args)


def resolve_for(op: str, backend: str | None, device: torch.device, dtype, *args):
    """resolve() plus the shape rule: an explicit backend whose kernels do not cover `args` raises; with
    backend=None the next backend in line that covers them runs (with a one-time warning)."""
    fn = resolve(op, backend, device, dtype)
    name = _name_of(fn)
    gap = shape_gap(op, name, *args) if name else None
    if gap is None:
        return fn
    if backend is not None:
        raise BackendUnavailableError(f"backend {backend!r} cannot run {op} here: {gap}")
    passed_over = [(name, gap)]
    order = _PREFERENCE.get(device.type, ("torch",))
    for later in order[order.index(name) + 1:]:
        try:
            other = resolve(op, later, device, dtype)
        except BackendUnavailableError as e:
            passed_over.append((later, str(e)))
            continue
        if _takes(_module(later), dtype) and shape_gap(op, later, *args) is None:
            warn_fallback(op, later, passed_over)
            return other
    raise BackendUnavailableError(f"no backend can run {op} on {device}: {passed_over}")


def _name_of(fn) -> str | None:
    module = getattr(fn, "__module__", None)
    return next((name for name, path in _MODULES.items() if module and module.startswith(path)), None)
