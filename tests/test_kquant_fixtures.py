"""The committed K-quant fixtures (tests/data/kquant_*.gguf, written by tests/data/make_kquant_fixtures.py):
each file's linears keep their blocks in the type mix of its ftype, every tensor equals gguf.quants'
dequantization bit for bit, and the logits equal transformers' own loading of the same GGUF file."""
import os

import gguf
import numpy as np
import pytest
import torch

from llama_fast import LlamaForCausalLM
from llama_fast.formats.gguf import read_gguf

from conftest import assert_top1_agrees, max_rel_diff

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
FIXTURES = {"Q4_K_M": {"Q4_K", "Q6_K"}, "Q5_K_M": {"Q5_K", "Q6_K"}, "Q6_K": {"Q6_K"},
            "Q3_K_M": {"Q3_K", "Q4_K", "Q5_K", "Q6_K"}, "Q2_K": {"Q2_K", "Q3_K", "Q6_K"}}


def _path(ftype):
    return os.path.join(DATA, f"kquant_{ftype}.gguf")


@pytest.mark.parametrize("ftype", FIXTURES)
def test_fixture_types_and_exact_tensors(ftype):
    reader = gguf.GGUFReader(_path(ftype))
    assert {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2} == FIXTURES[ftype]
    by_name = {t.name: t for t in reader.tensors}
    _, tensors = read_gguf(_path(ftype))
    seen = 0
    for name, value in tensors:
        if not hasattr(value, "dequantize") or name == "lm_head.weight" or "q_proj" in name or "k_proj" in name:
            continue   # dense tensors; the tied head (= token_embd); q/k rows are permuted (test_gguf_kquant_model)
        import gguf_util as G
        t = by_name[G.gguf_name(name)]
        want = gguf.quants.dequantize(t.data, t.tensor_type)
        assert np.array_equal(value.dequantize().numpy().view(np.uint32), want.view(np.uint32)), name
        seen += 1
    assert seen >= 8


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q6_K", "Q2_K"])
def test_fixture_logits_match_transformers(ftype):
    transformers = pytest.importorskip("transformers")
    ours = LlamaForCausalLM.from_pretrained(_path(ftype), backend="cpu")
    assert ours.lm_head.kquant_kinds == ("Q6_K",)        # the tied table, natively
    assert all(layer.mlp.down_proj.kquant for layer in ours.model.layers)
    ref = transformers.LlamaForCausalLM.from_pretrained(DATA, gguf_file=f"kquant_{ftype}.gguf",
                                                        dtype=torch.float32).eval()
    ids = torch.randint(3, 512, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = ours(ids).logits, ref(ids).logits
    assert max_rel_diff(got, want) < 1e-4
    assert_top1_agrees(got, want, 1e-4)
