"""The model on a CUDA device: loads there, equals transformers, decodes with the cache. Runs where a GPU is
present (the CUDA and Triton backends add their own model tests)."""
import pytest
import torch

from llama_fast import LlamaForCausalLM

from conftest import left_padded_batch, load_hf, make_hf_model, max_rel_diff

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("backend", ["torch", None])
@torch.no_grad()
def test_cuda_model_matches_transformers(tmp_path, backend):
    make_hf_model(tmp_path, dict(num_attention_heads=8, num_key_value_heads=2, attention_bias=True))
    ref = load_hf(tmp_path)
    ours = LlamaForCausalLM.from_pretrained(tmp_path, device="cuda", backend=backend)
    assert ours.device.type == "cuda"
    ids, mask, pos = left_padded_batch(pads=(0, 3, 6), seq_len=12)
    expected = ref(ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    full = ours(ids.cuda(), attention_mask=mask.cuda()).logits.cpu()
    # TF32 may be on for CUDA matmuls: allow its rounding (10-bit mantissa) rather than fp32's
    assert max_rel_diff(full[real], expected[real]) <= 5e-3
    cache = ours.new_cache(batch_size=3, max_len=12)
    steps = [ours(ids[:, :9].cuda(), attention_mask=mask[:, :9].cuda(), past_key_values=cache).logits]
    for t in range(9, 12):
        steps.append(ours(ids[:, t:t + 1].cuda(), past_key_values=cache).logits)
    decoded = torch.cat(steps, 1).cpu()
    assert max_rel_diff(decoded[real], full[real]) <= 5e-3
    with pytest.raises(ValueError, match="input_ids are on cpu, the model on cuda"):
        ours(ids)
