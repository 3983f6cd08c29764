"""Tolerances of DESIGN.md for the Triton tests.

fp32: equal to the reference up to rounding. fp16/bf16: the kernel's error against an fp32 oracle (the
same rounded inputs, computed in fp32) is at most twice the error of the plain PyTorch computation in the
low-precision dtype, plus one unit of the output's magnitude times the dtype's epsilon (so that a plain
computation that happens to be exact does not demand an exact kernel).
"""
import torch


def assert_fp32_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal up to fp32 rounding of a different summation order: 5e-6 of the output's scale (about 40
    units in the last place; a K=512 dot product reordered differs by that much near zero)."""
    scale = max(float(ref.abs().max()), 1.0) if ref.numel() else 1.0
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=5e-6 * scale)


def assert_within_budget(out: torch.Tensor, oracle: torch.Tensor, plain: torch.Tensor) -> None:
    assert out.dtype == plain.dtype, (out.dtype, plain.dtype)
    oracle = oracle.float()
    err = (out.float() - oracle).abs().max().item()
    plain_err = (plain.float() - oracle).abs().max().item()
    floor = torch.finfo(out.dtype).eps * max(oracle.abs().max().item(), 1e-3)
    assert err <= 2 * plain_err + floor, (
        f"{out.dtype} kernel error {err:.3g} exceeds 2 x plain PyTorch error {plain_err:.3g} + {floor:.3g}")


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
