"""LlamaTokenizerFast: a tokenizer backed by a `tokenizers` Tokenizer (a tokenizer.json, or one built
from a GGUF's vocabulary and merges)."""
from __future__ import annotations

import os

from llama_fast.tokenization.base import TokenizerBase, tokenizer_arguments

TOKENIZER_FILE = "tokenizer.json"


class LlamaTokenizerFast(TokenizerBase):
    """`LlamaTokenizerFast(tokenizer_file=..., **config)` or `LlamaTokenizerFast(tokenizer_object=...)`.

    add_bos_token / add_eos_token: when given (tokenizer_config.json or keyword), they decide the special
    tokens around a sequence; when absent, the tokenizer's own post-processor does (as transformers does
    for a tokenizer.json whose config says nothing)."""

    def __init__(self, tokenizer_file=None, tokenizer_object=None, bos_token=None, eos_token=None,
                 unk_token=None, add_bos_token=None, add_eos_token=None, **kwargs):
        from tokenizers import Tokenizer

        if tokenizer_object is not None:
            self._tokenizer = tokenizer_object
        elif tokenizer_file is not None:
            if not os.path.isfile(tokenizer_file):
                raise FileNotFoundError(f"tokenizer file not found: {tokenizer_file}")
            try:
                self._tokenizer = Tokenizer.from_file(tokenizer_file)
            except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
                raise ValueError(f"cannot read {tokenizer_file}: {e}") from None
        else:
            raise ValueError("LlamaTokenizerFast needs tokenizer_file= (a tokenizer.json) or tokenizer_object=")
        # Explicit flags replace the post-processor; otherwise it alone decides (see class docstring).
        self._use_post_processor = add_bos_token is None and add_eos_token is None
        self._init_common(bos_token=bos_token, eos_token=eos_token, unk_token=unk_token,
                          add_bos_token=add_bos_token, add_eos_token=add_eos_token, **kwargs)

    def _encode_one(self, text, pair, add_special_tokens) -> list:
        if add_special_tokens and self._use_post_processor:
            return self._tokenizer.encode(text, pair, add_special_tokens=True).ids
        return super()._encode_one(text, pair, add_special_tokens)

    @property
    def backend_tokenizer(self):
        return self._tokenizer

    @classmethod
    def from_pretrained(cls, directory, **kwargs):
        return cls(tokenizer_file=os.path.join(directory, TOKENIZER_FILE), **tokenizer_arguments(directory, kwargs))

    def _save_vocabulary(self, directory):
        path = os.path.join(directory, TOKENIZER_FILE)
        self._tokenizer.save(path)
        return (path,)
