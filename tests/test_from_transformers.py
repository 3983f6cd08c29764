"""LlamaForCausalLM.from_transformers(hf_model): a live transformers Llama becomes ours without disk and
without a second copy of its weights (unfused ones shared, fused ones replacing the transformers parts);
numbers as from_pretrained of the same weights; both models keep working."""
import pytest
import torch

from llama_fast import LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel

from conftest import assert_greedy_agrees, randomize_, tiny_config

transformers = pytest.importorskip("transformers")


def hf_model(cls=None, seed=0, dtype=torch.float32, **overrides):
    config = transformers.LlamaConfig(**tiny_config(**overrides))
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return randomize_((cls or transformers.LlamaForCausalLM)(config), seed).eval().to(dtype)


def storages(module):
    return {p.untyped_storage().data_ptr() for p in module.parameters()} | {
        b.untyped_storage().data_ptr() for b in module.buffers() if b is not None}


@pytest.mark.parametrize("overrides", [dict(), dict(tie_word_embeddings=True, attention_bias=True)])
def test_same_numbers_and_shared_memory(tmp_path, overrides):
    hf = hf_model(**overrides)
    x = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(x).logits
    hf.save_pretrained(tmp_path)
    from_disk = LlamaForCausalLM.from_pretrained(tmp_path)
    ours = LlamaForCausalLM.from_transformers(hf)
    with torch.no_grad():
        got, disk = ours(x).logits, from_disk(x).logits
        again = hf(x).logits                               # the transformers model still works, unchanged
    assert torch.equal(got, disk)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert torch.equal(again, want)
    # every byte of ours is a byte of theirs: no second copy of any weight
    assert storages(ours) <= storages(hf)
    assert ours.model.embed_tokens.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    q = hf.model.layers[1].self_attn.q_proj.weight
    assert q.data_ptr() == ours.model.layers[1].self_attn.qkv_proj.weight.data_ptr()
    prompt = x[:1, :5]
    assert_greedy_agrees(ours.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0),
                         hf.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0,
                                     return_dict_in_generate=True, output_logits=True), prompt.shape[1])


def test_peak_memory_is_one_fused_weight_over_the_model():
    """Counted through the allocator: the conversion allocates at most the largest fused weight at a time."""
    hf = hf_model(num_hidden_layers=3, hidden_size=128, intermediate_size=256)
    before = sum(p.numel() * p.element_size() for p in hf.parameters())
    allocated = []
    real_empty = torch.empty

    def counting_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.device.type == "cpu":
            allocated.append(t.numel() * t.element_size())
        return t

    torch.empty = counting_empty
    try:
        ours = LlamaForCausalLM.from_transformers(hf)
    finally:
        torch.empty = real_empty
    largest_fused = 2 * 256 * 128 * 4
    assert max(allocated) <= largest_fused
    after = sum(p.numel() * p.element_size() for p in hf.parameters())
    assert after == before and storages(ours) <= storages(hf)


def test_bf16_bare_model_and_classifier():
    hf = hf_model(transformers.LlamaModel, dtype=torch.bfloat16)
    ours = LlamaModel.from_transformers(hf)
    assert ours.dtype == torch.bfloat16
    x = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(x).last_hidden_state.float(), hf(x).last_hidden_state.float()
    assert (a - b).abs().max() <= 0.05 * b.abs().max()   # bf16: both round differently, same scale
    clf = hf_model(transformers.LlamaForSequenceClassification, num_labels=3, pad_token_id=0)
    ours = LlamaForSequenceClassification.from_transformers(clf)
    with torch.no_grad():
        want = clf(x).logits
        assert (ours(x).logits - want).abs().max() <= 1e-4 * want.abs().max()


def test_refused_models():
    hf = hf_model()
    hf.config.quantization_config = {"quant_method": "gptq", "bits": 4}
    LlamaForCausalLM.from_transformers(hf)            # all floating point: a decompressed model, loads dense
    hf = hf_model()
    hf.config.quantization_config = {"quant_method": "gptq", "bits": 4}
    hf.model.layers[0].mlp.register_buffer("qweight", torch.zeros(4, 8, dtype=torch.int32))   # packed in memory
    with pytest.raises(ValueError, match=r"quantized \(gptq\).*from_pretrained\(path\)"):
        LlamaForCausalLM.from_transformers(hf)
    with pytest.raises(ValueError, match="expects a transformers Llama model"):
        LlamaForCausalLM.from_transformers(torch.nn.Linear(2, 2))
    mixed = hf_model()
    mixed.lm_head.to(torch.bfloat16)
    with pytest.raises(ValueError, match="one device in one dtype"):
        LlamaForCausalLM.from_transformers(mixed)
