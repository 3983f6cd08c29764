"""Tokenizers without transformers: `AutoTokenizer.from_pretrained(dir or .gguf)`.

    tok = AutoTokenizer.from_pretrained("path/to/hf-dir")        # tokenizer.json -> LlamaTokenizerFast,
                                                                 # tokenizer.model -> LlamaTokenizer
    tok = AutoTokenizer.from_pretrained("model.gguf")            # built from the GGUF metadata
    batch = tok(["Hi", "Hello there"], padding=True, return_tensors="pt")   # left padded
"""
from __future__ import annotations

import glob
import os

from llama_fast.tokenization.base import tokenizer_arguments
from llama_fast.tokenization.fast import TOKENIZER_FILE, LlamaTokenizerFast
from llama_fast.tokenization.gguf import tokenizer_from_gguf
from llama_fast.tokenization.sentencepiece import VOCAB_FILE, LlamaTokenizer


def _from_gguf(path, **kwargs):
    tokenizer, config = tokenizer_from_gguf(path)
    config.update(kwargs)
    return LlamaTokenizerFast(tokenizer_object=tokenizer, **config)


class AutoTokenizer:
    """Picks the tokenizer class from the files present (transformers' AutoTokenizer, for LLaMA models)."""

    def __init__(self):
        raise TypeError("use AutoTokenizer.from_pretrained(path)")

    @staticmethod
    def from_pretrained(path, gguf_file=None, use_fast=True, **kwargs):
        path = os.fspath(path)
        if gguf_file is not None:
            path = os.path.join(path, gguf_file)
        if os.path.isfile(path):
            if path.endswith(".gguf"):
                return _from_gguf(path, **kwargs)
            if os.path.basename(path) == TOKENIZER_FILE:
                return LlamaTokenizerFast.from_pretrained(os.path.dirname(path) or ".", **kwargs)
            if path.endswith(".model"):
                return LlamaTokenizer(vocab_file=path, **tokenizer_arguments(os.path.dirname(path) or ".", kwargs))
            raise ValueError(f"{path}: not a tokenizer file (expected a directory, a .gguf, tokenizer.json "
                             "or a sentencepiece .model)")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no such tokenizer directory or file: {path}")
        has_json = os.path.isfile(os.path.join(path, TOKENIZER_FILE))
        has_model = os.path.isfile(os.path.join(path, VOCAB_FILE))
        if has_model and (not use_fast or not has_json):
            return LlamaTokenizer.from_pretrained(path, **kwargs)
        if has_json:
            return LlamaTokenizerFast.from_pretrained(path, **kwargs)
        ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if len(ggufs) == 1:
            return _from_gguf(ggufs[0], **kwargs)
        if len(ggufs) > 1:
            raise ValueError(f"{path} holds several .gguf files; pass gguf_file= to pick one")
        raise FileNotFoundError(f"{path} has no tokenizer: expected {TOKENIZER_FILE}, {VOCAB_FILE} or a .gguf file")
