"""LlamaConfig: every field, both rope forms, round trips through transformers, and clear errors."""
import json

import pytest
import torch

from llama_fast import LlamaConfig
from llama_fast.rope import inv_freq

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


def test_defaults_follow_transformers():
    c = LlamaConfig()
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (32000, 4096, 11008, 32)
    assert c.num_key_value_heads == 32 and c.head_dim == 128 and c.rope_theta == 10000.0
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, 2, None)
    assert c.rope_type == "default" and c.rope_scaling is None and c.pretraining_tp == 1


def test_all_fields_and_unknown_keys_round_trip(tmp_path):
    fields = dict(vocab_size=100, hidden_size=64, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, hidden_act="silu", max_position_embeddings=512, initializer_range=0.05,
                  rms_norm_eps=1e-5, use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=[2, 3],
                  pretraining_tp=2, tie_word_embeddings=True, rope_theta=500000.0, rope_scaling=LLAMA3,
                  attention_bias=True, attention_dropout=0.1, mlp_bias=True, head_dim=32, torch_dtype="bfloat16",
                  architectures=["LlamaForCausalLM"], my_custom_key={"a": 1})
    c = LlamaConfig(**fields)
    c.save_pretrained(tmp_path)
    back = LlamaConfig.from_pretrained(tmp_path)
    assert back == c
    for name, value in fields.items():
        if name != "torch_dtype":
            assert getattr(back, name) == value, name
    assert back.dtype == "bfloat16" and back.my_custom_key == {"a": 1}


@pytest.mark.parametrize("scaling", [None, {"type": "linear", "factor": 2.0}, {"rope_type": "dynamic", "factor": 4.0},
                                     LLAMA3])
def test_transformers_reads_our_config_back(tmp_path, scaling):
    import transformers
    ours = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=1, rope_theta=5000.0, rope_scaling=scaling,
                       max_position_embeddings=16384, torch_dtype="float16")
    ours.save_pretrained(tmp_path)
    theirs = transformers.LlamaConfig.from_pretrained(tmp_path)
    assert theirs.rope_parameters == ours.rope_parameters
    assert theirs.dtype == torch.float16
    for name in ("vocab_size", "hidden_size", "num_key_value_heads", "head_dim", "max_position_embeddings"):
        assert getattr(theirs, name) == getattr(ours, name)


@pytest.mark.parametrize("scaling", [None, {"type": "linear", "factor": 2.0}, {"rope_type": "dynamic", "factor": 4.0},
                                     LLAMA3])
def test_we_read_transformers_config(tmp_path, scaling):
    import transformers
    theirs = transformers.LlamaConfig(vocab_size=100, hidden_size=64, num_attention_heads=4, rope_theta=5000.0,
                                      rope_scaling=scaling, max_position_embeddings=16384)
    theirs.save_pretrained(tmp_path)
    ours = LlamaConfig.from_pretrained(tmp_path)
    assert ours.rope_parameters == {k: v for k, v in theirs.rope_parameters.items() if k != "type"}
    assert ours.rope_theta == 5000.0


def test_rope_forms_agree():
    v4 = LlamaConfig(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 4.0})
    v5 = LlamaConfig(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0})
    assert v4 == v5 and v4.rope_type == "linear"
    default = LlamaConfig(rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    assert default.rope_scaling is None and default.rope_theta == 1e6


@pytest.mark.parametrize("scaling", [None, {"type": "linear", "factor": 2.0}, {"rope_type": "dynamic", "factor": 3.0},
                                     {**LLAMA3, "original_max_position_embeddings": 64}])
def test_inv_freq_matches_transformers(scaling):
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    kwargs = dict(hidden_size=256, num_attention_heads=4, rope_theta=500000.0, rope_scaling=scaling,
                  max_position_embeddings=128)
    rotary = LlamaRotaryEmbedding(transformers.LlamaConfig(**kwargs))
    ours = LlamaConfig(**kwargs)
    # Exact by construction: rope.inv_freq evaluates transformers' formula with the same torch ops in the
    # same order, elementwise (no reduction whose order could differ).
    assert torch.equal(inv_freq(ours), rotary.inv_freq)
    if scaling and scaling.get("rope_type") == "dynamic":   # recomputed past max_position_embeddings
        x = torch.zeros(1)
        rotary(x, torch.arange(300)[None])
        assert torch.equal(inv_freq(ours, seq_len=300), rotary.inv_freq)


@pytest.mark.parametrize("kwargs, message", [
    (dict(hidden_size=100, num_attention_heads=8),
     r"hidden_size \(100\) is not divisible by num_attention_heads \(8\)"),
    (dict(num_attention_heads=8, num_key_value_heads=3),
     r"num_attention_heads \(8\) is not divisible by num_key_value_heads \(3\)"),
    (dict(rope_scaling={"type": "yarn", "factor": 2.0}), "unsupported rope type 'yarn'"),
    (dict(rope_scaling={"type": "linear"}), "needs a 'factor'"),
    (dict(rope_scaling={"type": "linear", "factor": 0.5}), "factor must be a number >= 1"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
     "'llama3' is missing low_freq_factor, high_freq_factor"),
    (dict(rope_scaling={**LLAMA3, "high_freq_factor": 1.0}),
     "high_freq_factor .* must be greater than low_freq_factor"),
    (dict(rope_scaling={"type": "linear", "rope_type": "dynamic", "factor": 2.0}), "disagree"),
    (dict(rope_scaling={"factor": 2.0}), "needs a 'rope_type'"),
    (dict(hidden_size=0), "hidden_size must be a positive integer"),
    (dict(num_hidden_layers="2"), "num_hidden_layers must be a positive integer"),
    (dict(head_dim=15, hidden_size=60, num_attention_heads=4), "head_dim must be even"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    (dict(torch_dtype="int8"), "unsupported dtype 'int8'"),
    (dict(eos_token_id="2"), "eos_token_id must be an int or a list of ints"),
])
def test_invalid_values_raise_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LlamaConfig(**kwargs)


def test_head_dim_allows_indivisible_hidden_size():
    c = LlamaConfig(hidden_size=100, num_attention_heads=8, head_dim=16, num_key_value_heads=2)
    assert c.head_dim == 16


def test_bad_json_names_file_and_position(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 64,\n "vocab_size": }')
    with pytest.raises(ValueError, match=r"config\.json: invalid JSON at line 2 column 16"):
        LlamaConfig.from_pretrained(tmp_path)


def test_missing_config_names_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config file not found: .*config\.json"):
        LlamaConfig.from_pretrained(tmp_path)


def test_invalid_value_in_file_names_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 3}))
    with pytest.raises(ValueError, match=r"config\.json: hidden_size \(64\) is not divisible"):
        LlamaConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match=r"config\.json: a config must be a JSON object"):
        LlamaConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(ValueError, match="model_type is 'mistral'"):
        LlamaConfig.from_pretrained(tmp_path)
