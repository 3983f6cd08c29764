"""A bounds check of every memory access the Triton interpreter makes, for the whole tests/triton suite.

The interpreter turns a kernel's pointers into real addresses (tensor.data_ptr() + offsets) and copies
element by element, so an access outside the kernel's tensors reads or corrupts whatever the heap holds
there; usually nothing visible happens, and on a GPU it is an illegal address or silent corruption. Here
each masked-in lane of every load and store must lie inside the storage of one of the launch's tensor
arguments, or the kernel call raises an error naming the kernel.

It wraps private hooks of triton's interpreter (triton.runtime.interpreter, triton 3.x): install() fails
loudly if they are gone rather than letting the suite run unchecked.
"""
from __future__ import annotations

import numpy as np
import triton.runtime.interpreter as interp

_HOOKS = (("GridExecutor", "_init_args_hst"), ("InterpreterBuilder", "create_masked_load"),
          ("InterpreterBuilder", "create_masked_store"), ("InterpreterBuilder", "create_dot"))

# tl.dot on a GPU needs every dimension (M, N, K) >= 16; the interpreter's numpy matmul takes any shape, so
# without this check a kernel could pass here and fail to compile for the shapes a GPU then meets.
DOT_MIN_DIM = 16

# (kernel name, [(first byte, end byte) of each tensor argument's storage]) of the launch being interpreted.
_launch: list = ["", []]


def _check(kind: str, ptrs, mask) -> None:
    size = max(ptrs.get_element_ty().primitive_bitwidth // 8, 1)
    addr = np.broadcast_to(ptrs.data, ptrs.data.shape).astype(np.uint64).ravel()
    addr = addr[np.broadcast_to(mask.data, ptrs.data.shape).ravel()]
    inside = np.zeros(addr.shape, dtype=bool)
    for lo, hi in _launch[1]:
        inside |= (addr >= lo) & (addr + size <= hi)
    if not inside.all():
        bad = addr[~inside]
        raise AssertionError(f"{_launch[0]}: {kind} outside every tensor argument in {bad.size} of {addr.size} "
                             f"lanes (first at {hex(int(bad[0]))}; storages "
                             f"{[(hex(lo), hi - lo) for lo, hi in _launch[1]]})")


def install() -> None:
    missing = [f"{cls}.{name}" for cls, name in _HOOKS if not hasattr(getattr(interp, cls, None), name)]
    if missing:
        raise RuntimeError(f"tests/triton/_memcheck.py: this triton's interpreter lacks {missing}; update the check")
    if getattr(interp.GridExecutor, "_memcheck", False):
        return
    init_args, load, store, dot = (getattr(getattr(interp, cls), name) for cls, name in _HOOKS)

    def checked_init_args(self, args_dev, kwargs):
        args, kwargs_hst = init_args(self, args_dev, kwargs)
        storages = []
        for arg in [*args, *kwargs_hst.values()]:
            arg = interp._unwrap_tensor(arg)
            if hasattr(arg, "untyped_storage"):
                s = arg.untyped_storage()
                storages.append((s.data_ptr(), s.data_ptr() + s.nbytes()))
        _launch[:] = [self.fn.__name__, storages]
        return args, kwargs_hst

    def checked_load(self, ptrs, mask, other, *rest):
        _check("load", ptrs, mask)
        return load(self, ptrs, mask, other, *rest)

    def checked_store(self, ptrs, value, mask, *rest):
        _check("store", ptrs, mask)
        return store(self, ptrs, value, mask, *rest)

    def checked_dot(self, a, b, *rest):
        m, k = a.data.shape[-2:]
        n = b.data.shape[-1]
        if min(m, n, k) < DOT_MIN_DIM:
            raise AssertionError(f"{_launch[0]}: tl.dot of [{m}, {k}] x [{k}, {n}]: a GPU needs M, N, K >= "
                                 f"{DOT_MIN_DIM} (the interpreter would accept it)")
        return dot(self, a, b, *rest)

    interp.GridExecutor._init_args_hst = checked_init_args
    interp.InterpreterBuilder.create_dot = checked_dot
    interp.InterpreterBuilder.create_masked_load = checked_load
    interp.InterpreterBuilder.create_masked_store = checked_store
    interp.GridExecutor._memcheck = True
