"""The kernels are torch custom ops with fake implementations (so torch.compile and CUDA graphs trace
them without running them), and llama_fast.ops reaches them with backend="triton"."""
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
        g = torch.ops.llama_fast_triton.gate_up_silu(h, wgu)
        y = torch.ops.llama_fast_triton.quant_linear(h, qweight, scale, offset, 4, 8, None)
        return h, res, a, m, g, y

    qw = quant.quantize(torch.randn(6, 8), bits=4, group_size=8)
    args = (torch.randn(3, 8), torch.ones(8), torch.randn(2, 8), torch.randn(8, 8), torch.randn(1, 3, 4, 16), torch.randn(1, 3, 2, 16),
            torch.arange(3)[None], torch.randn(10, 8), torch.randn(10, 8), qw.qweight, qw.scale, qw.offset,
            torch.zeros(1, 5, 2, 16), torch.zeros(1, 5, 2, 16), torch.arange(3)[None])
    graph = make_fx(layer, tracing_mode="fake")(*args)
    called = {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
    for op in ("rms_norm", "fused_add_rms_norm", "rotary_", "store_kv_", "attention", "silu_and_mul",
               "gate_up_silu", "quant_linear"):
        assert f"llama_fast_triton.{op}.default" in called, (op, called)
    outs = graph(*args)   # the fake shapes agree with what the kernels produce
    assert [tuple(o.shape) for o in outs] == [(3, 8), (3, 8), (1, 3, 4, 16), (2, 4), (3, 4), (3, 6)]


def test_ops_backend_triton_reaches_the_kernels():
    assert ops.unavailable_reason("triton", torch.device("cpu")) is None
    x, w = torch.randn(2, 16), torch.randn(16)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6, backend="triton"), kernels.rms_norm(x, w, 1e-6))
    qw = quant.quantize(torch.randn(8, 64), bits=8, group_size=64)
    xq = torch.randn(1, 64)
    torch.testing.assert_close(ops.quant_linear(xq, qw, backend="triton"), kernels.quant_linear(xq, qw))
    dense = torch.randn(5, 16)
    torch.testing.assert_close(ops.linear(x, dense, backend="triton"), x @ dense.T)
