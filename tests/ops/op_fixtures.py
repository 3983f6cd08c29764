"""Fixtures of the op tests (imported by each test file: a tests/ops/conftest.py would shadow tests/conftest.py,
which the model tests import as `conftest`): which backends run here and, for the C++ CPU backend, which
instruction-set paths (AVX-512-BF16 / AVX-512 / AVX2 / portable) this CPU can exercise; plus the tolerance rules
of DESIGN.md."""
from __future__ import annotations

import pytest
import torch

from llama_fast import _native
from llama_fast.ops import reference

_ISA_ORDER = ("portable", "avx2", "avx512", "avx512_bf16")


def _cpu_isas() -> list[str]:
    if _native.extension() is None:
        return []
    from llama_fast.ops import cpu
    best = cpu.set_isa("")
    return list(_ISA_ORDER[: _ISA_ORDER.index(best) + 1])


def _cases() -> list:
    cases = [pytest.param(("cpu", isa), id=f"cpu-{isa}") for isa in _cpu_isas()]
    if _native.extension() is None:
        cases.append(pytest.param(("cpu", None), id="cpu-unbuilt",
                                  marks=pytest.mark.skip(reason=_native.missing_reason())))
    cases.append(pytest.param(("cuda", None), id="cuda", marks=pytest.mark.skipif(
        not (torch.cuda.is_available() and _native.has_cuda_kernels()), reason="needs a GPU and the CUDA kernels")))
    return cases


@pytest.fixture(params=_cases())
def backend(request):
    """(backend name, device) with the CPU kernels forced onto the parametrized instruction set."""
    name, isa = request.param
    if name == "cpu":
        from llama_fast.ops import cpu
        best = cpu.set_isa("")
        cpu.set_isa(isa)
        yield "cpu", torch.device("cpu")
        cpu.set_isa(_ISA_ORDER[-1] if best == _ISA_ORDER[-1] else best)
    else:
        yield name, torch.device("cuda")


def assert_matches_reference(out: torch.Tensor, ref_fp32: torch.Tensor, ref_lowp: torch.Tensor | None = None,
                             rtol: float = 1e-5):
    """fp32: equal to rounding (relative to the output's scale). bf16/fp16: the kernel's max error versus the fp32
    oracle is at most 2x the error of the plain PyTorch computation in the same dtype (`ref_lowp`)."""
    ref_fp32 = ref_fp32.float()
    assert out.shape == ref_fp32.shape, (out.shape, ref_fp32.shape)
    if out.dtype == torch.float32:
        scale = ref_fp32.abs().max().item() if ref_fp32.numel() else 0.0
        torch.testing.assert_close(out.cpu(), ref_fp32.cpu(), rtol=rtol, atol=rtol * max(scale, 1.0))
        return
    assert ref_lowp is not None and ref_lowp.dtype == out.dtype
    err = (out.float().cpu() - ref_fp32.cpu()).abs().max().item() if out.numel() else 0.0
    base = (ref_lowp.float().cpu() - ref_fp32.cpu()).abs().max().item() if out.numel() else 0.0
    assert err <= 2 * base, f"{out.dtype} error {err:.3g} exceeds 2x torch's own error {base:.3g}"


@pytest.fixture
def matches_reference():
    """The tolerance check of DESIGN.md (see assert_matches_reference)."""
    return assert_matches_reference
