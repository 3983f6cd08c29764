"""Shared pieces of the GPU suite: the skip condition (stated) and the tolerance rule (tests/tolerance.py)."""
from __future__ import annotations

import pytest
import tolerance
import torch

from llama_fast import _native


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return ("no CUDA GPU here (torch.cuda.is_available() is False): the CUDA kernels are only compile-checked "
                "on this machine (.ci/check_cuda_ptxas.py); run `make gpu-test` on a GPU machine")
    if not _native.has_cuda_kernels():
        return "llama_fast._C was built without CUDA kernels (rebuild with CUDA_HOME set and LLAMA_FAST_CUDA=1)"
    return None


requires_cuda = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def assert_matches(out: torch.Tensor, oracle: torch.Tensor, plain: torch.Tensor | None, what: str,
                   fp32_rtol: float = tolerance.FP32_RTOL, fp32_atol: float = tolerance.FP32_ATOL) -> None:
    """The tolerance rule of tests/tolerance.py (fp32 bounds overridable where a test says why)."""
    if out.dtype == torch.float32:
        tolerance.assert_fp32_close(out, oracle, what, fp32_rtol, fp32_atol)
    else:
        tolerance.assert_within_budget(out, oracle, plain, what)
