"""The real demo model (SmolLM2-135M-Instruct) converted to an HF directory by transformers: llama_fast
loads the directory and its logits on a 64-token text match transformers' model loaded from the GGUF."""
import pytest
import torch

from conftest import max_rel_diff
from llama_fast import LlamaForCausalLM


@pytest.mark.slow
def test_real_model_from_converted_hf_directory(demo_reference):
    directory, ids, ref = demo_reference
    ours = LlamaForCausalLM.from_pretrained(directory)
    assert ours.config.tie_word_embeddings and ours.lm_head.weight is ours.model.embed_tokens.weight
    with torch.no_grad():
        got = ours(ids).logits
    assert max_rel_diff(got, ref) <= 1e-4
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.slow
def test_real_model_decode_matches_prefill(demo_reference):
    directory, ids, ref = demo_reference
    ours = LlamaForCausalLM.from_pretrained(directory, dtype="bfloat16")
    with torch.no_grad():
        out = ours(ids[:, :60])
        steps = [out.logits]
        for t in range(60, 64):
            out = ours(ids[:, t:t + 1], past_key_values=out.past_key_values)
            steps.append(out.logits)
    got = torch.cat(steps, 1).float()
    # bf16 against the fp32 transformers model: the top token agrees where fp32's margin is clear
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.5
    assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])
    assert max_rel_diff(got, ref) < 0.05
