"""from_pretrained / save_pretrained with HF directories: single and sharded safetensors, dtypes, tied
embeddings, quantize-on-load, and a transformers round trip."""
import json

import pytest
import torch

from llama_fast import LlamaForCausalLM, LlamaModel, quant
from llama_fast.linear import Linear

from conftest import load_hf, make_hf_model, max_rel_diff

IDS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(11))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def test_single_file(tmp_path):
    ref = make_hf_model(tmp_path)
    ours = LlamaForCausalLM.from_pretrained(tmp_path)
    assert max_rel_diff(_logits(ours), _logits(ref)) <= 1e-4
    assert ours.dtype == torch.float32 and not ours.training
    assert ours.model.layers[0].self_attn.qkv_proj.weight.shape == (64 + 2 * 32, 64)


def test_sharded(tmp_path):
    ref = make_hf_model(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    ours = LlamaForCausalLM.from_pretrained(tmp_path)
    assert max_rel_diff(_logits(ours), _logits(ref)) <= 1e-4


def test_dtype_auto_follows_config_and_explicit_dtype(tmp_path):
    make_hf_model(tmp_path)
    ref = load_hf(tmp_path, dtype=torch.bfloat16)
    ref.save_pretrained(tmp_path / "bf16")
    auto = LlamaForCausalLM.from_pretrained(tmp_path / "bf16")          # config says bfloat16
    assert auto.dtype == torch.bfloat16
    assert LlamaForCausalLM.from_pretrained(tmp_path / "bf16", dtype="float32").dtype == torch.float32
    assert LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).dtype == torch.bfloat16
    # float16 keeps float16 where the kernels take it (backend="torch" here; tests/test_fp16_cpu.py: the rest)
    assert LlamaForCausalLM.from_pretrained(tmp_path, dtype="float16", backend="torch").dtype == torch.float16
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        LlamaForCausalLM.from_pretrained(tmp_path, dtype="int8")


def test_tied_embeddings(tmp_path):
    ref = make_hf_model(tmp_path, dict(tie_word_embeddings=True))
    with open(tmp_path / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert "lm_head.weight" not in header        # transformers omits the tied copy
    ours = LlamaForCausalLM.from_pretrained(tmp_path)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert max_rel_diff(_logits(ours), _logits(ref)) <= 1e-4


def test_bare_llama_model_loads_causal_lm_checkpoint(tmp_path):
    ref = make_hf_model(tmp_path)
    base = LlamaModel.from_pretrained(tmp_path)
    with torch.no_grad():
        assert max_rel_diff(base(IDS).last_hidden_state, ref.model(IDS).last_hidden_state) <= 1e-5


@pytest.mark.parametrize("config", [dict(), dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True)])
def test_save_pretrained_round_trips_through_transformers(tmp_path, config):
    make_hf_model(tmp_path / "src", config)
    ours = LlamaForCausalLM.from_pretrained(tmp_path / "src")
    ours.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"] == 2
    theirs = load_hf(tmp_path / "out")
    # Exact by construction: each side compares one implementation with itself on the same weights.
    assert torch.equal(_logits(theirs), _logits(load_hf(tmp_path / "src")))
    assert torch.equal(_logits(LlamaForCausalLM.from_pretrained(tmp_path / "out")), _logits(ours))


def test_save_pretrained_bf16(tmp_path):
    make_hf_model(tmp_path / "src")
    ours = LlamaForCausalLM.from_pretrained(tmp_path / "src", dtype="bfloat16")
    ours.save_pretrained(tmp_path / "out")
    theirs = load_hf(tmp_path / "out", dtype="auto")
    assert theirs.dtype == torch.bfloat16
    for name, p in theirs.named_parameters():
        assert p.dtype == torch.bfloat16, name
    assert torch.equal(theirs.model.layers[1].self_attn.k_proj.weight,
                       ours.model.layers[1].self_attn.qkv_proj.weight[64:96])


def _quantized_reference(directory, bits, group_size):
    """The dense model with each layer's (fused) weight replaced by quant.quantize of it."""
    model = LlamaForCausalLM.from_pretrained(directory)
    for name, module in model.named_modules():
        if isinstance(module, Linear) and name != "lm_head":
            module.set_quantized(quant.quantize(module.weight.data, bits, group_size))
    return model


@pytest.mark.parametrize("quantize, bits", [("int8", 8), ("int4", 4)])
def test_quantize_on_load(tmp_path, quantize, bits):
    make_hf_model(tmp_path)
    ours = LlamaForCausalLM.from_pretrained(tmp_path, quantize=quantize, group_size=32)
    layer = ours.model.layers[0]
    for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
        assert linear.bits == bits and linear.group_size == 32 and linear.weight is None
    assert not ours.lm_head.quantized and ours.model.embed_tokens.weight.dtype == torch.float32
    ref = _quantized_reference(tmp_path, bits, 32)
    # Exact by construction: the same quant.quantize of the same fused weights, the same forward.
    assert torch.equal(_logits(ours), _logits(ref))
    dense = _logits(LlamaForCausalLM.from_pretrained(tmp_path))
    assert max_rel_diff(_logits(ours), dense) < (0.05 if bits == 8 else 0.5)   # close to, not equal to dense
    assert not torch.equal(_logits(ours), dense)
    ours.save_pretrained(tmp_path / "out")      # a quantized checkpoint (see tests/test_quant_checkpoint.py)
    assert torch.equal(_logits(LlamaForCausalLM.from_pretrained(tmp_path / "out")), _logits(ours))


def test_backend_argument(tmp_path):
    make_hf_model(tmp_path)
    ours = LlamaForCausalLM.from_pretrained(tmp_path, backend="torch")
    assert ours.model.layers[1].self_attn.qkv_proj.backend == "torch"
    assert ours.lm_head.backend == "torch"
    ours.set_backend(None)
    assert ours.model.layers[0].mlp.backend is None
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        LlamaForCausalLM.from_pretrained(tmp_path, backend="tpu")


def test_transformers_argument_spellings(tmp_path):
    make_hf_model(tmp_path)
    assert LlamaForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).dtype == torch.bfloat16
    assert LlamaForCausalLM.from_pretrained(tmp_path, device_map="cpu").device.type == "cpu"
    with pytest.raises(ValueError, match="loads a model onto one device"):
        LlamaForCausalLM.from_pretrained(tmp_path, device_map="auto")
    with pytest.raises(ValueError, match="pass dtype or torch_dtype, not both"):
        LlamaForCausalLM.from_pretrained(tmp_path, dtype="float32", torch_dtype=torch.bfloat16)
    with pytest.raises(TypeError):
        LlamaForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)


def test_save_pretrained_sharded(tmp_path):
    make_hf_model(tmp_path / "src")
    ours = LlamaForCausalLM.from_pretrained(tmp_path / "src")
    ours.save_pretrained(tmp_path / "out", max_shard_size="40KB")
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    expected = _logits(load_hf(tmp_path / "src"))
    assert torch.equal(_logits(load_hf(tmp_path / "out")), expected)
    assert torch.equal(_logits(LlamaForCausalLM.from_pretrained(tmp_path / "out")), _logits(ours))
    ours.save_pretrained(tmp_path / "out")          # again, unsharded: the old shards and index go away
    assert sorted(p.name for p in (tmp_path / "out").glob("model*")) == ["model.safetensors"]
    assert torch.equal(_logits(load_hf(tmp_path / "out")), expected)
    with pytest.raises(ValueError, match="max_shard_size must be a positive number of bytes"):
        ours.save_pretrained(tmp_path / "bad", max_shard_size="lots")
