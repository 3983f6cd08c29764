"""The CPU kernels' thread pool (csrc/cpu/thread_pool.cpp) as the rest of the user's process sees it: idle
helpers block (they spin only about a millisecond after a parallel loop, so they take no core from other
threads, llama.cpp's included), and an exception inside a parallel loop comes back as a Python exception
instead of terminating the process."""
import os
import subprocess
import sys
import time

import pytest
import torch

from llama_fast import ops

pytest.importorskip("llama_fast._C")


def _parallel_work():
    """An op that runs a parallel loop over the pool (a wide GEMV: many chunks)."""
    x, w = torch.randn(1, 512), torch.randn(8192, 512)
    ops.linear(x, w, backend="cpu")


def test_idle_helpers_block_instead_of_spinning():
    if torch.get_num_threads() < 2:
        pytest.skip("one thread: the pool starts no helpers")
    _parallel_work()
    helpers, sleeping = torch.ops.llama_fast.cpu_pool_state()
    assert helpers == torch.get_num_threads() - 1
    # The state, not a duration, is checked: with a spin that never ends the helpers would never block. The
    # deadline only bounds how long a failing run takes (a loaded machine may delay a helper's last spin).
    deadline = time.monotonic() + 60
    while sleeping < helpers and time.monotonic() < deadline:
        time.sleep(0.01)
        helpers, sleeping = torch.ops.llama_fast.cpu_pool_state()
    assert sleeping == helpers, f"{helpers - sleeping} of {helpers} idle helper(s) still spinning after 60 s"
    _parallel_work()    # and they wake up for the next loop
    assert torch.ops.llama_fast.cpu_pool_state()[0] == helpers


def test_exception_inside_a_parallel_loop_is_a_python_error():
    # An unknown LLAMA_FAST_CPU_ISA is first noticed inside the attention kernel's parallel loop; the pool used
    # to leave that loop while a helper still ran it (std::terminate: bad_function_call).
    code = ("import torch\nfrom llama_fast import ops\nq = torch.randn(1, 64, 8, 64)\n"
            "try:\n    ops.attention(q, q, q, causal=True, backend='cpu')\n"
            "except ValueError as e:\n    print('ValueError:', e)\n")
    env = dict(os.environ, LLAMA_FAST_CPU_ISA="sse9", OMP_NUM_THREADS="2")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ValueError: LLAMA_FAST_CPU_ISA=sse9 is not one of" in r.stdout
