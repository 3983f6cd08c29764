"""Random ggml blocks for the K-quant tests: every byte random except the fp16 fields, which get finite values
of a chosen size (random fp16 bits would include inf / NaN, whose payloads no comparison can check)."""
from __future__ import annotations

import gguf
import numpy as np
import torch

from llama_fast import kquants

import gguf_util as G

# byte offsets of each type's fp16 fields (d, and dmin or m) within its block
FP16_FIELDS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q2_K": (80, 82), "Q3_K": (108,),
               "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,)}


def random_blocks(kind: str, n: int, k: int, seed: int = 0, magnitude: float = 0.02) -> torch.Tensor:
    """uint8 [n, row_bytes] of random `kind` blocks whose fp16 fields are uniform in +-magnitude."""
    rng = np.random.default_rng(seed)
    weights, nbytes = kquants.BLOCKS[kind]
    raw = rng.integers(0, 256, size=(n * (k // weights), nbytes), dtype=np.uint8)
    for at in FP16_FIELDS[kind]:
        value = rng.uniform(-magnitude, magnitude, size=raw.shape[0]).astype(np.float16)
        raw[:, at:at + 2] = value.view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(raw.reshape(n, -1))


def _config():
    return G.tiny_config(vocab_size=96, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)


# A Q4_K_M-like mix: q/k/gate/up Q4_K, v Q6_K in layer 1 (fused with Q4_K q/k), down Q5_K / Q6_K, o Q3_K / Q2_K,
# the tied token table Q6_K; one layer's up_proj in Q5_1 and gate in Q5_0 (what llama.cpp falls back to).
def _types(config):
    types = {"model.embed_tokens.weight": "Q6_K"}
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        types.update({p + "self_attn.q_proj.weight": "Q4_K", p + "self_attn.k_proj.weight": "Q4_K",
                      p + "self_attn.v_proj.weight": "Q4_K" if n == 0 else "Q6_K",
                      p + "self_attn.o_proj.weight": "Q3_K" if n == 0 else "Q2_K",
                      p + "mlp.gate_proj.weight": "Q4_K" if n == 0 else "Q5_0",
                      p + "mlp.up_proj.weight": "Q5_K" if n == 0 else "Q5_1",
                      p + "mlp.down_proj.weight": "Q6_K" if n == 0 else "Q5_K"})
    return types


def write_mixed_gguf(path):
    """Writes the mixed file above to `path`; -> (config, {parameter name: block type})."""
    config = _config()
    sd = G.random_state_dict(config)
    types = _types(config)
    tensors = {}
    for i, (name, value) in enumerate(sd.items()):
        if name in types:
            tensors[name] = random_blocks(types[name], value.shape[0], value.shape[1], seed=i).numpy()
        else:
            tensors[name] = value
    G.write_llama_gguf(path, config, tensors, {k: gguf.GGMLQuantizationType[v] for k, v in types.items()})
    return config, types
