"""Fixtures of the op tests (imported by each test file: a tests/ops/conftest.py would shadow tests/conftest.py,
which the model tests import as `conftest`): which backends run here and, for the C++ CPU backend, which
instruction-set paths (AVX-512-BF16 / AVX-512-VNNI / AVX-512 / AVX2 / portable) this CPU can exercise. The
tolerance rule is tests/tolerance.py's. The CUDA kernels are tested by tests/gpu (with compute-sanitizer runs),
not here."""
from __future__ import annotations

import pytest
import torch
from tolerance import assert_matches_reference

from llama_fast import _native

_ISA_ORDER = ("portable", "avx2", "avx512", "avx512_vnni", "avx512_bf16")


def _cpu_isas() -> list[str]:
    if _native.extension() is None:
        return []
    from llama_fast.ops import cpu
    best = cpu.set_isa("")
    return list(_ISA_ORDER[: _ISA_ORDER.index(best) + 1])


def at_isa(isa: str, fn):
    """fn() with the CPU kernels forced to the ISA level `isa`, the level before restored afterwards."""
    from llama_fast.ops import cpu
    before = cpu.set_isa("")
    cpu.set_isa(isa)
    try:
        return fn()
    finally:
        cpu.set_isa("avx512_bf16" if before == "avx512_bf16" else before)


def _cases() -> list:
    cases = [pytest.param(("cpu", isa), id=f"cpu-{isa}") for isa in _cpu_isas()]
    if _native.extension() is None:
        cases.append(pytest.param(("cpu", None), id="cpu-unbuilt",
                                  marks=pytest.mark.skip(reason=_native.missing_reason())))
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


@pytest.fixture
def matches_reference():
    """The tolerance rule (tests/tolerance.py, docs/KERNELS.md)."""
    return assert_matches_reference


@pytest.fixture(params=[1, 2], ids=lambda t: f"{t}thread")
def threads(request):
    """The CPU kernels on 1 and on 2 threads (torch.set_num_threads, restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def at_each_thread_count(fn) -> list:
    """fn() on 1 and on 2 threads (torch.set_num_threads, restored after), the results in that order. Not more
    threads: the pool keeps every helper it starts (test_thread_pool counts them)."""
    before = torch.get_num_threads()
    outs = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            outs.append(fn())
    finally:
        torch.set_num_threads(before)
    return outs
