"""Loads the compiled extension llama_fast._C once; says why when it is missing."""
from __future__ import annotations

_C = None
_error: str | None = None

try:
    import torch  # noqa: F401  (the extension links against torch's libraries)

    from llama_fast import _C  # type: ignore[attr-defined]  # registers torch.ops.llama_fast.*
except ImportError as e:  # not built (pure-Python checkout) or built against another torch
    _error = (f"the compiled extension llama_fast._C is not available ({e}); build it with "
              "`pip install --no-build-isolation -e .` (see README)")


def extension():
    """The loaded llama_fast._C module, or None."""
    return _C


def missing_reason() -> str | None:
    return _error


def has_cuda_kernels() -> bool:
    return _C is not None and _C.built_with_cuda()


if _C is not None:
    from llama_fast.ops import fake as _fake  # noqa: E402  (fake kernels for torch.compile / meta tensors)
    _fake.register()
