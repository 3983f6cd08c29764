"""A process-wide count of changes to the weights of llama_fast modules.

Things built once from a model's weight tensors (the CPU decode plan, llama_fast/ops/cpu_decode.py) compare
`current()` with the count they were built at, instead of re-reading hundreds of tensors every step. The
count moves whenever a module that holds weights (or holds such modules) gets a tensor or submodule assigned,
deleted or registered, or converted by `_apply` (.to(), .float(), .bfloat16(), ...). In-place updates
(load_state_dict, copy_) keep the same tensors and need no count.
"""
from __future__ import annotations

import torch
from torch import nn

_version = 0


def current() -> int:
    return _version


def bump() -> None:
    global _version
    _version += 1


class TracksWeights(nn.Module):
    """Base of the modules whose tensors or children a weight plan reads: every structural change bumps the
    count."""

    def __setattr__(self, name, value):
        if isinstance(value, (torch.Tensor, nn.Module)) or name in self.__dict__.get("_parameters", ()) \
                or name in self.__dict__.get("_buffers", ()) or name in self.__dict__.get("_modules", ()):
            bump()
        super().__setattr__(name, value)

    def __delattr__(self, name):
        bump()
        super().__delattr__(name)

    def register_buffer(self, name, tensor, persistent=True):
        bump()
        super().register_buffer(name, tensor, persistent)

    def register_parameter(self, name, param):
        bump()
        super().register_parameter(name, param)

    def add_module(self, name, module):
        bump()
        super().add_module(name, module)

    def _apply(self, fn, recurse=True):
        bump()
        out = super()._apply(fn, recurse)
        bump()
        return out
