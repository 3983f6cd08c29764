"""Tokenizers without transformers, with transformers' API and ids.

    tok = AutoTokenizer.from_pretrained("path/to/hf-dir" or "model.gguf")

Modules: `auto` picks the class from the files present; `base` is what every tokenizer shares (special
tokens, padding, decode, chat templates, saving); `fast` is LlamaTokenizerFast (tokenizer.json);
`sentencepiece` is LlamaTokenizer (a sentencepiece tokenizer.model, read by `sentencepiece_model`);
`gguf` builds a tokenizer from a GGUF's metadata; `chat_template` renders Jinja chat templates.
"""
from llama_fast.tokenization.auto import AutoTokenizer
from llama_fast.tokenization.base import BatchEncoding
from llama_fast.tokenization.fast import LlamaTokenizerFast
from llama_fast.tokenization.sentencepiece import LlamaTokenizer

__all__ = ["AutoTokenizer", "BatchEncoding", "LlamaTokenizer", "LlamaTokenizerFast"]
