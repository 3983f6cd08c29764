"""Quantized checkpoints: save_pretrained / from_pretrained round trips (safetensors qweight / scales /
offsets + config.json's quantization_config), quantize= while loading, and GGUF models end to end on tiny
converter-style files against transformers."""
import json

import pytest
import torch

from llama_fast import LlamaForCausalLM
from llama_fast.formats.gguf import read_gguf
from llama_fast.linear import Linear
from llama_fast.loading import CheckpointError

import gguf_util as G

transformers = pytest.importorskip("transformers")


def transformers_model(config: dict, sd: dict):
    cfg = {k: v for k, v in config.items() if k != "rope_scaling"}
    if config.get("rope_scaling"):
        cfg["rope_scaling"] = config["rope_scaling"]
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return model


def quantized_layers(model):
    return {name: (m.bits, m.group_size) for name, m in model.named_modules()
            if isinstance(m, Linear) and m.quantized}


def ids(vocab, n=23, seed=0):
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """An untied tiny model: q/k/v Q4_1, o Q4_0, MLP Q8_0, lm_head Q4_1, token_embd Q8_0, norms F32."""
    config = G.tiny_config(tie_word_embeddings=False)
    sd = G.random_state_dict(config, seed=3)
    types = {"model.embed_tokens.weight": G.Q.Q8_0, "lm_head.weight": G.Q.Q4_1}
    for name in sd:
        if "self_attn" in name:
            types[name] = G.Q.Q4_0 if "o_proj" in name else G.Q.Q4_1
        elif "mlp" in name:
            types[name] = G.Q.Q8_0
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    G.write_llama_gguf(path, config, sd, types)
    return path, config


def test_gguf_native_equals_dequantized_and_transformers(tiny_gguf):
    path, config = tiny_gguf
    native = LlamaForCausalLM.from_pretrained(path, dtype="float32", backend="torch")
    dense = LlamaForCausalLM.from_pretrained(path, dtype="float32", backend="torch", dequantize=True)
    layers = quantized_layers(native)
    assert layers["model.layers.0.self_attn.qkv_proj"] == (4, 32)   # Q4_1 q/k/v fused natively
    assert layers["model.layers.1.mlp.gate_up_proj"] == (8, 32)     # Q8_0
    assert layers["lm_head"] == (4, 32)                             # an untied quantized output stays native
    assert quantized_layers(dense) == {}
    x = ids(config["vocab_size"])
    with torch.no_grad():
        a, b = native(x).logits, dense(x).logits
    assert torch.allclose(a, b, rtol=0, atol=1e-5 * b.abs().max())
    # transformers on the same numbers (the gguf package's dequantization, our unpermuted Q/K)
    _, tensors = read_gguf(path, dequantize=True)
    reference = transformers_model(config, {k: v.numpy() for k, v in tensors})
    with torch.no_grad():
        expected = reference(x).logits
    assert (b - expected).abs().max() <= 1e-4 * expected.abs().max()


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 64), (8, -1)])
def test_quantize_on_load_and_round_trip(tmp_path, bits, group_size):
    config = G.tiny_config(tie_word_embeddings=True)
    sd = G.random_state_dict(config, seed=bits)
    src = tmp_path / "src.gguf"
    G.write_llama_gguf(src, config, sd)  # all F32
    quantize = f"int{bits}"
    model = LlamaForCausalLM.from_pretrained(src, dtype="float32", backend="torch", quantize=quantize,
                                             group_size=group_size)
    k = config["hidden_size"]
    layers = quantized_layers(model)
    assert layers["model.layers.0.self_attn.qkv_proj"] == (bits, k if group_size == -1 else group_size)
    assert "lm_head" not in layers  # embeddings / lm_head stay dense unless asked

    out = tmp_path / "saved"
    model.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == "llama_fast" and q["bits"] == bits
    assert q["group_size"] == (k if group_size == -1 else group_size) or q["formats"]
    assert "lm_head" in q["modules_not_converted"]
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert "model.layers.0.self_attn.q_proj.qweight" in names
        assert "model.layers.0.self_attn.q_proj.weight" not in names
        assert f.get_tensor("model.layers.1.mlp.down_proj.qweight").dtype == (torch.uint8 if bits == 4 else torch.int8)
        assert ("model.layers.0.mlp.up_proj.offsets" in names) == (bits == 4)

    back = LlamaForCausalLM.from_pretrained(out, dtype="float32", backend="torch")
    assert quantized_layers(back) == quantized_layers(model)
    sd_a, sd_b = model.state_dict(), back.state_dict()
    assert sd_a.keys() == sd_b.keys()
    # Exact by construction here and below: a saved and reloaded checkpoint holds the same tensors, and the
    # same model code on the same tensors computes the same logits.
    for name in sd_a:
        assert torch.equal(sd_a[name], sd_b[name]), name
    x = ids(config["vocab_size"], seed=1)
    with torch.no_grad():
        assert torch.equal(model(x).logits, back(x).logits)
    # quantize= on an already quantized checkpoint keeps its format (no requantization)
    again = LlamaForCausalLM.from_pretrained(out, dtype="float32", backend="torch", quantize="int4", group_size=128)
    assert quantized_layers(again) == quantized_layers(model)


def test_native_gguf_round_trips_through_save_pretrained(tmp_path, tiny_gguf):
    path, config = tiny_gguf
    native = LlamaForCausalLM.from_pretrained(path, dtype="float32", backend="torch")
    native.save_pretrained(tmp_path / "d")
    back = LlamaForCausalLM.from_pretrained(tmp_path / "d", backend="torch")
    assert quantized_layers(back) == quantized_layers(native)
    assert back.model.layers[0].self_attn.qkv_proj.scales.dtype == torch.float16  # GGUF's scales, unrounded
    x = ids(config["vocab_size"], seed=2)
    with torch.no_grad():
        assert torch.equal(native(x).logits, back(x).logits)


def test_bad_quantized_checkpoints(tmp_path):
    config = G.tiny_config(num_hidden_layers=1)
    G.write_llama_gguf(tmp_path / "m.gguf", config, G.random_state_dict(config))
    model = LlamaForCausalLM.from_pretrained(tmp_path / "m.gguf", quantize="int4", group_size=32)
    model.save_pretrained(tmp_path / "d")
    cfg_file = tmp_path / "d" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quantization_config of method 'gptq'"):
        LlamaForCausalLM.from_pretrained(tmp_path / "d")

    # scales that do not fit their codes: the error names the file and the layer
    from safetensors import safe_open

    from llama_fast.formats.safetensors import write as write_safetensors
    cfg["quantization_config"]["quant_method"] = "llama_fast"
    cfg_file.write_text(json.dumps(cfg))
    weights = tmp_path / "d" / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        items = {n: f.get_tensor(n) for n in f.keys()}
    for part in ("scales", "offsets"):  # 3 groups cannot split K=64
        t = items[f"model.layers.0.mlp.up_proj.{part}"]
        items[f"model.layers.0.mlp.up_proj.{part}"] = torch.cat([t, t[:, :1]], dim=1)
    write_safetensors(str(weights), items.items())
    with pytest.raises(CheckpointError, match=r"model.safetensors: .*up_proj.*K=64"):
        LlamaForCausalLM.from_pretrained(tmp_path / "d")
    del items["model.layers.0.mlp.up_proj.scales"]
    write_safetensors(str(weights), items.items())
    with pytest.raises(CheckpointError,
                       match=r"model.safetensors: tensor model.layers.0.mlp.up_proj.scales is missing"):
        LlamaForCausalLM.from_pretrained(tmp_path / "d")


def test_sharded_quantized_checkpoint(tmp_path):
    """Shards may split a layer's qweight / scales / offsets: they are joined across files."""
    config = G.tiny_config(num_hidden_layers=1)
    G.write_llama_gguf(tmp_path / "m.gguf", config, G.random_state_dict(config, seed=5))
    model = LlamaForCausalLM.from_pretrained(tmp_path / "m.gguf", quantize="int4", group_size=32, backend="torch")
    model.save_pretrained(tmp_path / "d", max_shard_size=3000)
    index = json.loads((tmp_path / "d" / "model.safetensors.index.json").read_text())["weight_map"]
    files = {index[f"model.layers.0.mlp.{p}_proj.{part}"] for p in ("gate", "up", "down")
             for part in ("qweight", "scales", "offsets")}
    assert len(files) > 1
    back = LlamaForCausalLM.from_pretrained(tmp_path / "d", backend="torch")
    x = ids(config["vocab_size"], seed=4)
    with torch.no_grad():
        assert torch.equal(back(x).logits, model(x).logits)
