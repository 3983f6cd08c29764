"""The whole model on the Triton backend (under the interpreter) against transformers, on tiny configs."""
import pytest
import torch

from llama_fast import LlamaForCausalLM

from conftest_shared import assert_matches_transformers, left_padded_batch, make_hf_model, tiny_config


@pytest.mark.parametrize("config", [dict(num_key_value_heads=2), dict(num_attention_heads=8,
                                                                        num_key_value_heads=1)],
                         ids=["gqa2", "gqa8"])
def test_logits_equal_transformers_fp32(tmp_path, config):
    assert_matches_transformers(tmp_path, config, backend="triton", pads=(0, 3), seq_len=9)


def test_logits_within_budget_fp16(tmp_path):
    assert_matches_transformers(tmp_path, dict(num_key_value_heads=1), backend="triton", dtype=torch.float16,
                                seq_len=9)


def test_int4_prefill_and_decode_steps_equal_the_reference_backend(tmp_path):
    """Left-padded prefill, then single-token decode steps against the cache (split-K decode kernel), with
    int4 weights (quant GEMV for the steps, GEMM for the prefill), logits equal to backend="torch"."""
    make_hf_model(tmp_path, dict(num_key_value_heads=2))
    ids, mask, _ = left_padded_batch((0, 2), seq_len=12, vocab=tiny_config()["vocab_size"])
    models = {b: LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, backend=b, quantize="int4",
                                                  group_size=32) for b in ("torch", "triton")}
    with torch.no_grad():
        outs = {b: m(ids, attention_mask=mask, use_cache=True) for b, m in models.items()}
        for step in range(3):
            ref, got = outs["torch"].logits[:, -1], outs["triton"].logits[:, -1]
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
            nxt = ref.argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            outs = {b: m(nxt, attention_mask=mask, past_key_values=outs[b].past_key_values, use_cache=True)
                    for b, m in models.items()}
