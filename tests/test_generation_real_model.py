"""Greedy generation on the real demo model (SmolLM2-135M-Instruct, fp32) equals transformers' token for
token: 64 new tokens for a batch of 3 chat prompts of different lengths, left padded.

transformers loads the GGUF (gguf_file=...); llama_fast loads the same file with its own GGUF loader, or,
where that is not available, the directory transformers saves from it. Both are loaded once per session."""
import os

import pytest
import torch

import llama_fast

from conftest import assert_greedy_agrees

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?",
           "Write a haiku about the sea.",
           "Explain in two sentences why the sky is blue, and give one everyday example of the same effect."]
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def gguf_path(demo_gguf):
    # conftest's demo_gguf fails (not skips) when the demo wheel is missing: a broken install must not pass.
    return demo_gguf


@pytest.fixture(scope="module")
def ref_model(gguf_path):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def our_model(gguf_path, ref_model, tmp_path_factory):
    try:
        model = llama_fast.LlamaForCausalLM.from_pretrained(gguf_path, dtype="float32")
        from llama_fast.linear import dequantize_linears_
        return dequantize_linears_(model, torch.float32)   # fp32 dense, as transformers dequantizes the GGUF
    except ImportError:        # no GGUF loader in this build: the same weights through safetensors
        path = tmp_path_factory.mktemp("smollm2")
        if getattr(ref_model, "hf_quantizer", None) is not None:
            ref_model.hf_quantizer.remove_quantization_config(ref_model)
        ref_model.save_pretrained(path)
        return llama_fast.LlamaForCausalLM.from_pretrained(str(path), dtype="float32")


@pytest.fixture(scope="module")
def batch(gguf_path):
    tok = llama_fast.AutoTokenizer.from_pretrained(gguf_path)
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS]
    return tok, tok(texts, padding=True, return_tensors="pt")


def test_greedy_64_tokens_batch_of_3_equals_transformers(ref_model, our_model, batch):
    tok, enc = batch
    assert len(set(enc.attention_mask.sum(1).tolist())) == 3       # three different prompt lengths
    kw = dict(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        expected = ref_model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                                      return_dict_in_generate=True, output_logits=True, **kw)
    got = our_model.generate(enc.input_ids, attention_mask=enc.attention_mask, **kw)
    # Token for token, except after a genuine near-tie of transformers' logits (1e-4 x scale is how closely
    # the fp32 logits agree, tests/test_gguf_smollm2.py): two summation orders may pick either side of it.
    try:
        assert_greedy_agrees(got, expected, enc.input_ids.shape[1], rel_tol=1e-4)
    except AssertionError as e:
        new = enc.input_ids.shape[1]
        pytest.fail(f"{e}\nours:   {tok.batch_decode(got[:, new:], skip_special_tokens=True)}\n"
                    f"theirs: {tok.batch_decode(expected.sequences[:, new:], skip_special_tokens=True)}")
    answers = tok.batch_decode(got[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answers[0]
