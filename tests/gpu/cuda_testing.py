"""Shared pieces of the GPU suite: the skip condition (stated) and DESIGN.md's tolerance rules."""
from __future__ import annotations

import pytest
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
                   fp32_rtol: float = 1e-5, fp32_atol: float = 1e-5) -> None:
    """DESIGN.md's rule. fp32: equal to rounding. fp16/bf16: the kernel's max error against the fp32 oracle
    at most 2x the error of `plain`, the same computation done by PyTorch in that dtype."""
    assert out.dtype == (plain.dtype if plain is not None else out.dtype), f"{what}: dtype {out.dtype}"
    assert out.shape == oracle.shape, f"{what}: shape {tuple(out.shape)} != {tuple(oracle.shape)}"
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, oracle.float(), rtol=fp32_rtol, atol=fp32_atol, msg=lambda m: f"{what}: {m}")
        return
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    err = (out.float() - oracle.float()).abs().max().item()
    budget = (plain.float() - oracle.float()).abs().max().item()
    # A floor of one rounding step of the largest value covers cases where PyTorch happens to be exact.
    floor = oracle.float().abs().max().item() * (2 ** -8 if out.dtype == torch.bfloat16 else 2 ** -11)
    assert err <= 2 * budget + floor, f"{what}: error {err:.3g} > 2 x PyTorch's {budget:.3g} (+{floor:.3g})"
