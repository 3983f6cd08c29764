"""llama_fast.quant: the affine group-wise int4 / int8 format, quantize / dequantize, and bad input."""
import pytest
import torch

from llama_fast.quant import QuantizedWeight, concat_rows, pack_int4, quantize, slice_rows

SCALE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def weight(n, k, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # A realistic spread: mostly small values, a few outliers, a shifted mean (exercises the offset).
    w = torch.randn(n, k, generator=g) * 0.02 + 0.003
    w[torch.rand(n, k, generator=g) < 0.01] *= 20
    return w.to(dtype)


def per_element(t, qw):
    """[N, K/g] -> [N, K]: each group's value at every element of the group."""
    return t.float().repeat_interleave(qw.group_size, dim=1)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
def test_round_to_nearest_error_bound(bits, group_size, symmetric, scale_dtype):
    n, k = 7, 384
    w = weight(n, k, seed=bits + group_size)
    qw = quantize(w, bits, group_size, symmetric=symmetric, scale_dtype=scale_dtype)
    assert qw.shape == (n, k) and qw.bits == bits
    assert qw.group_size == (k if group_size == -1 else group_size)
    assert qw.scale.dtype == scale_dtype and qw.scale.shape == (n, k // qw.group_size)
    codes = qw.unpack()
    if bits == 4:
        assert qw.qweight.dtype == torch.uint8 and qw.qweight.shape == (n, k // 2)
        assert codes.min() >= 0 and codes.max() <= 15
        assert qw.offset is not None and qw.offset.dtype == scale_dtype
    else:
        assert qw.qweight.dtype == torch.int8 and qw.qweight.shape == (n, k)
        assert qw.offset is None and codes.abs().max() <= 127
    err = (w - qw.dequantize(torch.float32)).abs()
    # Round to nearest: within half a step of its group (fp32 evaluation adds at most ~1 ulp of |w|).
    bound = per_element(qw.scale, qw) / 2 + w.abs() * 2 ** -22
    assert (err <= bound).all(), (err - bound).max()
    # ... and the grid is not wastefully coarse: the step is the group's range over the code count.
    wg = w.reshape(n, -1, qw.group_size)
    if bits == 4 and not symmetric:
        step = (wg.amax(-1) - wg.amin(-1)) / 15
    else:
        step = wg.abs().amax(-1) / (7 if bits == 4 else 127)
    # Only the rounding of scale and offset to scale_dtype (both directed outward) separates them.
    assert torch.allclose(qw.scale.float(), step, rtol=2 * torch.finfo(scale_dtype).eps, atol=0)


def test_symmetric_int4_maps_zero_to_code_8():
    w = weight(3, 64)
    w[:, 5] = 0
    qw = quantize(w, 4, 32, symmetric=True)
    assert torch.equal(qw.offset, -8 * qw.scale)
    assert (qw.unpack()[:, 5] == 8).all() and (qw.dequantize(torch.float32)[:, 5] == 0).all()


def test_constant_and_zero_groups_are_exact():
    w = torch.full((2, 64), 0.25)
    w[1] = 0
    assert torch.equal(quantize(w, 4, 32).dequantize(torch.float32), w)  # asymmetric: offset = the value
    for bits, sym in ((4, True), (8, True)):
        qw = quantize(w, bits, 32, symmetric=sym)
        assert torch.equal(qw.dequantize(torch.float32)[1], w[1]) and (qw.scale > 0).all()


def test_default_scale_dtype_follows_weight():
    for dtype in SCALE_DTYPES:
        qw = quantize(weight(4, 64, dtype=dtype), 4, 32)
        assert qw.dtype == dtype and qw.dequantize().dtype == dtype
        assert qw.dequantize(torch.float32).dtype == torch.float32


def test_int4_nibble_order():
    codes = torch.tensor([[1, 2, 3, 4, 15, 0]])
    packed = pack_int4(codes)
    assert packed.tolist() == [[0x21, 0x43, 0x0F]]  # element 2j low nibble, 2j+1 high nibble
    qw = QuantizedWeight(packed, torch.ones(1, 1), None, 4, 6)
    assert qw.unpack().tolist() == codes.tolist()


def test_dequantize_formula():
    codes = torch.tensor([[0, 15, 7, 8]], dtype=torch.uint8)
    qw = QuantizedWeight(pack_int4(codes), torch.tensor([[0.5, 2.0]]), torch.tensor([[-1.0, 3.0]]), 4, 2)
    assert qw.dequantize().tolist() == [[-1.0, 6.5, 17.0, 19.0]]
    q8 = QuantizedWeight(torch.tensor([[-128, 127, 0, -1]], dtype=torch.int8), torch.tensor([[0.25]]), None, 8, 4)
    assert q8.dequantize().tolist() == [[-32.0, 31.75, 0.0, -0.25]]


def test_to_moves_and_casts_scales_only():
    qw = quantize(weight(5, 64), 4, 32)
    half = qw.to(torch.float16)
    assert half.qweight is qw.qweight and half.scale.dtype == torch.float16 and half.offset.dtype == torch.float16
    meta = qw.to("meta")
    assert meta.device.type == "meta" and meta.qweight.device.type == "meta" and meta.scale.dtype == torch.float32
    both = qw.to("cpu", torch.bfloat16)
    assert both.scale.dtype == torch.bfloat16 and both.qweight.dtype == torch.uint8
    assert qw.nbytes == 5 * 32 + 2 * 5 * 2 * 4


def test_concat_and_slice_rows_are_exact():
    parts = [quantize(weight(n, 128, seed=n), 4, 32) for n in (9, 3, 3)]
    fused = concat_rows(parts)
    assert fused.shape == (15, 128)
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))
    back = slice_rows(fused, 9, 12)
    assert torch.equal(back.qweight, parts[1].qweight) and torch.equal(back.offset, parts[1].offset)
    with pytest.raises(ValueError, match="differ in bits"):
        concat_rows([parts[0], quantize(weight(2, 128), 4, 64)])
    with pytest.raises(ValueError, match="offsets"):
        concat_rows([parts[0], QuantizedWeight(parts[1].qweight, parts[1].scale, None, 4, 32)])


def test_from_parts_infers_format():
    qw = quantize(weight(6, 256), 4, 64)
    back = QuantizedWeight.from_parts(qw.qweight, qw.scale, qw.offset, name="layer.q_proj")
    assert (back.bits, back.group_size) == (4, 64) and torch.equal(back.dequantize(), qw.dequantize())
    q8 = quantize(weight(6, 256), 8, -1)
    assert (QuantizedWeight.from_parts(q8.qweight, q8.scale, None).bits,
            QuantizedWeight.from_parts(q8.qweight, q8.scale, None).group_size) == (8, 256)
    with pytest.raises(ValueError, match="layer.q_proj.*scale columns do not divide K=256"):
        QuantizedWeight.from_parts(qw.qweight, torch.ones(6, 3), None, name="layer.q_proj")
    with pytest.raises(ValueError, match="layer.q_proj.*int8/uint8"):
        QuantizedWeight.from_parts(qw.qweight.float(), qw.scale, None, name="layer.q_proj")


@pytest.mark.parametrize("kwargs,shape,message", [
    (dict(bits=3), (4, 64), "mlp.up_proj.weight: bits must be 4 or 8, got 3"),
    (dict(bits=2), (4, 64), "bits must be 4 or 8"),
    (dict(bits=4, group_size=48), (4, 64), "mlp.up_proj.weight: group_size 48 does not divide K=64"),
    (dict(bits=8, group_size=0), (4, 64), "group_size 0 does not divide K=64"),
    (dict(bits=4, group_size=-1), (4, 7), "mlp.up_proj.weight: int4 needs an even K, got K=7"),
    (dict(bits=4), (4, 8, 8), r"mlp.up_proj.weight: quantize expects a 2-D weight \[N, K\], got shape \(4, 8, 8\)"),
    (dict(bits=4), (64,), "expects a 2-D weight"),
    (dict(bits=4, group_size=32, scale_dtype=torch.int32), (4, 64), "scale_dtype must be fp16, bf16 or fp32"),
])
def test_bad_input_names_the_tensor(kwargs, shape, message):
    with pytest.raises(ValueError, match=message):
        quantize(torch.randn(*shape), name="mlp.up_proj.weight", **kwargs)


def test_bad_weight_values():
    with pytest.raises(ValueError, match="w1: quantize expects a floating-point weight"):
        quantize(torch.ones(2, 64, dtype=torch.int32), 8, 32, name="w1")
    w = weight(2, 64)
    w[1, 3] = float("nan")
    with pytest.raises(ValueError, match="w2: cannot quantize a weight holding inf or nan"):
        quantize(w, 4, 32, name="w2")


def test_inconsistent_parts_are_rejected():
    qw = quantize(weight(4, 64), 4, 32)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        QuantizedWeight(qw.qweight, qw.scale, qw.offset, 5, 32)
    with pytest.raises(ValueError, match="int4 codes must be a 2-D torch.uint8"):
        QuantizedWeight(qw.qweight.to(torch.int8), qw.scale, qw.offset, 4, 32)
    with pytest.raises(ValueError, match=r"scale has shape \(4, 1\), expected \(4, 2\)"):
        QuantizedWeight(qw.qweight, qw.scale[:, :1], qw.offset, 4, 32)
    with pytest.raises(ValueError, match="offset dtype torch.float16 differs"):
        QuantizedWeight(qw.qweight, qw.scale, qw.offset.half(), 4, 32)
    with pytest.raises(ValueError, match="group_size 48 does not divide K=64"):
        QuantizedWeight(qw.qweight, qw.scale, qw.offset, 4, 48)
    with pytest.raises(ValueError, match="scale must be fp16, bf16 or fp32"):
        QuantizedWeight(qw.qweight, qw.scale.double(), None, 4, 32)


def test_group_size_error_suggests_one_that_fits():
    with pytest.raises(ValueError,
                       match=r"qkv_proj.weight: group_size 128 does not divide K=576 \(group_size=64 does\)"):
        quantize(torch.randn(4, 576), 4, 128, name="qkv_proj.weight")
