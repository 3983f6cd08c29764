"""llama_fast: a faster, faithful drop-in for transformers' LLaMA classes.

    from llama_fast import LlamaForCausalLM, AutoTokenizer
    model = LlamaForCausalLM.from_pretrained("path/to/hf-dir-or.gguf", dtype="bfloat16", quantize="int4")
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> the module defining it. Imported on first use, so `import llama_fast` stays cheap and a
# tool that needs only the tokenizer never loads the kernels.
_EXPORTS = {
    "LlamaConfig": "llama_fast.config",
    "LlamaModel": "llama_fast.modeling",
    "LlamaForCausalLM": "llama_fast.modeling",
    "LlamaForSequenceClassification": "llama_fast.modeling",
    "StaticCache": "llama_fast.cache",
    "AutoTokenizer": "llama_fast.tokenization",
    "LlamaTokenizer": "llama_fast.tokenization",
    "LlamaTokenizerFast": "llama_fast.tokenization",
    "BatchEncoding": "llama_fast.tokenization",
    "TextStreamer": "llama_fast.streamers",
    "TextIteratorStreamer": "llama_fast.streamers",
    "ops": "llama_fast.ops",
    "quant": "llama_fast.quant",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'llama_fast' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = module if module_name == f"llama_fast.{name}" else getattr(module, name)
    globals()[name] = value
    return value
