"""The whole model with backend="cuda" against transformers (the oracle): random models with head_dim 64/128
and GQA 1/4/8 (the CUDA attention kernels take head_dim 64 or 128, so conftest's 16-dim tiny model does not
apply), left padding, greedy generation, and the real SmolLM2-135M demo model, fp32 and bf16/fp16."""
import pytest
import torch

from conftest import BF16_FACTOR, BF16_SLACK, left_padded_batch, load_hf, make_hf_model, max_rel_diff
from cuda_testing import requires_cuda

pytestmark = requires_cuda

# hidden / heads = head_dim; heads / kv_heads = the GQA group.
CONFIGS = {
    "mha-d64": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=4, intermediate_size=320),
    "gqa4-d64": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=1, intermediate_size=320),
    "gqa8-d64": dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=1, intermediate_size=704),
    "gqa2-d128": dict(hidden_size=512, num_attention_heads=4, num_key_value_heads=2, intermediate_size=704),
}


def load_pair(directory, config_kwargs, dtype):
    from llama_fast import LlamaForCausalLM

    make_hf_model(directory, config_kwargs)
    ours = LlamaForCausalLM.from_pretrained(directory, dtype=dtype, device="cuda", backend="cuda")
    return ours


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@torch.no_grad()
def test_logits_match_transformers_with_left_padding(tmp_path, name, dtype):
    cfg = CONFIGS[name]
    ours = load_pair(tmp_path, cfg, dtype)
    ids, mask, position_ids = left_padded_batch(pads=(0, 3, 9), seq_len=37, vocab=128)
    real = mask.bool()
    ref = load_hf(tmp_path).cuda()(ids.cuda(), attention_mask=mask.cuda(), position_ids=position_ids.cuda())
    ref = ref.logits[real.cuda()].float()
    got = ours(ids.cuda(), attention_mask=mask.cuda()).logits[real.cuda()].float()
    if dtype == torch.float32:
        assert max_rel_diff(got, ref) <= 1e-4
        return
    hf_low = load_hf(tmp_path, dtype=dtype).cuda()(ids.cuda(), attention_mask=mask.cuda(),
                                                   position_ids=position_ids.cuda()).logits[real.cuda()].float()
    err, err_hf = (got - ref).abs().max().item(), (hf_low - ref).abs().max().item()
    bound = BF16_FACTOR * err_hf + BF16_SLACK * ref.abs().max().item()
    assert err <= bound, f"{name} {dtype}: error {err:.3g}, transformers' {err_hf:.3g} (bound {bound:.3g})"


@pytest.mark.parametrize("name", ["gqa4-d64", "gqa2-d128"])
@torch.no_grad()
def test_greedy_generation_matches_transformers(tmp_path, name):
    pytest.importorskip("llama_fast.generation", reason="llama_fast.generation is not on this branch yet")
    ours = load_pair(tmp_path, CONFIGS[name], torch.float32)
    ref = load_hf(tmp_path).cuda()
    ids, mask, _ = left_padded_batch(pads=(0, 4), seq_len=9, vocab=128)
    ids, mask = ids.cuda(), mask.cuda()
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    assert torch.equal(got.cpu(), expected.cpu())


@pytest.mark.parametrize("quantize", ["int4", "int8"])
@torch.no_grad()
def test_quantized_model_matches_the_reference_backend(tmp_path, quantize):
    # Quantized weights differ from transformers' by design; the oracle is our "torch" backend (the reference
    # ops) on the same quantized weights, in fp32, and the budget that backend's own bf16 error.
    from llama_fast import LlamaForCausalLM

    make_hf_model(tmp_path, CONFIGS["gqa4-d64"])
    ids = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(3)).cuda()

    def logits(dtype, backend):
        m = LlamaForCausalLM.from_pretrained(tmp_path, dtype=dtype, device="cuda", backend=backend,
                                             quantize=quantize, group_size=64)
        return m(ids).logits.float(), m(ids[:, :1]).logits.float()  # prompt (GEMM) and one token (GEMV)

    for oracle, got, plain in zip(logits(torch.float32, "torch"), logits(torch.bfloat16, "cuda"),
                                  logits(torch.bfloat16, "torch")):
        err, budget = (got - oracle).abs().max().item(), (plain - oracle).abs().max().item()
        assert err <= 2 * budget + BF16_SLACK * oracle.abs().max().item(), f"{quantize}: {err:.3g} vs {budget:.3g}"
    fp32 = logits(torch.float32, "cuda")
    for got, oracle in zip(fp32, logits(torch.float32, "torch")):
        assert max_rel_diff(got, oracle) <= 1e-4


@torch.no_grad()
def test_real_demo_model_matches_transformers(demo_reference):
    from llama_fast import LlamaForCausalLM

    directory, ids, ref = demo_reference
    ours = LlamaForCausalLM.from_pretrained(directory, dtype="float32", device="cuda", backend="cuda")
    got = ours(ids.cuda()).logits.cpu()
    assert max_rel_diff(got, ref) <= 1e-4
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    # Decode token by token through the cache (split-K attention, GEMV-sized steps) gives the same logits.
    out = ours(ids[:, :48].cuda(), use_cache=True)
    past, steps = out.past_key_values, []
    for i in range(48, 64):
        out = ours(ids[:, i:i + 1].cuda(), past_key_values=past, use_cache=True)
        past = out.past_key_values
        steps.append(out.logits[:, -1].cpu())
    assert max_rel_diff(torch.stack(steps, 1), ref[:, 48:]) <= 1e-3
