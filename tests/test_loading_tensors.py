"""load_tensors, the interface GGUF (and any other source) loads through: dense and QuantizedWeight values,
fused parts, mixed formats, and quantize-on-load's memory rule."""
import pytest
import torch
from safetensors.torch import load_file

from llama_fast import LlamaConfig, LlamaForCausalLM, quant
from llama_fast.linear import Linear
from llama_fast.loading import CheckpointError, load_tensors, meta_model

from conftest import make_hf_model, max_rel_diff, tiny_config

IDS = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tensors")
    reference = make_hf_model(directory)
    with torch.no_grad():
        logits = reference(IDS).logits
    return LlamaConfig.from_pretrained(directory), load_file(directory / "model.safetensors"), logits


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _with_quantized(state, names, bits, group_size=32):
    """state with `names` replaced by QuantizedWeights, and the dense state they dequantize to."""
    values, dense = dict(state), dict(state)
    for name in names:
        qw = quant.quantize(state[name], bits, group_size)
        values[name] = qw
        dense[name] = qw.dequantize(torch.float32)
    return values, dense


def _load(config, items, **kwargs):
    return load_tensors(meta_model(LlamaForCausalLM, config, torch.float32), items, "test-source", **kwargs)


def test_dense_items(checkpoint):
    """Plain tensors in, the transformers model's logits out."""
    config, state, expected = checkpoint
    model = _load(config, state.items())
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert max_rel_diff(_logits(model), expected) <= 1e-5


def test_quantized_fused_parts_stay_quantized(checkpoint):
    config, state, _ = checkpoint
    names = [n for n in state if "layers.0." in n and n.endswith("proj.weight")]
    values, dense = _with_quantized(state, names, bits=4)
    model = _load(config, values.items())
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.qkv_proj.bits == 4 and mlp.gate_up_proj.bits == 4 and mlp.down_proj.bits == 4
    assert not model.model.layers[1].self_attn.qkv_proj.quantized
    assert torch.equal(attn.qkv_proj.quantized_weight().dequantize(torch.float32),
                       torch.cat([dense[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"]))
    assert max_rel_diff(_logits(model), _logits(_load(config, dense.items()))) <= 1e-5


def test_quantize_leaves_given_quantized_weights_alone(checkpoint):
    config, state, _ = checkpoint
    names = [n for n in state if "layers.0." in n and n.endswith("proj.weight")]
    values, _ = _with_quantized(state, names, bits=4)
    model = _load(config, values.items(), quantize="int8")
    assert model.model.layers[0].self_attn.qkv_proj.bits == 4
    layer1 = model.model.layers[1]
    assert layer1.self_attn.qkv_proj.bits == 8 and layer1.self_attn.qkv_proj.group_size == 64
    assert layer1.mlp.down_proj.group_size == 32       # K=96: groups of 32 instead of 128


def test_mixed_formats_are_dequantized(checkpoint):
    config, state, _ = checkpoint
    values, dense = _with_quantized(state, ["model.layers.0.self_attn.q_proj.weight"], bits=4)
    values2, dense2 = _with_quantized(dense, ["model.layers.0.self_attn.k_proj.weight"], bits=8)
    values2["model.layers.0.self_attn.q_proj.weight"] = values["model.layers.0.self_attn.q_proj.weight"]
    model = _load(config, values2.items())
    assert not model.model.layers[0].self_attn.qkv_proj.quantized
    assert max_rel_diff(_logits(model), _logits(_load(config, dense2.items()))) <= 1e-6


def test_quantized_embedding_stays_native(checkpoint):
    config, state, _ = checkpoint
    values, dense = _with_quantized(state, ["model.embed_tokens.weight"], bits=8)
    model = _load(config, values.items())
    table = model.model.embed_tokens
    assert table.native and table.weight is None and table.dtype == dense["model.embed_tokens.weight"].dtype
    # exact by construction: the lookup dequantizes each row by the same per-row formula as the whole table
    assert torch.equal(table.dequantized(), dense["model.embed_tokens.weight"])


def test_errors_name_the_source(checkpoint):
    config, state, _ = checkpoint
    items = [(n, t) for n, t in state.items() if n != "model.norm.weight"]
    with pytest.raises(CheckpointError, match=r"test-source: 1 tensor\(s\) missing: 'model\.norm\.weight'"):
        _load(config, items)
    bad = quant.quantize(torch.zeros(16, 64), 8, 32)
    items = [(n, bad if n == "model.layers.0.self_attn.k_proj.weight" else t) for n, t in state.items()]
    with pytest.raises(CheckpointError, match=r"test-source: tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' "
                                              r"has shape \[16, 64\], the model expects \[32, 64\]"):
        _load(config, items)
    with pytest.raises(CheckpointError, match=r"test-source: tensor 'model\.norm\.weight' appears twice"):
        _load(config, list(state.items()) + [("model.norm.weight", state["model.norm.weight"])])


def test_quantize_on_load_never_holds_all_dense_layers(checkpoint, monkeypatch):
    """When a layer is quantized, no other quantizable layer holds a dense weight: the peak is the quantized
    model plus the layer being quantized."""
    config, state, _ = checkpoint
    model = meta_model(LlamaForCausalLM, config, torch.float32)
    linears = [m for name, m in model.named_modules() if isinstance(m, Linear) and name != "lm_head"]
    calls = []
    real_quantize = quant.quantize

    def checking_quantize(w, *args, **kwargs):
        dense = [m for m in linears if m.weight is not None and m.weight.device.type != "meta"]
        assert not dense, f"{len(dense)} dense layer(s) alive while quantizing"
        calls.append(w.shape)
        return real_quantize(w, *args, **kwargs)

    monkeypatch.setattr(quant, "quantize", checking_quantize)
    load_tensors(model, state.items(), "test-source", quantize="int4", group_size=32)
    assert len(calls) == len(linears) == 4 * tiny_config()["num_hidden_layers"]
