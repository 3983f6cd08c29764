"""A dispatch mode that fails on every read of a tensor's value by the host: what a decode step that CUDA graphs
capture (and that never stalls the host) must not do."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class NoHostRead(TorchDispatchMode):
    """Raises on .item(), bool(), .tolist(), int() (all dispatch aten._local_scalar_dense) and on a copy from
    a GPU to the CPU."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
                    torch.ops.aten.item.default):
            raise AssertionError(f"host read of a tensor value: {func}")
        out = func(*args, **kwargs)
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            dst = args[0] if func is torch.ops.aten.copy_.default else out
            if isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst.device.type == "cpu":
                raise AssertionError(f"device-to-host copy: {func}")
        return out
