"""GGUF -> Hugging Face directory (config.json, model.safetensors, generation_config.json, tokenizer.json,
tokenizer_config.json with the chat template), readable by llama_fast and by transformers.

The directory is written next to its destination under a temporary name and renamed into place at the
end, so an interrupted conversion never leaves a half-written directory that looks complete.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import torch
from tqdm.auto import tqdm

from llama_fast.linear import dequantize_linears_
from llama_fast.modeling import LlamaForCausalLM
from llama_fast.tokenization import AutoTokenizer

DTYPES = ("float32", "bfloat16", "float16")


def convert_gguf(gguf_path: str, out_dir: str, dtype: str = "float32", overwrite: bool = False,
                 progress: bool = True, keep_quantized: bool = False) -> str:
    """Dequantizes the GGUF's weights to `dtype` and writes an HF directory at `out_dir`; returns it.
    keep_quantized: its Q8_0 / Q4_0 / Q4_1 weights stay in llama_fast's quantized format instead (the same
    numbers, a quarter of the size and the fast decode path; only llama_fast reads that directory), and
    `dtype` is the activations' dtype."""
    if not os.path.isfile(gguf_path):
        raise FileNotFoundError(f"no such GGUF file: {gguf_path}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        if not os.path.isdir(out_dir) or os.listdir(out_dir):
            raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True / --force to replace it)")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=parent)
    try:
        with tqdm(total=3, desc=f"converting {os.path.basename(gguf_path)}", unit="step",
                  disable=None if progress else True,
                  leave=False) as bar:
            bar.set_postfix_str("reading weights")
            model = LlamaForCausalLM.from_pretrained(gguf_path, dtype=dtype, device="cpu")
            if not keep_quantized:
                # GGUF weights load in their native quantized format; an HF directory holds dense ones.
                dequantize_linears_(model, getattr(torch, dtype))
            bar.update()
            bar.set_postfix_str("writing safetensors")
            model.save_pretrained(tmp)
            bar.update()
            bar.set_postfix_str("tokenizer")
            AutoTokenizer.from_pretrained(gguf_path).save_pretrained(tmp)
            bar.update()
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
