"""The token table kept quantized (llama_fast.embedding, issue 14 item 6): a lookup dequantizes only the rows it
needs, and those rows equal the whole table dequantized and then indexed, bit for bit. That equality holds by
construction (each row is dequantized by the same per-row, elementwise formula from its own codes and scales),
so it is asserted exactly."""
import pytest
import torch
from kquant_util import random_blocks

from llama_fast import kquants, quant
from llama_fast.embedding import Embedding
from llama_fast.kquants import KQuantWeight, Segment

VOCAB, DIM = 96, 64
IDS = torch.tensor([[0, 5, 5, 95], [17, 3, 64, 40]])     # repeats, both ends of the table, 2-D


def _affine(bits, symmetric, scale_dtype):
    """Our int4 / int8 format (GGUF Q4_0 / Q4_1 / Q8_0 are instances of it, group 32)."""
    w = torch.randn(VOCAB, DIM, generator=torch.Generator().manual_seed(bits))
    return quant.quantize(w, bits=bits, group_size=32, symmetric=symmetric, scale_dtype=scale_dtype)


CASES = {
    "q8_0": lambda: _affine(8, True, torch.float16),
    "q4_0": lambda: _affine(4, True, torch.float16),
    "q4_1": lambda: _affine(4, False, torch.float16),
    "int4_bf16_scales": lambda: _affine(4, False, torch.bfloat16),
    **{kind.lower(): (lambda kind=kind: KQuantWeight.single(kind, random_blocks(kind, VOCAB, 256), 256))
       for kind in kquants.TYPES},
    # rows of two block types (a fused layer's layout): each id is looked up in its own segment
    "q4_k+q6_k": lambda: KQuantWeight([Segment("Q4_K", random_blocks("Q4_K", 40, 256, seed=1)),
                                       Segment("Q6_K", random_blocks("Q6_K", 56, 256, seed=2))], 256),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_lookup_equals_the_dequantized_table_indexed(case, dtype):
    table = CASES[case]()
    vocab, dim = table.shape
    emb = Embedding(vocab, dim, dtype=dtype, device="meta")
    emb.set_native(table)
    assert emb.native and emb.weight is None and emb.dtype == dtype and emb.device == torch.device("cpu")
    whole = table.dequantize(torch.float32).to(dtype)
    got = emb(IDS)
    assert got.dtype == dtype and got.shape == (*IDS.shape, dim)
    assert torch.equal(got, whole[IDS])   # exact by construction (see the module docstring)
    assert torch.equal(emb.dequantized(), whole)


def test_module_to_dtype_follows_and_the_table_is_not_copied():
    qw = _affine(8, True, torch.float16)
    emb = Embedding(VOCAB, DIM, dtype=torch.float32, device="meta")
    emb.set_native(qw)
    assert emb.qweight is qw.qweight       # the given tensors, no copy (a tied lm_head shares them)
    emb.to(torch.bfloat16)
    assert emb.dtype == torch.bfloat16 and emb(IDS).dtype == torch.bfloat16


def test_bad_tables_are_refused():
    emb = Embedding(VOCAB, DIM, device="meta")
    with pytest.raises(ValueError, match="shape"):
        emb.set_native(quant.quantize(torch.randn(VOCAB, 32), bits=8, group_size=32))
    emb.set_native(_affine(8, True, torch.float16))
    with pytest.raises(ValueError, match="already holds"):
        emb.set_native(_affine(8, True, torch.float16))
