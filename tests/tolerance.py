"""The tolerance rule of every kernel test (docs/KERNELS.md, "Tolerance"), in one place: tests/ops, tests/gpu and
tests/triton import it (tests/ is on sys.path through tests/conftest.py).

- fp32 output: equal to the fp32 reference up to rounding of a different summation order,
  |out - ref| <= 1e-5 * |ref| + 1e-5 * max(max|ref|, 1).
- fp16 / bf16 output: the kernel's max error against the oracle (the same rounded inputs computed in fp32 or
  fp64) is at most twice the max error of the plain PyTorch computation in that dtype (`plain`), plus one
  floor: one rounding step (half an epsilon) of the oracle's largest magnitude, so that a plain computation that
  happens to be exact does not demand an exact kernel.
"""
from __future__ import annotations

import torch

FP32_RTOL = 1e-5
FP32_ATOL = 1e-5  # times max(max|ref|, 1)


def floor(dtype: torch.dtype, oracle: torch.Tensor) -> float:
    """The one floor of the 2x rule: half an epsilon of `dtype` times the oracle's largest magnitude."""
    return torch.finfo(dtype).eps / 2 * (oracle.float().abs().max().item() if oracle.numel() else 0.0)


def assert_fp32_close(out: torch.Tensor, ref: torch.Tensor, what: str = "", rtol: float = FP32_RTOL,
                      atol: float = FP32_ATOL) -> None:
    """fp32: equal to the reference up to rounding (relative to the output's scale). A looser rtol / atol only
    where the kernel's fp32 math differs by design (e.g. an exp2-based online softmax), said at the call."""
    ref = ref.float().to(out.device)
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    scale = max(ref.abs().max().item(), 1.0) if ref.numel() else 1.0
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol * scale,
                               msg=(lambda m: f"{what}: {m}") if what else None)


def assert_within_budget(out: torch.Tensor, oracle: torch.Tensor, plain: torch.Tensor, what: str = "") -> None:
    """fp16/bf16: error against `oracle` <= 2 x the error of `plain` (PyTorch in out's dtype) + floor."""
    assert out.dtype == plain.dtype, f"{what}: dtype {out.dtype}, the plain computation is {plain.dtype}"
    assert out.shape == oracle.shape, f"{what}: shape {tuple(out.shape)} != {tuple(oracle.shape)}"
    if out.numel() == 0:
        return
    oracle = oracle.float().cpu()
    assert torch.isfinite(out).all() or not torch.isfinite(oracle).all(), f"{what}: non-finite values"
    err = (out.float().cpu() - oracle).abs().max().item()
    plain_err = (plain.float().cpu() - oracle).abs().max().item()
    fl = floor(out.dtype, oracle)
    assert err <= 2 * plain_err + fl, (
        f"{what + ': ' if what else ''}{out.dtype} kernel error {err:.3g} exceeds 2 x PyTorch's own error "
        f"{plain_err:.3g} + floor {fl:.3g}")


def assert_matches_reference(out: torch.Tensor, oracle: torch.Tensor, plain: torch.Tensor | None = None,
                             what: str = "") -> None:
    """The rule for out's dtype: assert_fp32_close for fp32, else assert_within_budget (needs `plain`)."""
    if out.dtype == torch.float32:
        assert_fp32_close(out, oracle, what)
        return
    assert plain is not None, f"{what}: a {out.dtype} output needs the plain PyTorch computation in {out.dtype}"
    assert_within_budget(out, oracle, plain, what)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
