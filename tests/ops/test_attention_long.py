"""Long prefill on the CPU: the tiled online-softmax kernel (csrc/cpu/attention.cpp; bf16 full-length prefill goes
to ATen's flash kernel, tiled as well) matches the reference at 2K tokens, and its peak memory does not grow with
T^2: no Tq x Tk buffer is allocated. The bf16 delegation runs ATen's kernel per (batch, query head) on our thread
pool: it matches the reference, equals ATen's whole-tensor call bit for bit, and forks no OpenMP team."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from llama_fast import _native, ops
from llama_fast.ops import reference

from op_fixtures import matches_reference, threads  # noqa: F401  (pytest fixtures)

pytestmark = pytest.mark.skipif(_native.extension() is None, reason="the CPU kernels are not built")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_long_prefill_matches_reference(dtype, matches_reference):
    g = torch.Generator().manual_seed(0)
    b, t, hq, hkv, d = 1, 2048, 2, 1, 64
    q = torch.randn(b, t, hq, d, generator=g).to(dtype)
    k = torch.randn(b, t, hkv, d, generator=g).to(dtype)
    v = torch.randn(b, t, hkv, d, generator=g).to(dtype)
    for lens in (None, torch.tensor([t - 5], dtype=torch.int32)):   # full (bf16: ATen's kernel) and ragged (ours)
        out = ops.attention(q, k, v, True, lens, backend="cpu")
        want = reference.attention(q.float(), k.float(), v.float(), True, lens)
        plain = reference.attention(q, k, v, True, lens) if dtype == torch.float32 else torch.nn.functional.\
            scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(hq, 1),
                                         v.transpose(1, 2).repeat_interleave(hq, 1),
                                         attn_mask=reference.attention_mask(b, t, t, True, lens, q.device)
                                         ).transpose(1, 2)
        matches_reference(out, want, plain)


# (B, T, Hq, Hkv, D): GQA groups 1 / 3 (SmolLM2's 9 over 3) / 4, T at the delegation threshold (128), just past
# it, and past the flash kernel's larger query block (T >= 768)
DELEGATED_CASES = [(2, 128, 4, 4, 64), (2, 131, 9, 3, 64), (2, 300, 8, 2, 128), (2, 800, 9, 3, 64)]


@pytest.mark.parametrize("case", DELEGATED_CASES, ids=lambda c: "B{}_T{}_H{}/{}_D{}".format(*c))
def test_bf16_prefill_delegation(case, threads, matches_reference):
    b, t, hq, hkv, d = case
    g = torch.Generator().manual_seed(1)
    q = torch.randn(b, t, hq, d, generator=g).bfloat16()
    k = torch.randn(b, t, hkv, d, generator=g).bfloat16()
    v = torch.randn(b, t, hkv, d, generator=g).bfloat16()
    out = ops.attention(q, k, v, True, None, backend="cpu")
    whole = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True).transpose(1, 2)
    # Exact: the op runs the same ATen kernel per (batch, head) slice, and that kernel computes every (batch,
    # head, query block) independently with block sizes that depend on T and D only (csrc/cpu/ops_cpu.cpp).
    assert torch.equal(out, whole)
    want = reference.attention(q.float(), k.float(), v.float(), True, None)
    group = hq // hkv
    plain = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(group, 1), v.transpose(1, 2).repeat_interleave(group, 1),
        attn_mask=reference.attention_mask(b, t, t, True, None, q.device)).transpose(1, 2)
    matches_reference(out, want, plain)


def test_bf16_prefill_delegation_under_inference_mode():
    """The pool's helper threads take the caller's thread-local state: the output made under inference mode is
    an inference tensor, which they could not write into otherwise."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 160, 4, 64, generator=g).bfloat16() for _ in range(3))
    want = ops.attention(q, k, v, True, None, backend="cpu")
    with torch.inference_mode():
        out = ops.attention(q, k, v, True, None, backend="cpu")
    assert torch.equal(out, want)


_TEAM_SCRIPT = textwrap.dedent("""
    import os, torch
    from llama_fast import ops
    threads = lambda: len(os.listdir("/proc/self/task"))
    q, k, v = (torch.randn(1, 256, 4, 64, dtype=torch.bfloat16) for _ in range(3))
    x, w = torch.randn(512, 4096, dtype=torch.bfloat16), torch.ones(4096, dtype=torch.bfloat16)
    ops.rms_norm(x, w, 1e-5, backend="cpu")                                     # starts our pool's helper only
    assert torch.ops.llama_fast.cpu_pool_state()[0] == 1
    before = threads()
    ops.attention(q, k, v, True, None, backend="cpu")                           # delegated to ATen's kernel
    after = threads()
    torch.nn.functional.scaled_dot_product_attention(                           # ATen directly: forks its team
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    print(before, after, threads())
""")


def test_bf16_prefill_delegation_forks_no_openmp_team():
    """ATen's OpenMP team would spin on our pool's cores after each call (libgomp's GOMP_SPINCOUNT); the
    delegation runs the kernel single-threaded inside each pool thread, so no team thread is ever started. The
    direct ATen call afterwards shows that the count does see a team when one is forked."""
    r = subprocess.run([sys.executable, "-c", _TEAM_SCRIPT], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr
    before, after, with_team = map(int, r.stdout.split()[-3:])
    assert after == before
    assert with_team > after


_PEAK_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from llama_fast import ops
    from llama_fast.ops import reference
    t, dtype, which = int(sys.argv[1]), getattr(torch, sys.argv[2]), sys.argv[3]
    q = torch.randn(1, t, 2, 64).to(dtype)
    k = torch.randn(1, t, 1, 64).to(dtype)
    v = torch.randn(1, t, 1, 64).to(dtype)
    lens = torch.tensor([t - 1], dtype=torch.int32)        # ragged: our kernel, not ATen's
    run = (lambda: ops.attention(q, k, v, True, lens, backend="cpu")) if which == "cpu" else \\
        (lambda: reference.attention(q, k, v, True, lens))
    small = (q[:, :64], k[:, :64], v[:, :64])
    ops.attention(*small, True, None, backend="cpu")        # thread pool and thread-local buffers exist

    def status_kib(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    # The peak is measured from the resident size now, not from the process's earlier peak: freed memory of the
    # imports (their peak above today's size differs by machine) would otherwise hide the first allocations.
    # Writing 5 to clear_refs resets the peak (VmHWM) to the current size (Linux >= 4.0).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before, peak = status_kib("VmRSS"), lambda: status_kib("VmHWM")
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = run()
    print((peak() - before) * 1024)
""")


def _peak_growth(t: int, dtype: str, which: str) -> int:
    """Bytes by which one attention call raises the process's peak resident memory (a fresh process)."""
    r = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(t), dtype, which], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr
    return int(r.stdout.split()[-1])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prefill_memory_is_not_quadratic(dtype):
    """At T = 4096 one Tq x Tk fp32 score matrix per head is 64 MiB (x 2 heads). The kernel's peak growth over
    the call stays under a quarter of ONE such matrix: what it allocates is the output (1 MiB) and per-task
    softmax states (rows x (D + 2) floats per task, linear in T). The reference, which materializes the scores,
    is measured the same way and exceeds it, so the measurement does see a T x T buffer when there is one."""
    t = 4096
    one_matrix = t * t * 4
    assert _peak_growth(t, dtype, "cpu") < one_matrix // 4
    assert _peak_growth(t, dtype, "reference") > one_matrix
