"""Llama 3.x GGUF files: rope_freqs.weight (llama3 rope scaling as llama.cpp stores it) against transformers
running the same weights with the llama3 rope parameters it was computed from; the byte-level BPE vocabulary
with the llama-bpe pre-tokenizer and the Llama 3 chat template, end to end through `llama-fast generate`."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from llama_fast import AutoTokenizer, LlamaForCausalLM

import gguf_util as G
from conftest import assert_top1_agrees, max_rel_diff

transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 1024}
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def rope_freqs(head_dim: int, theta: float, p: dict) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors: one divisor per rotary frequency."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    low_wavelen = p["original_max_position_embeddings"] / p["low_freq_factor"]
    high_wavelen = p["original_max_position_embeddings"] / p["high_freq_factor"]
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1)
        elif wavelen > low_wavelen:
            factors.append(p["factor"])
        else:
            smooth = (p["original_max_position_embeddings"] / wavelen - p["low_freq_factor"]) / (
                p["high_freq_factor"] - p["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / p["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


def _byte_level_bpe(vocab_size: int):
    """A byte-level BPE (vocab, merges) trained on the test text, then Llama 3's special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    with open(os.path.join(ROOT, "tests", "data", "public_domain_english.txt"), encoding="utf-8") as f:
        text = f.read()
    tok.train_from_iterator([text], trainer)
    model = tok.to_str()
    import json
    data = json.loads(model)["model"]
    vocab = sorted(data["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["merges"]]
    tokens = [t for t, _ in vocab] + SPECIALS
    return tokens, merges


@pytest.fixture(scope="module")
def llama3_gguf(tmp_path_factory):

    tokens, merges = _byte_level_bpe(384)
    head_dim = 16
    config = G.tiny_config(vocab_size=len(tokens), hidden_size=64, intermediate_size=128, rope_theta=500000.0,
                           max_position_embeddings=2048, bos_token_id=tokens.index("<|begin_of_text|>"),
                           eos_token_id=tokens.index("<|eot_id|>"))
    sd = G.random_state_dict(config, seed=3)
    factors = rope_freqs(head_dim, config["rope_theta"], LLAMA3_ROPE)
    assert 1 < factors.min() or factors.min() == 1 and 1 < factors.max() < 8.0 + 1e-6
    assert any(1 < f < 8 for f in factors)         # the smooth band is exercised

    def tokenizer(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("llama-bpe")
        w.add_token_list(tokens)
        w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
        w.add_token_merges(merges)
        w.add_add_bos_token(True)
        w.add_chat_template(LLAMA3_TEMPLATE)

    path = tmp_path_factory.mktemp("llama3") / "llama3.gguf"
    G.write_llama_gguf(path, config, {**sd, "rope_freqs.weight": factors}, extra=tokenizer)
    return path, config, sd


def test_rope_freqs_logits_match_transformers(llama3_gguf):
    path, config, sd = llama3_gguf
    hf_config = transformers.LlamaConfig(**{k: v for k, v in config.items()}, rope_scaling=dict(LLAMA3_ROPE))
    hf_config._attn_implementation = "eager"
    ref = transformers.LlamaForCausalLM(hf_config).eval()
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
    ref.tie_weights()
    ours = LlamaForCausalLM.from_pretrained(path)
    assert ours.config.rope_freq_factors is not None
    ids = torch.randint(0, config["vocab_size"], (1, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits
        got = ours(ids).logits
        # the same weights without the factors: far off at late positions, so the comparison above can fail
        plain = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
        plain.load_state_dict(ref.state_dict())
        unscaled = plain(ids).logits
    assert max_rel_diff(got, want) < 1e-4
    assert_top1_agrees(got, want, 1e-4)
    assert max_rel_diff(unscaled, want) > 1e-2


def test_llama3_tokenizer_matches_transformers(llama3_gguf):
    path, _, _ = llama3_gguf
    ours = AutoTokenizer.from_pretrained(path)
    ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    for s in ["Hello world", "  leading spaces and 12345 digits, 'll 've", "naïve café 😀\n\nnew\tlines",
              "<|start_header_id|>user<|end_header_id|>"]:
        assert ours.encode(s) == ref.encode(s), s
        assert ours.decode(ours.encode(s)) == ref.decode(ref.encode(s))
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    text = ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>")
    assert text == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(chat, add_generation_prompt=True, return_dict=False) == \
        ref.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)


def test_generate_chat_end_to_end(llama3_gguf):
    path, _, _ = llama3_gguf
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "llama_fast", "generate", "--model", str(path), "--chat",
                           "What is 2+2?", "--system", "Be brief.", "--max-new-tokens", "6"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # the prompt the CLI ran is the file's chat template, tokenized as transformers does
    ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    n = len(ref.apply_chat_template(chat, add_generation_prompt=True, return_dict=False))
    assert f"prefill: {n} tokens" in proc.stderr, proc.stderr
