"""The fp32-FMA GEMVs (kquant_linear_fma.cpp for ggml blocks, quant_linear_avx2.cpp's fma_* for int4 / int8)
forced by LLAMA_FAST_FMA_GEMV=1 at LLAMA_FAST_CPU_ISA=avx2, against the fp64 product with the exact dequantized
weight. By default they run only on AVX2 CPUs without VNNI (and int4 / int8 only for int8 with 2+ fp32 rows), so
CI's AVX-512 machines would never reach them; both variables are read once per process, hence the subprocess,
which runs this file's _check_all()."""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("llama_fast._C")

_HERE = os.path.dirname(os.path.abspath(__file__))


def _check_all() -> None:
    sys.path[:0] = [_HERE, os.path.dirname(_HERE)]
    from kquant_util import random_blocks
    from tolerance import assert_matches_reference

    from llama_fast import kquants, ops, quant
    from llama_fast.ops import cpu
    assert cpu.set_isa("") in ("avx2", "portable")
    if cpu.set_isa("") == "portable":
        return  # no AVX2: nothing to force
    checked = 0
    # int4 / int8: asymmetric (Q4_1-like), symmetric int4 (offset -8 scale), int8; K with a last chunk of 32
    # (K % 64 == 32), groups of 96 and 128, every scale dtype; 1..8 rows (the kernel's steps of 4, then 1-3) and
    # 11 (two calls of rows()).
    cases = [(4, False, 576, 32, torch.float16), (4, True, 160, 32, torch.bfloat16), (4, False, 288, 96, torch.float32),
             (8, True, 576, 32, torch.float16), (8, True, 160, 32, torch.float32), (8, True, 256, 128, torch.bfloat16)]
    for bits, symmetric, k, gs, scale_dtype in cases:
        g = torch.Generator().manual_seed(k + bits)
        qw = quant.quantize(torch.randn(37, k, generator=g), bits=bits, group_size=gs, symmetric=symmetric,
                            scale_dtype=scale_dtype)
        for m in (1, 2, 3, 4, 5, 8, 11):
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(m, k, generator=g).to(dtype)
                out = ops.quant_linear(x, qw)
                want = x.double() @ qw.dequantize(torch.float64).t()
                assert_matches_reference(out, want.float(), torch.nn.functional.linear(x, qw.dequantize(dtype)),
                                         f"int{bits} sym={symmetric} k={k} g={gs} {scale_dtype} m={m} {dtype}")
                checked += 1
    # inf / NaN activations take the portable path (its inf * 0 may give NaN where the reference has inf: nothing
    # finite may come out of the row, as tests/ops/test_quant_linear.py asks), the other row is unaffected
    qw = quant.quantize(torch.randn(19, 256, generator=g), bits=8, group_size=32, symmetric=True)
    x = torch.randn(2, 256, generator=g)
    x[0, 5] = float("inf")
    want = x.double() @ qw.dequantize(torch.float64).t()
    out = ops.quant_linear(x, qw)
    assert not torch.isfinite(out[0]).any()
    assert_matches_reference(out[1:], want[1:].float(), what="the finite row next to an inf one")
    # ggml blocks, the types kquant_linear_fma.cpp has
    for kind in ("Q8_0", "Q5_0", "Q5_1", "Q4_K", "Q6_K"):
        k = 512 if kquants.BLOCKS[kind][0] == 256 else 576
        w = kquants.KQuantWeight.single(kind, random_blocks(kind, 29, k, seed=k), k)
        for m in (1, 2, 3, 5):
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
                out = ops.kquant_linear(x, w)
                want = x.double() @ w.dequantize(torch.float64).t()
                assert_matches_reference(out, want.float(), torch.nn.functional.linear(x, w.dequantize(dtype)),
                                         f"{kind} m={m} {dtype}")
                checked += 1
    print(f"checked {checked}")


def test_fma_gemv_forced_matches_reference():
    env = dict(os.environ, LLAMA_FAST_CPU_ISA="avx2", LLAMA_FAST_FMA_GEMV="1", OMP_NUM_THREADS="2")
    r = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "checked" in r.stdout or r.stdout == "", r.stdout


if __name__ == "__main__":
    _check_all()
