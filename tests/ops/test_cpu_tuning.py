"""The CPU kernels' machine-dependent choices (csrc/cpu/tuning.h): derived at run time from this CPU's caches,
overridable for measurements, and never a change to any result (a prefetch distance moves no arithmetic)."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("llama_fast._C")

from llama_fast.ops import cpu  # noqa: E402

# Every weight-streaming kernel that prefetches (dense fp32 / bf16 GEMV, int4 / int8 GEMV on every ISA level this
# CPU has), on a few rows; prints a digest of the outputs' bytes.
_OUTPUTS = """
import hashlib, json, torch
from llama_fast import quant
from llama_fast.ops import cpu
torch.manual_seed(0)
digest = hashlib.sha256()
for isa in ("avx512_bf16", "avx512_vnni", "avx512", "avx2", "portable"):
    cpu.set_isa(isa)
    for m in (1, 3):
        x = torch.randn(m, 384)
        w = torch.randn(700, 384)
        outs = [cpu.linear(x, w), cpu.linear(x.bfloat16(), w.bfloat16())]
        for bits in (4, 8):
            q = quant.quantize(w, bits=bits, group_size=32, symmetric=bits == 8)
            outs += [cpu.quant_linear(x, q), cpu.quant_linear(x.bfloat16(), q)]
        for o in outs:
            digest.update(o.float().numpy().tobytes())
print(json.dumps({"tuning": cpu.tuning(), "digest": digest.hexdigest()}))
"""


def _run(prefetch: str | None) -> dict:
    import json
    env = dict(os.environ, OMP_NUM_THREADS="2")
    env.pop("LLAMA_FAST_PREFETCH_BYTES", None)
    if prefetch is not None:
        env["LLAMA_FAST_PREFETCH_BYTES"] = prefetch
    r = subprocess.run([sys.executable, "-c", _OUTPUTS], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_prefetch_distance_follows_the_l1d_size():
    t = cpu.tuning()
    assert t["l1d_bytes"] >= 0 and t["l2_bytes"] >= 0 and t["l3_bytes"] >= 0
    if "LLAMA_FAST_PREFETCH_BYTES" in os.environ:
        pytest.skip("the prefetch distance is overridden in this environment")
    l1d = t["l1d_bytes"] or 32 * 1024
    assert t["prefetch_bytes"] == min(max(l1d // 4, 2048), 16384) // 64 * 64


def test_prefetch_distance_changes_no_result():
    default, off, far = _run(None), _run("0"), _run("1048576")
    assert off["tuning"]["prefetch_bytes"] == 0
    assert far["tuning"]["prefetch_bytes"] == 1048576
    # bit for bit: a software prefetch only moves data between memory and the caches
    assert default["digest"] == off["digest"] == far["digest"]


def test_quant_gemm_rows_are_a_decode_step_or_fewer_and_overridable():
    """The GEMV / GEMM switch of the quantized linears (tuning.h): at most cpu_max_gemv_rows() + 1 (prefill-sized
    inputs always take the GEMM), and LLAMA_FAST_QUANT_GEMM_ROWS / LLAMA_FAST_KQUANT_GEMM_ROWS set it (at least 1)."""
    import json

    import torch
    top = torch.ops.llama_fast.cpu_max_gemv_rows() + 1
    rows = cpu.tuning()["gemm_from_rows"]
    assert set(rows) == {"int4", "int8", "ggml_super_blocks", "ggml_blocks_of_32"}
    assert all(1 <= r <= top for r in rows.values())
    env = dict(os.environ, LLAMA_FAST_QUANT_GEMM_ROWS="5", LLAMA_FAST_KQUANT_GEMM_ROWS="-3")
    code = "import json; from llama_fast.ops import cpu; print(json.dumps(cpu.tuning()))"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])["gemm_from_rows"]
    assert got == {"int4": 5, "int8": 5, "ggml_super_blocks": 1, "ggml_blocks_of_32": 1}


def test_amx_bf16_rows_within_a_decode_step_and_overridable():
    """From how many rows bf16 linears run the AMX GEMM (tuning.h: amx_bf16_from_rows): 0 where the CPU has no AMX
    or a lower instruction set is in effect, else at least 1; LLAMA_FAST_AMX_BF16_ROWS sets it."""
    import json

    import torch
    best = cpu.set_isa("")
    default = cpu.tuning()["amx_bf16_from_rows"]
    assert default == 0 or 1 <= default <= torch.ops.llama_fast.cpu_max_gemv_rows()
    try:
        cpu.set_isa("avx512")
        assert cpu.tuning()["amx_bf16_from_rows"] == 0     # the lower levels never take it
    finally:
        cpu.set_isa(best)
    env = dict(os.environ, LLAMA_FAST_AMX_BF16_ROWS="2")
    code = "import json; from llama_fast.ops import cpu; print(json.dumps(cpu.tuning()))"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])["amx_bf16_from_rows"]
    assert got == (2 if default else 0)


def test_amx_quant_rows_reported_and_overridable():
    """From how many rows the quantized linears run the exact AMX GEMM (tuning.h: amx_quant_from_rows,
    amx_kquant_from_rows): all 0 where the CPU has no AMX or a lower instruction set is in effect, else within a
    decode step's rows; LLAMA_FAST_AMX_QUANT_ROWS / LLAMA_FAST_AMX_KQUANT_ROWS set them."""
    import json

    import torch
    best = cpu.set_isa("")
    default = cpu.tuning()["amx_quant_from_rows"]
    assert set(default) == {"int_fp32", "int_bf16", "ggml_blocks_of_32", "ggml_super_blocks"}
    on = any(default.values())
    assert all((1 <= v <= torch.ops.llama_fast.cpu_max_gemv_rows()) if on else v == 0 for v in default.values())
    try:
        cpu.set_isa("avx512")
        assert set(cpu.tuning()["amx_quant_from_rows"].values()) == {0}   # the lower levels never take it
    finally:
        cpu.set_isa(best)
    env = dict(os.environ, LLAMA_FAST_AMX_QUANT_ROWS="3", LLAMA_FAST_AMX_KQUANT_ROWS="4")
    code = "import json; from llama_fast.ops import cpu; print(json.dumps(cpu.tuning()))"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])["amx_quant_from_rows"]
    want = {"int_fp32": 3, "int_bf16": 3, "ggml_blocks_of_32": 4, "ggml_super_blocks": 4}
    assert got == (want if on else dict.fromkeys(want, 0))


_HUGE_PAGE_PREFETCH = """
import json, torch
from llama_fast.ops import cpu
buf = torch.empty(1 << 16, dtype=torch.bfloat16)
torch.ops.llama_fast.cpu_huge_page_range(buf.data_ptr(), buf.numel() * 2, True)
print(json.dumps({"tuning": cpu.tuning(), "on_huge": torch.ops.llama_fast.cpu_dense_prefetch_bytes(buf.data_ptr())}))
"""


def _json_of_script(script: str, variable: str, value: str | None, unset=()) -> dict:
    """The last stdout line (JSON) of `script` run in a fresh interpreter with the environment variable `variable`
    set to `value` (None: unset), the variables in `unset` unset."""
    import json
    env = dict(os.environ)
    for name in (variable, *unset):
        env.pop(name, None)
    if value is not None:
        env[variable] = value
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("value", [None, "0", "1"])
def test_huge_page_prefetch_follows_the_vendor_or_the_override(value):
    out = _json_of_script(_HUGE_PAGE_PREFETCH, "LLAMA_FAST_HUGE_PAGE_PREFETCH", value,
                          unset=("LLAMA_FAST_PREFETCH_BYTES",))
    t = out["tuning"]
    if value is None:
        with open("/proc/cpuinfo") as f:
            intel = "GenuineIntel" in f.read()
        assert t["prefetch_on_huge_pages"] == intel
    else:
        assert t["prefetch_on_huge_pages"] == (value == "1")
    # a registered huge-page buffer gets the distance only where the choice says so
    assert out["on_huge"] == (t["prefetch_bytes"] if t["prefetch_on_huge_pages"] else 0)


_INT4_PREFETCH = """
import json, torch
from llama_fast.ops import cpu
g = torch.Generator().manual_seed(0)
q = torch.randint(0, 256, (300, 288), generator=g, dtype=torch.uint8)
scale = torch.rand(300, 18, generator=g).half() * 0.01
offset = -torch.rand(300, 18, generator=g).half() * 0.01
x = torch.randn(3, 576, generator=g)
y = torch.ops.llama_fast.quant_linear(x, q, scale, offset, 4, 32, None)
print(json.dumps({"tuning": cpu.tuning(), "y": y.flatten().tolist()}))
"""


def test_int4_prefetch_level_follows_the_vendor_or_the_override():
    """Where the int4 GEMV prefetches (L1 on Intel, L2 elsewhere; LLAMA_FAST_INT4_PREFETCH_L2 overrides) changes
    its speed only: both choices give the same bits."""
    outs = {value: _json_of_script(_INT4_PREFETCH, "LLAMA_FAST_INT4_PREFETCH_L2", value) for value in (None, "0", "1")}
    with open("/proc/cpuinfo") as f:
        intel = "GenuineIntel" in f.read()
    assert outs[None]["tuning"]["int4_prefetch_into_l2"] == (not intel)
    assert outs["0"]["tuning"]["int4_prefetch_into_l2"] is False
    assert outs["1"]["tuning"]["int4_prefetch_into_l2"] is True
    assert outs["0"]["y"] == outs["1"]["y"] == outs[None]["y"]
