"""Bad checkpoints: each gets a clear error naming the file and the tensor."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama_fast import LlamaForCausalLM
from llama_fast.loading import CheckpointError

from conftest import make_hf_model


@pytest.fixture
def saved(tmp_path):
    make_hf_model(tmp_path)
    return tmp_path


def _rewrite(directory, edit):
    file = directory / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_pickle_weights_are_refused_with_conversion_hint(saved):
    os.remove(saved / "model.safetensors")
    torch.save({"x": torch.zeros(1)}, saved / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*never unpickles.*safe_serialization=True"):
        LlamaForCausalLM.from_pretrained(saved)
    with pytest.raises(CheckpointError, match=r"never unpickles.*save_pretrained\(new_dir, safe_serialization=True\)"):
        LlamaForCausalLM.from_pretrained(saved / "pytorch_model.bin")


def test_missing_tensor(saved):
    _rewrite(saved, lambda t: t.pop("model.layers.1.self_attn.v_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: 1 tensor\(s\) missing: "
                                              r"'model\.layers\.1\.self_attn\.v_proj\.weight'"):
        LlamaForCausalLM.from_pretrained(saved)


def test_missing_untied_lm_head(saved):
    _rewrite(saved, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"missing: 'lm_head\.weight'"):
        LlamaForCausalLM.from_pretrained(saved)


def test_unexpected_tensor(saved):
    _rewrite(saved, lambda t: t.update({"model.layers.0.mlp.extra_proj.weight": torch.zeros(2, 2)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor "
                                              r"'model\.layers\.0\.mlp\.extra_proj\.weight'"):
        LlamaForCausalLM.from_pretrained(saved)


def test_misshapen_tensor(saved):
    _rewrite(saved, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj"
                                              r"\.weight' has shape \[16, 64\], the model expects \[32, 64\]"):
        LlamaForCausalLM.from_pretrained(saved)


def test_integer_tensor(saved):
    _rewrite(saved, lambda t: t.update({"model.norm.weight": torch.zeros(64, dtype=torch.int32)}))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has dtype torch\.int32"):
        LlamaForCausalLM.from_pretrained(saved)


def test_truncated_file(saved):
    file = saved / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated: tensor '.*' ends at byte"):
        LlamaForCausalLM.from_pretrained(saved)
    file.write_bytes(data[:100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated safetensors file: the header claims"):
        LlamaForCausalLM.from_pretrained(saved)
    file.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated safetensors file \(0 bytes"):
        LlamaForCausalLM.from_pretrained(saved)


def test_corrupt_header(saved):
    file = saved / "model.safetensors"
    file.write_bytes((16).to_bytes(8, "little") + b"{not json at all" + b"\0" * 64)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors header"):
        LlamaForCausalLM.from_pretrained(saved)


def test_bad_config_json(saved):
    (saved / "config.json").write_text('{"vocab_size": 128,, }')
    with pytest.raises(ValueError, match=r"config\.json: invalid JSON at line 1 column 20"):
        LlamaForCausalLM.from_pretrained(saved)


def test_missing_config_json(saved):
    os.remove(saved / "config.json")
    with pytest.raises(FileNotFoundError, match=r"config file not found: .*config\.json"):
        LlamaForCausalLM.from_pretrained(saved)


def test_config_that_does_not_fit_the_weights(saved):
    config = json.loads((saved / "config.json").read_text())
    config["intermediate_size"] = 100
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.down_proj\.weight' has shape \[64, 96\], "
                                              r"the model expects \[64, 100\]"):
        LlamaForCausalLM.from_pretrained(saved)


def test_sharded_index_naming_a_missing_shard(tmp_path):
    make_hf_model(tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    os.remove(shard)
    with pytest.raises(CheckpointError, match=rf"index\.json: names shard '{shard.name}', which does not exist"):
        LlamaForCausalLM.from_pretrained(tmp_path)


def test_sharded_index_bad_json(tmp_path):
    make_hf_model(tmp_path, max_shard_size="40KB")
    (tmp_path / "model.safetensors.index.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"index\.json: invalid JSON at line 1 column 2"):
        LlamaForCausalLM.from_pretrained(tmp_path)


def test_no_weights_and_no_path(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4}))
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json found"):
        LlamaForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file or directory: .*nowhere"):
        LlamaForCausalLM.from_pretrained(tmp_path / "nowhere")


def test_bad_quantize_argument(saved):
    with pytest.raises(ValueError, match="quantize must be None, 'int8' or 'int4', got 'int3'"):
        LlamaForCausalLM.from_pretrained(saved, quantize="int3")
