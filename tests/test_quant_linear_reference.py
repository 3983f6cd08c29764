"""ops.quant_linear's reference (dequantize, then matmul in fp32) and the quantized linear.Linear module."""
import pytest
import torch

from llama_fast import ops
from llama_fast.linear import Linear, dequantize_linears_
from llama_fast.quant import quantize


def make(n, k, bits, group, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    return quantize(w, bits, group, scale_dtype=dtype)


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (8, -1), (8, 64)])
@pytest.mark.parametrize("rows,n,k", [(1, 7, 128), (7, 83, 256), (3, 769, 384)])
def test_reference_equals_dense_matmul_fp32(bits, group, rows, n, k):
    qw = make(n, k, bits, group)
    x = torch.randn(rows, k)
    bias = torch.randn(n)
    exact = x.double() @ qw.dequantize(torch.float64).t() + bias.double()
    out = ops.quant_linear(x, qw, bias, backend="torch")
    assert out.dtype == torch.float32 and out.shape == (rows, n)
    # fp32 accumulation over K products: a few ulps of the sum of |terms|.
    terms = x.double().abs() @ qw.dequantize(torch.float64).abs().t() + bias.double().abs()
    assert ((out.double() - exact).abs() <= terms * k * 2 ** -24).all()
    # And no worse than 2x PyTorch's own fp32 linear on the dequantized weight. Not bit equality: F.linear
    # (one fused addmm) and `x @ w.T + b` are different BLAS calls and differ in the last bit on some BLAS
    # builds (MKL on some CPUs).
    torch_err = (torch.nn.functional.linear(x, qw.dequantize(torch.float32), bias).double() - exact).abs().max()
    assert (out.double() - exact).abs().max() <= 2 * torch_err + 2 ** -24 * terms.max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_low_precision_within_budget(dtype):
    """The reference in bf16/fp16 (fp32 accumulation, one rounding) is at least as accurate as PyTorch's
    own matmul of the dequantized weight in that dtype."""
    qw = make(83, 512, 4, 64, dtype=dtype)
    x = torch.randn(2, 5, 512).to(dtype)
    oracle = x.double() @ qw.dequantize(torch.float64).t()
    out = ops.quant_linear(x, qw, backend="torch")
    assert out.dtype == dtype and out.shape == (2, 5, 83)
    torch_err = (x @ qw.dequantize(dtype).t()).double().sub(oracle).abs().max()
    ours_err = out.double().sub(oracle).abs().max()
    assert ours_err <= torch_err * 1.01


def test_linear_module_quantize_and_forward():
    torch.manual_seed(0)
    layer = Linear(256, 83, bias=True)
    torch.nn.init.normal_(layer.weight, std=0.05)
    torch.nn.init.normal_(layer.bias)
    layer.backend = "torch"
    x = torch.randn(4, 256)
    dense = layer(x)
    layer.quantize_(8, group_size=-1, name="model.layers.0.mlp.up_proj")
    assert layer.quantized and layer.weight is None and (layer.bits, layer.group_size) == (8, 256)
    assert "bits=8, group_size=256" in repr(layer)
    sd = layer.state_dict()
    assert set(sd) == {"qweight", "scales", "bias"}  # int8 has no offsets
    out = layer(x)
    # Exact by construction: a quantized Linear with backend "torch" is ops.quant_linear's reference on its
    # own QuantizedWeight and bias (the same ATen calls on the same tensors).
    assert torch.equal(out, ops.quant_linear(x, layer.quantized_weight(), layer.bias, backend="torch"))
    w64 = layer.quantized_weight().dequantize(torch.float64)
    exact = x.double() @ w64.t() + layer.bias.double()
    terms = x.double().abs() @ w64.abs().t() + layer.bias.double().abs()
    assert ((out.double() - exact).abs() <= terms * 256 * 2 ** -24).all()
    assert (out - dense).abs().max() < 0.02 * dense.abs().max()
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj is already quantized"):
        layer.quantize_(4, name="model.layers.0.mlp.up_proj")


def test_linear_state_dict_round_trip():
    src = Linear(128, 7)
    torch.nn.init.normal_(src.weight)
    src.quantize_(4, group_size=32, scale_dtype=torch.float16)
    sd = src.state_dict()
    assert set(sd) == {"qweight", "scales", "offsets"}
    assert sd["qweight"].dtype == torch.uint8 and sd["qweight"].shape == (7, 64)
    assert sd["scales"].shape == sd["offsets"].shape == (7, 4) and sd["scales"].dtype == torch.float16

    dst = Linear(128, 7)
    dst.set_quantized(make(7, 128, 4, 32, dtype=torch.float16))   # same format, other numbers
    dst.load_state_dict(sd)
    assert torch.equal(dst.quantized_weight().dequantize(), src.quantized_weight().dequantize())
    moved = dst.to(torch.float32)  # module .to() casts the floating buffers (the scales), not the codes
    assert moved.scales.dtype == torch.float32 and moved.qweight.dtype == torch.uint8


def test_linear_rejects_mismatched_quantized_weight():
    layer = Linear(128, 7)
    with pytest.raises(ValueError,
                       match=r"o_proj.weight: quantized weight has shape \(7, 64\), layer expects \(7, 128\)"):
        layer.set_quantized(make(7, 64, 4, 32), name="o_proj.weight")


def test_model_wide_dequantize():
    model = torch.nn.Module()
    model.block = torch.nn.Module()
    model.block.up = Linear(64, 32)
    model.lm_head = Linear(64, 10)
    for layer in (model.block.up, model.lm_head):
        torch.nn.init.normal_(layer.weight)
    dense_up = model.block.up.weight.detach().clone()
    model.block.up.quantize_(4, group_size=32, name="block.up.weight")
    expected = model.block.up.quantized_weight().dequantize(torch.float32)
    assert (expected - dense_up).abs().max() > 0
    dequantize_linears_(model, torch.float32)
    assert not model.block.up.quantized and set(model.block.up.state_dict()) == {"weight"}
    # Exact: dequantize_ stores the same fp32 dequantization as quantized_weight().dequantize().
    assert torch.equal(model.block.up.weight, expected)
    assert not model.lm_head.quantized    # a dense layer is left as it is
    with pytest.raises(ValueError, match="block.up.weight: group_size 48 does not divide K=64"):
        model.block.up.quantize_(4, group_size=48, name="block.up.weight")
