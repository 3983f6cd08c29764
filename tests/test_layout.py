"""The package's layering: the format readers import no model code, loading does not import the model classes
(it reads their checkpoint mapping from the model it is given), and that declaration is checked."""
import os
import subprocess
import sys

import pytest
import torch

from llama_fast import LlamaConfig, LlamaForCausalLM
from llama_fast.loading import hf_state_items

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _imported_after(statement: str) -> set[str]:
    """The llama_fast modules a fresh interpreter has loaded after running `statement`."""
    code = f"import sys\n{statement}\nprint(' '.join(m for m in sys.modules if m.startswith('llama_fast')))"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


def test_format_readers_import_no_model_code():
    loaded = _imported_after("import llama_fast.formats.gguf, llama_fast.formats.safetensors")
    assert not loaded & {"llama_fast.modeling", "llama_fast.loading", "llama_fast.linear", "llama_fast.ops"}, loaded


def test_loading_does_not_import_the_model_classes():
    loaded = _imported_after("import llama_fast.loading")
    assert "llama_fast.modeling" not in loaded, loaded


def _tiny_config():
    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)


def test_fused_rows_follow_the_declaration():
    torch.manual_seed(0)
    model = LlamaForCausalLM(_tiny_config())
    shapes = {name: tuple(t.shape) for name, t in hf_state_items(model)}
    # q: 4 heads x 8, k and v: 2 heads x 8 (the fused Linear's output_sizes); gate and up: 48 rows each
    assert [shapes[f"model.layers.0.self_attn.{p}_proj.weight"][0] for p in "qkv"] == [32, 16, 16]
    assert shapes["model.layers.0.mlp.gate_proj.weight"] == shapes["model.layers.0.mlp.up_proj.weight"] == (48, 32)
    assert "lm_head.weight" not in shapes      # tied to the embeddings (tied_weights)


def test_declaration_that_does_not_fit_the_layer_is_an_error():
    class Mislabelled(LlamaForCausalLM):
        packed_modules_mapping = {"qkv_proj": ("q_proj", "kv_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.qkv_proj: packed_modules_mapping names 2 parts"):
        list(hf_state_items(Mislabelled(_tiny_config())))
