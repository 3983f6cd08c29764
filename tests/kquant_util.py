"""Random ggml blocks for the K-quant tests: every byte random except the fp16 fields, which get finite values
of a chosen size (random fp16 bits would include inf / NaN, whose payloads no comparison can check)."""
from __future__ import annotations

import numpy as np
import torch

from llama_fast import kquants

# byte offsets of each type's fp16 fields (d, and dmin or m) within its block
FP16_FIELDS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q2_K": (80, 82), "Q3_K": (108,),
               "Q5_0": (0,), "Q5_1": (0, 2)}


def random_blocks(kind: str, n: int, k: int, seed: int = 0, magnitude: float = 0.02) -> torch.Tensor:
    """uint8 [n, row_bytes] of random `kind` blocks whose fp16 fields are uniform in +-magnitude."""
    rng = np.random.default_rng(seed)
    weights, nbytes = kquants.BLOCKS[kind]
    raw = rng.integers(0, 256, size=(n * (k // weights), nbytes), dtype=np.uint8)
    for at in FP16_FIELDS[kind]:
        value = rng.uniform(-magnitude, magnitude, size=raw.shape[0]).astype(np.float16)
        raw[:, at:at + 2] = value.view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(raw.reshape(n, -1))
