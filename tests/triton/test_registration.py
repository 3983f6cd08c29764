"""The kernels are torch custom ops with fake implementations (so torch.compile and CUDA graphs trace
them without running them), and llama_fast.ops reaches them with backend="triton"."""
import os
import pathlib
import subprocess
import sys

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from llama_fast import kernels, ops, quant


def test_ops_traced_with_fake_tensors_become_graph_nodes():
    def layer(x, w, gu, wgu, q, k, pos, cos, sin, qweight, scale, offset, kc, vc, slots):
        h = torch.ops.llama_fast_triton.rms_norm(x, w, 1e-6)
        h, res = torch.ops.llama_fast_triton.fused_add_rms_norm(h, x, w, 1e-6)
        torch.ops.llama_fast_triton.rotary_(q, k, pos, cos, sin)
        torch.ops.llama_fast_triton.store_kv_(kc, vc, k, k, slots)
        a = torch.ops.llama_fast_triton.attention(q, kc, vc, True, None, None)
        m = torch.ops.llama_fast_triton.silu_and_mul(gu)
        y = torch.ops.llama_fast_triton.quant_linear(h, qweight, scale, offset, 4, 8, None)
        return h, res, a, m, y

    qw = quant.quantize(torch.randn(6, 8), bits=4, group_size=8)
    args = (torch.randn(3, 8), torch.ones(8), torch.randn(2, 8), torch.randn(8, 8), torch.randn(1, 3, 4, 16),
            torch.randn(1, 3, 2, 16),
            torch.arange(3)[None], torch.randn(10, 8), torch.randn(10, 8), qw.qweight, qw.scale, qw.offset,
            torch.zeros(1, 5, 2, 16), torch.zeros(1, 5, 2, 16), torch.arange(3)[None])
    graph = make_fx(layer, tracing_mode="fake")(*args)
    called = {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
    for op in ("rms_norm", "fused_add_rms_norm", "rotary_", "store_kv_", "attention", "silu_and_mul",
               "quant_linear"):
        assert f"llama_fast_triton.{op}.default" in called, (op, called)
    outs = graph(*args)   # the fake shapes agree with what the kernels produce
    assert [tuple(o.shape) for o in outs] == [(3, 8), (3, 8), (1, 3, 4, 16), (2, 4), (3, 6)]


def test_ops_backend_triton_reaches_the_kernels():
    assert ops.unavailable_reason("triton", torch.device("cpu")) is None
    x, w = torch.randn(2, 16), torch.randn(16)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6, backend="triton"), kernels.rms_norm(x, w, 1e-6))
    qw = quant.quantize(torch.randn(8, 64), bits=8, group_size=64)
    xq = torch.randn(1, 64)
    torch.testing.assert_close(ops.quant_linear(xq, qw, backend="triton"), kernels.quant_linear(xq, qw))
    dense = torch.randn(5, 16)
    torch.testing.assert_close(ops.linear(x, dense, backend="triton"), x @ dense.T)


# Run in a fresh interpreter from the repository root, where kernels/ is also the top-level package
# `kernels`: llama_fast.kernels first (as a test module does), then transformers' probe for the Hugging Face
# `kernels` package, which imports ours by that name. A second copy of the kernel modules used to redefine
# every llama_fast_triton op, and torch destroyed the definitions llama_fast.kernels still called: a
# use-after-free that crashed the one-process Triton suite intermittently in the model tests.
_SECOND_IMPORT = """
import torch
import torch._library.custom_ops as custom_ops
import llama_fast.kernels as lk
from llama_fast.kernels import kernel_module
from transformers.utils import import_utils

import_utils.is_kernels_available()
import kernels
m = kernel_module
ops = {"attention": m("attention").attention, "quant_linear": m("quant_linear").quant_linear_op,
       "rms_norm": m("rms_norm").rms_norm, "fused_add_rms_norm": m("rms_norm").fused_add_rms_norm,
       "rotary_": m("rotary").rotary_, "store_kv_": m("store_kv").store_kv_,
       "silu_and_mul": m("silu_and_mul").silu_and_mul}
for name, op in ops.items():
    assert custom_ops.OPDEFS[f"llama_fast_triton::{name}"] is op, f"llama_fast_triton::{name} was redefined"
assert kernels is lk, "the top-level `kernels` must be an alias of llama_fast.kernels"
try:
    import kernels.rotary
except ImportError as e:
    assert "llama_fast.kernels" in str(e), e
else:
    raise AssertionError("a second copy of a kernel module imported")
x, w = torch.randn(3, 8), torch.rand(8)
torch.testing.assert_close(lk.rms_norm(x, w, 1e-6), torch.ops.llama_fast_triton.rms_norm(x, w, 1e-6))
print("ok")
"""


def test_importing_the_kernels_directory_as_top_level_kernels_keeps_the_ops():
    root = pathlib.Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", _SECOND_IMPORT], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (
        f"exit code {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
