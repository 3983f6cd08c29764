"""The CPU backend's instruction-set dispatch: LLAMA_FAST_CPU_ISA (read once per process) and the in-process
switch the op tests use."""
import os
import subprocess
import sys

import pytest
import torch

from llama_fast import ops

pytest.importorskip("llama_fast._C")


def _isa_in_subprocess(value: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, LLAMA_FAST_CPU_ISA=value)
    code = "from llama_fast.ops import cpu; print(cpu.set_isa(''))"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def _hardware_best(cpu) -> str:
    """The highest level this CPU has, whatever LLAMA_FAST_CPU_ISA lowered this process to: asking for the
    top level is clamped to the CPU (and leaves the process at that level; callers restore theirs)."""
    current = cpu.set_isa("")
    best = cpu.set_isa("avx512_bf16")
    cpu.set_isa(current)
    return best


def test_env_var_lowers_the_isa():
    from llama_fast.ops import cpu
    best = _hardware_best(cpu)
    for want in ("portable", "avx2"):
        r = _isa_in_subprocess(want)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == (want if best != "portable" else "portable")


def test_env_var_unknown_value_is_an_error():
    r = _isa_in_subprocess("sse9")
    assert r.returncode != 0 and "is not one of portable, avx2, avx512, avx512_vnni, avx512_bf16" in r.stderr


def test_set_isa_never_exceeds_the_cpu_and_round_trips():
    from llama_fast.ops import cpu
    current = cpu.set_isa("")  # may be below the CPU's best when LLAMA_FAST_CPU_ISA is set
    best = _hardware_best(cpu)
    try:
        assert cpu.set_isa("portable") == "portable"
        x, w = torch.randn(3, 83), torch.randn(83)
        torch.testing.assert_close(ops.rms_norm(x, w, backend="cpu"), ops.rms_norm(x, w, backend="torch"))
        assert cpu.set_isa("avx512_bf16") == best
        assert cpu.set_isa("avx2") == ("avx2" if best != "portable" else "portable")
        # the levels are a chain: asking for one between two clamps to the lower of it and the CPU's best
        order = ("portable", "avx2", "avx512", "avx512_vnni", "avx512_bf16")
        for want in order:
            assert cpu.set_isa(want) == order[min(order.index(want), order.index(best))]
    finally:
        cpu.set_isa(current)
    with pytest.raises(ValueError, match="is not one of"):
        cpu.set_isa("neon")


def test_cpu_is_the_default_backend_for_cpu_tensors():
    from llama_fast.ops import _backend, cpu
    assert ops.default_backend("cpu") == "cpu"
    for op in ("rms_norm", "fused_add_rms_norm", "rotary", "attention", "silu_and_mul", "linear", "quant_linear",
               "store_kv"):
        assert _backend.resolve(op, None, torch.device("cpu")) is getattr(cpu, op)
