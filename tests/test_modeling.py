"""llama_fast's LlamaForCausalLM against transformers' on tiny random configs (fp32 to rounding, bf16 within
the budget of docs/KERNELS.md, "Tolerance"), with the reference backend ("torch") and the default one (None)."""
import pytest
import torch

from conftest import assert_matches_transformers

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8}

CONFIGS = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa4": dict(num_attention_heads=8, num_key_value_heads=2),
    "gqa8": dict(num_attention_heads=8, num_key_value_heads=1, hidden_size=128),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1),
    "rope_linear": dict(rope_scaling={"type": "linear", "factor": 2.0}),
    "rope_dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 3.0}),
    "rope_llama3": dict(rope_scaling=LLAMA3, rope_theta=500.0),
    "rope_theta": dict(rope_theta=1000.0),
    "attention_bias": dict(attention_bias=True),
    "mlp_bias": dict(mlp_bias=True),
    "tied": dict(tie_word_embeddings=True),
    "pretraining_tp2": dict(pretraining_tp=2),
    "head_dim32": dict(head_dim=32),
    "odd_sizes": dict(vocab_size=83, intermediate_size=77, num_hidden_layers=3),
}


@pytest.mark.parametrize("backend", ["torch", None])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers_fp32(tmp_path, name, backend):
    assert_matches_transformers(tmp_path, CONFIGS[name], backend=backend)


@pytest.mark.parametrize("backend", ["torch", None])
def test_dynamic_rope_past_max_position_embeddings(tmp_path, backend):
    # 40 tokens with max_position_embeddings 16: the NTK base is recomputed for the sequence length.
    config = dict(rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=16)
    assert_matches_transformers(tmp_path, config, backend=backend, seq_len=40)


@pytest.mark.parametrize("backend", ["torch", None])
@pytest.mark.parametrize("name", ["gqa4", "rope_llama3", "attention_bias"])
def test_left_padded_batch_matches_transformers(tmp_path, name, backend):
    assert_matches_transformers(tmp_path, CONFIGS[name], backend=backend, pads=(0, 3, 7), seq_len=12)


@pytest.mark.parametrize("backend", ["torch", None])
def test_explicit_position_ids(tmp_path, backend):
    assert_matches_transformers(tmp_path, CONFIGS["rope_linear"], backend=backend, explicit_positions=True)


@pytest.mark.parametrize("backend", ["torch", None])
@pytest.mark.parametrize("name", ["gqa4", "tied", "rope_llama3"])
def test_logits_bf16_within_budget(tmp_path, name, backend):
    assert_matches_transformers(tmp_path, CONFIGS[name], backend=backend, dtype=torch.bfloat16)


@pytest.mark.parametrize("backend", ["torch", None])
def test_logits_fp16_within_budget(tmp_path, backend):
    assert_matches_transformers(tmp_path, CONFIGS["gqa8"], backend=backend, dtype=torch.float16)


def test_bf16_left_padded_within_budget(tmp_path):
    assert_matches_transformers(tmp_path, CONFIGS["gqa4"], dtype=torch.bfloat16, pads=(0, 2, 6), seq_len=10)
