"""The Triton compile check (.ci/check_triton_cubins.py): its ptxas-log parser, its verdicts, and one real
compilation for sm_80 (triton's bundled ptxas; no GPU needed)."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "check_triton_cubins.py"

LOG = """\
ptxas info    : Compiling entry function '_quant_matmul_kernel' for 'sm_80'
ptxas info    : Function properties for _quant_matmul_kernel
    40 bytes stack frame, 40 bytes spill stores, 36 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 40 bytes cumulative stack size, 560 bytes cmem[0]
"""


@pytest.fixture(scope="module")
def checker():
    spec = importlib.util.spec_from_file_location("check_triton_cubins", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_parser_reads_registers_and_spills(checker):
    assert checker.parse_ptxas_log(LOG) == (255, 76)
    assert checker.parse_ptxas_log("") == (None, 0)


def test_verdicts(checker):
    ok = {"regs": 128, "spills": 0, "shared": 160 * 1024}
    assert checker.verdict(ok, 80) is None
    assert "A100 limit" in checker.verdict({**ok, "shared": 200 * 1024}, 80)
    assert checker.verdict({**ok, "shared": 200 * 1024}, 90) is None
    assert "spills" in checker.verdict({**ok, "spills": 8}, 90)
    assert "no ptxas register report" in checker.verdict({**ok, "regs": None}, 80)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter compiles nothing")
def test_compiles_a_kernel_for_sm80(checker, monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))        # a fresh cache: ptxas really runs
    monkeypatch.setenv("TRITON_DUMP_PTXAS_LOG", "1")
    monkeypatch.syspath_prepend(str(SCRIPT.parents[1]))
    row = checker._compile_one(("store_kv", "store_kv", 0, 80))
    assert row["error"] is None, row
    assert 0 < row["regs"] <= 255 and row["spills"] == 0 and row["shared"] == 0
