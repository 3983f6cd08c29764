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
    ids = _ids()
    with torch.no_grad():
        got, want = ours(ids).logits, ref(ids).logits
    assert max_rel_diff(got, want) < 1e-4
    assert_top1_agrees(got, want, 1e-4)


def _llama_cpp():
    """llama-cpp-python, or a skip: the suite never needs llama.cpp (its library may be missing even where the
    package imports, hence any exception)."""
    try:
        import llama_cpp
        return llama_cpp
    except Exception as e:  # noqa: BLE001 - ImportError, or OSError / RuntimeError from loading libllama
        pytest.skip(f"llama.cpp is not available ({type(e).__name__}: {e})")


def _llama_cpp_logits(llama_cpp, path, ids):
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, n_threads=2,
                          verbose=False)
    llm.eval(ids[0].tolist())
    return torch.from_numpy(np.array(llm.scores[:ids.shape[1]], dtype=np.float32))


def _ids():
    ids = torch.randint(3, 384, (1, 24), generator=torch.Generator().manual_seed(1))
    ids[0, 0] = 1   # <s>
    return ids


def test_llama_cpp_runs_the_f32_source_as_we_do(tmp_path):
    """The same model on both engines: the F32 file the fixtures were quantized from (rebuilt bit for bit by
    make_kquant_fixtures.write_f32). llama.cpp keeps K/V in fp16 and its matmuls round differently: measured
    1e-3 of the logit range; 5e-3 still catches any structural difference (rope order, norms, heads)."""
    llama_cpp = _llama_cpp()
    import sys
    sys.path.insert(0, DATA)
    import make_kquant_fixtures as fx
    path = tmp_path / "f32.gguf"
    fx.write_f32(str(path), fx.fixture_config())
    ids = _ids()
    theirs = _llama_cpp_logits(llama_cpp, path, ids)
    with torch.no_grad():
        ours = LlamaForCausalLM.from_pretrained(path, backend="cpu")(ids).logits[0]
    assert (ours - theirs).abs().max().item() <= 5e-3 * ours.abs().max().item()


@pytest.mark.parametrize("ftype", FIXTURES)
def test_logits_against_llama_cpp(ftype):
    """Our logits on llama.cpp's own K-quant files against llama.cpp's. llama.cpp rounds each activation row to
    8 bits (q8_K) before its K-quant dot products, which moved its logits by 3.4-4.3% of their range from the
    exact product with the file's weights (measured on these fixtures; 0.1% on the F32 source, test above); we
    keep the activations unrounded. Asserted: ours equal the exact model (the reference ops on the dequantized
    weights, gguf.quants' numbers) within 1e-4 of the range, with the same top-1 everywhere, and llama.cpp's
    differ from it by less than 10% of the range (its 8-bit activations explain that much and no more: reading
    the blocks or the mix differently would be far larger)."""
    llama_cpp = _llama_cpp()
    ids = _ids()
    theirs = _llama_cpp_logits(llama_cpp, _path(ftype), ids).double()
    with torch.no_grad():
        ours = LlamaForCausalLM.from_pretrained(_path(ftype), backend="cpu")(ids).logits[0].double()
        exact = LlamaForCausalLM.from_pretrained(_path(ftype), dequantize=True, backend="torch")(ids).logits[0].double()
    scale = exact.abs().max().item()
    assert (ours - exact).abs().max().item() <= 1e-4 * scale
    assert torch.equal(ours.argmax(-1), exact.argmax(-1))
    assert (theirs - exact).abs().max().item() <= 0.1 * scale
