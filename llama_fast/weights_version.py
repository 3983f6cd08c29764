"""Per-model counts of changes to the weights of llama_fast modules.

Things built once from a model's weight tensors (the CPU decode plan, llama_fast/ops/cpu_decode.py) hold a
`WeightsVersion` that `watch`es every weight-holding module of that model, and compare its `count` with the
count they were built at, instead of re-reading hundreds of tensors every step. The count moves whenever a
watched module gets a tensor or submodule assigned, deleted or registered, or is converted by `_apply` (.to(),
.float(), .bfloat16(), ...). In-place updates (load_state_dict, copy_) keep the same tensors and need no count.
Changing one model's weights moves only the counts that watch its modules: other models keep their plans.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

# module -> the WeightsVersion objects watching it. Kept outside the modules so that copy.deepcopy and pickling
# of a model never meet it (a copy is watched afresh by whoever builds something from it).
_WATCHERS: "weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet]" = weakref.WeakKeyDictionary()


class WeightsVersion:
    """A count of weight changes in the modules it watches."""

    __slots__ = ("count", "__weakref__")

    def __init__(self):
        self.count = 0

    def watch(self, root: nn.Module) -> None:
        """Watches every TracksWeights module under `root` (root included). Call it again after a rebuild:
        modules added since then are watched from then on (their addition itself moved the count)."""
        for module in root.modules():
            if isinstance(module, TracksWeights):
                _WATCHERS.setdefault(module, weakref.WeakSet()).add(self)


def _bump(module: nn.Module) -> None:
    for version in _WATCHERS.get(module, ()):
        version.count += 1


class TracksWeights(nn.Module):
    """Base of the modules whose tensors or children a weight plan reads: every structural change moves the
    counts watching the module."""

    def __setattr__(self, name, value):
        if isinstance(value, (torch.Tensor, nn.Module)) or name in self.__dict__.get("_parameters", ()) \
                or name in self.__dict__.get("_buffers", ()) or name in self.__dict__.get("_modules", ()):
            _bump(self)
        super().__setattr__(name, value)

    def __delattr__(self, name):
        _bump(self)
        super().__delattr__(name)

    def register_buffer(self, name, tensor, persistent=True):
        _bump(self)
        super().register_buffer(name, tensor, persistent)

    def register_parameter(self, name, param):
        _bump(self)
        super().register_parameter(name, param)

    def add_module(self, name, module):
        _bump(self)
        super().add_module(name, module)

    def _apply(self, fn, recurse=True):
        _bump(self)
        out = super()._apply(fn, recurse)
        _bump(self)
        return out
