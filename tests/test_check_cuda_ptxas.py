"""The ptxas resource checker (.ci/check_cuda_ptxas.py): its parser on canned `nvcc -Xptxas -v` output, and
its verdicts (spills fail, missing nvcc skips)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "check_cuda_ptxas.py"

CANNED = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN10llama_fast4cuda12_GLOBAL__N_114rms_norm_kernelIfLb1ELb0EEEvPKT_' for 'sm_80'
ptxas info    : Function properties for _ZN10llama_fast4cuda12_GLOBAL__N_114rms_norm_kernelIfLb1ELb0EEEvPKT_
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 31 registers, used 1 barriers, 128 bytes smem, 404 bytes cmem[0]
ptxas info    : Compiling entry function '_Z6spillyv' for 'sm_80'
ptxas info    : Function properties for _Z6spillyv
    24 bytes stack frame, 18 bytes spill stores, 28 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 24 bytes cumulative stack size, 34816 bytes smem
ptxas info    : Compiling entry function '_Z4tinyv' for 'sm_90'
ptxas info    : Function properties for _Z4tinyv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, used 0 barriers, 352 bytes cmem[0]
"""


@pytest.fixture(scope="module")
def checker():
    spec = importlib.util.spec_from_file_location("check_cuda_ptxas", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_parser_reads_registers_smem_and_spills(checker):
    kernels = checker.parse_ptxas(CANNED, "rms_norm.cu")
    assert [(k.kernel, k.arch) for k in kernels] == [
        ("_ZN10llama_fast4cuda12_GLOBAL__N_114rms_norm_kernelIfLb1ELb0EEEvPKT_", "80"),
        ("_Z6spillyv", "80"), ("_Z4tinyv", "90")]
    norm, spilly, tiny = kernels
    assert (norm.registers, norm.smem, norm.spills) == (31, 128, False)
    assert (spilly.registers, spilly.smem, spilly.stack, spilly.spill_stores, spilly.spill_loads) == (168, 34816, 24,
                                                                                                     18, 28)
    assert spilly.spills
    assert (tiny.registers, tiny.smem, tiny.spills) == (8, 0, False)  # no smem field means none


def test_parser_handles_properties_listed_after_the_entries(checker):
    text = ("ptxas info    : Compiling entry function '_Z1av' for 'sm_90'\n"
            "ptxas info    : Compiling entry function '_Z1bv' for 'sm_90'\n"
            "ptxas info    : Function properties for _Z1av\n"
            "    0 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
            "ptxas info    : Used 40 registers, 1024 bytes smem\n"
            "ptxas info    : Function properties for _Z1bv\n"
            "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
            "ptxas info    : Used 12 registers\n")
    a, b = checker.parse_ptxas(text)
    assert (a.registers, a.smem, a.spills) == (40, 1024, True)
    assert (b.registers, b.smem, b.spills) == (12, 0, False)


def test_table_lists_every_kernel(checker):
    table = checker.render(checker.parse_ptxas(CANNED, "x.cu"), "Cuda compilation tools, release 13.0")
    assert table.count("| x.cu |") == 3
    assert "| sm_80 | 168 | 34816 | 18/28 stack 24 |" in table


def test_missing_nvcc_is_a_skip_not_a_failure(checker, monkeypatch, capsys):
    monkeypatch.setattr(checker, "find_nvcc", lambda: None)
    assert checker.main([]) == 0
    assert "SKIP" in capsys.readouterr().out
