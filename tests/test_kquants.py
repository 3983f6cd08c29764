"""llama_fast.kquants: ggml K-quant / Q5_0 / Q5_1 blocks decoded exactly as gguf.quants does."""
import gguf
import numpy as np
import pytest
import torch
from gguf import quants
from kquant_util import random_blocks

from llama_fast import _native, kquants

K = {kind: (512 if w == 256 else 96) for kind, (w, _) in kquants.BLOCKS.items()}


def _bits(t) -> np.ndarray:
    return np.asarray(t, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("kind", kquants.TYPES)
@pytest.mark.parametrize("magnitude", [0.02, 6e4, 1e-6])   # typical, near fp16's max, subnormal
def test_dequantize_equals_gguf_bit_for_bit(kind, magnitude):
    blocks = random_blocks(kind, 5, K[kind], seed=len(kind), magnitude=magnitude)
    want = quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType[kind])
    got = kquants.KQuantWeight.single(kind, blocks, K[kind]).dequantize()
    assert got.shape == (5, K[kind])
    np.testing.assert_array_equal(_bits(got), _bits(want))  # the bits: -0.0 and +0.0 differ here


@pytest.mark.parametrize("kind", kquants.TYPES)
def test_cpp_decoding_equals_reference_bit_for_bit(kind):
    # csrc/common/ggml_blocks.h computes the same fp32 products (multiply, then add; the extension is built
    # in ISO C++ mode, where GCC does not contract them into an fma), so equality holds by construction.
    if _native.extension() is None:
        pytest.skip(_native.missing_reason())
    blocks = random_blocks(kind, 7, K[kind], seed=3)
    got = torch.ops.llama_fast.kquant_dequantize(blocks, kquants.TYPE_IDS[kind], K[kind])
    want = kquants.KQuantWeight.single(kind, blocks, K[kind]).dequantize()
    np.testing.assert_array_equal(_bits(got), _bits(want))


def test_segments_concat_slice_and_dequantize():
    a = kquants.KQuantWeight.single("Q4_K", random_blocks("Q4_K", 3, 256, 1), 256)
    b = kquants.KQuantWeight.single("Q6_K", random_blocks("Q6_K", 2, 256, 2), 256)
    c = kquants.KQuantWeight.single("Q6_K", random_blocks("Q6_K", 4, 256, 3), 256)
    w = kquants.concat_rows([a, b, c])
    assert w.kinds == ("Q4_K", "Q6_K") and w.shape == (9, 256)      # neighbouring Q6_K parts merge
    dense = torch.cat([a.dequantize(), b.dequantize(), c.dequantize()])
    assert torch.equal(w.dequantize(), dense)
    assert torch.equal(kquants.slice_rows(w, 3, 5).dequantize(), b.dequantize())
    assert w.nbytes == 3 * 144 + 6 * 210


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="multiple of 256"):
        kquants.KQuantWeight.single("Q4_K", torch.zeros(2, 144, dtype=torch.uint8), 200)
    with pytest.raises(ValueError, match="uint8"):
        kquants.KQuantWeight.single("Q4_K", torch.zeros(2, 100, dtype=torch.uint8), 256)
    with pytest.raises(ValueError, match="IQ4_XS is not a block type"):
        kquants.KQuantWeight.single("IQ4_XS", torch.zeros(2, 136, dtype=torch.uint8), 256)


def test_from_q8_0_repacks_the_files_bytes():
    """A GGUF Q8_0 tensor read as a llama_fast.quant weight re-packs into exactly its file bytes (a fused layer
    whose other parts are ggml blocks keeps it as a Q8_0 segment); any other int8 format is not Q8_0."""
    from llama_fast import quant
    from llama_fast.formats.gguf import _quantized
    raw = random_blocks("Q8_0", 6, 96, seed=4)
    qw = _quantized(raw, "Q8_0", 6, 96)
    w = kquants.from_q8_0(qw)
    assert w.kinds == ("Q8_0",) and torch.equal(w.segments[0].blocks, raw)
    assert torch.equal(w.dequantize(), qw.dequantize(torch.float32))
    dense = torch.randn(4, 64)
    assert kquants.from_q8_0(quant.quantize(dense, 8, 32, symmetric=True, scale_dtype=torch.float32)) is None
    assert kquants.from_q8_0(quant.quantize(dense, 8, 64, symmetric=True, scale_dtype=torch.float16)) is None
    assert kquants.from_q8_0(quant.quantize(dense, 4, 32, symmetric=True, scale_dtype=torch.float16)) is None
