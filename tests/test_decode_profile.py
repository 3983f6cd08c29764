"""LLAMA_FAST_DECODE_PROFILE (csrc/cpu/decode_profile.h): the per-phase profile of the fused CPU decode step,
in wall or CPU time, with the GB/s each linear achieved over its weights."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("llama_fast._C")

_DECODE = """
import sys, torch
sys.path.insert(0, {tests!r})
from conftest import tiny_config
from llama_fast import LlamaForCausalLM
from llama_fast.config import LlamaConfig
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(**tiny_config()), dtype=torch.float32).eval()
with torch.inference_mode():
    cache = model.model.new_cache(1, 32)
    tok = model(torch.tensor([[1, 2, 3]]), past_key_values=cache).logits[:, -1:].argmax(-1)
    for _ in range(4):
        tok = model(tok, past_key_values=cache).logits[:, -1:].argmax(-1)
"""


@pytest.mark.parametrize("mode, clock", [("1", "wall"), ("cpu", "calling thread's CPU time")])
def test_profile_reports_each_phase_and_the_linears_bandwidth(mode, clock):
    env = dict(os.environ, LLAMA_FAST_DECODE_PROFILE=mode, OMP_NUM_THREADS="1")
    code = _DECODE.format(tests=os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stderr.splitlines()
    header = [line for line in lines if line.startswith("cpu_decode_step, us per call")]
    # the 3-token prefill runs the plan too (B x T <= 64 rows), then 4 decode steps
    assert header and f"({clock}) over 5 calls" in header[0], r.stderr[-2000:]
    for linear in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
        row = [line for line in lines if line.split()[:1] == [linear]]
        assert row and row[0].endswith("GB/s of weights"), r.stderr[-2000:]
    for phase in ("checks", "attention", "total"):
        assert any(line.split()[:1] == [phase] for line in lines), r.stderr[-2000:]
