"""Writes small Llama GGUF files for tests, the way llama.cpp's convert_hf_to_gguf.py does: HF tensor names
mapped to GGUF names, q_proj / k_proj rows permuted for interleaved rotary, tensors stored as F32 or
quantized with the gguf package's own quantizers."""
from __future__ import annotations

import gguf
import numpy as np
import torch

Q = gguf.GGMLQuantizationType

LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}


def tiny_config(**overrides) -> dict:
    config = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                  rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    config.update(overrides)
    return config


def random_state_dict(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """HF-named float32 weights of a Llama model with `config`."""
    g = torch.Generator().manual_seed(seed)
    h, i = config["hidden_size"], config["intermediate_size"]
    d = config.get("head_dim", h // config["num_attention_heads"])
    kv = config["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], h), "model.norm.weight": (h,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], h)
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({
            p + "self_attn.q_proj.weight": (config["num_attention_heads"] * d, h),
            p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, config["num_attention_heads"] * d),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    out = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            out[name] = (1 + 0.1 * torch.randn(shape, generator=g)).numpy()
        else:
            out[name] = (torch.randn(shape, generator=g) * 0.08).numpy()
    return out


def gguf_name(hf: str) -> str:
    if not hf.startswith(("model.", "lm_head.")):
        return hf  # already a GGUF name
    if hf in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf]
    parts = hf.split(".")  # model.layers.N.<module>.<sub>.weight
    module = ".".join(parts[3:-1])
    return f"blk.{parts[2]}.{LAYER_NAMES[module]}.{parts[-1]}"


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path, config: dict, tensors: dict[str, np.ndarray], types: dict[str, Q] | None = None,
                     arch: str = "llama", skip_keys: tuple[str, ...] = (), extra_kv: dict | None = None,
                     extra=None) -> None:
    """`tensors` are HF-named float32 arrays, or uint8 arrays of raw blocks [rows, bytes per row] of the type
    `types` names (K-quants, which the gguf package cannot quantize); `types` picks each float array's GGUF type
    (default F32); `extra_kv` adds metadata {key: (value, gguf.GGUFValueType)}, `extra(writer)` anything more
    (a tokenizer, say)."""
    types = types or {}
    w = gguf.GGUFWriter(str(path), arch)
    keys = {
        "block_count": lambda: w.add_block_count(config["num_hidden_layers"]),
        "context_length": lambda: w.add_context_length(config["max_position_embeddings"]),
        "embedding_length": lambda: w.add_embedding_length(config["hidden_size"]),
        "feed_forward_length": lambda: w.add_feed_forward_length(config["intermediate_size"]),
        "head_count": lambda: w.add_head_count(config["num_attention_heads"]),
        "head_count_kv": lambda: w.add_head_count_kv(config["num_key_value_heads"]),
        "rope_freq_base": lambda: w.add_rope_freq_base(config["rope_theta"]),
        "rms_eps": lambda: w.add_layer_norm_rms_eps(config["rms_norm_eps"]),
        "vocab_size": lambda: w.add_vocab_size(config["vocab_size"]),
        "rope_dims": lambda: w.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"]),
        "bos": lambda: w.add_bos_token_id(config["bos_token_id"]),
        "eos": lambda: w.add_eos_token_id(config["eos_token_id"]),
    }
    for key, add in keys.items():
        if key not in skip_keys:
            add()
    for key, (value, vtype) in (extra_kv or {}).items():
        w.add_key_value(key, value, vtype)
    if extra is not None:
        extra(w)
    if config.get("rope_scaling"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(config["rope_scaling"]["factor"])
    for hf, array in tensors.items():
        raw = isinstance(array, np.ndarray) and array.dtype == np.uint8
        array = array if raw else np.asarray(array, dtype=np.float32)
        if hf.endswith("q_proj.weight"):
            array = permute(array, config["num_attention_heads"])
        elif hf.endswith("k_proj.weight"):
            array = permute(array, config["num_key_value_heads"])
        qtype = types.get(hf, Q.F32)
        if raw:
            w.add_tensor(gguf_name(hf), array, raw_dtype=qtype)
        elif qtype == Q.F32:
            w.add_tensor(gguf_name(hf), array)
        elif qtype == Q.F16:
            w.add_tensor(gguf_name(hf), array.astype(np.float16))
        else:
            w.add_tensor(gguf_name(hf), gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def permute_back(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `permute` (what the loader must do)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---- byte surgery on written files (the hardening tests corrupt one field at a time) -------------------

def _string_at(raw: bytes, text: str) -> int:
    """Offset just past the GGUF string `text` (u64 length + bytes) in `raw`."""
    needle = len(text).to_bytes(8, "little") + text.encode()
    at = raw.find(needle)
    assert at >= 0, text
    return at + len(needle)


def kv_value_offset(raw: bytes, key: str) -> int:
    """Offset of metadata `key`'s value type (u32); the value follows it."""
    return _string_at(raw, key)


def tensor_info_offsets(raw: bytes, name: str) -> dict[str, int]:
    """Offsets of tensor `name`'s n_dims (u32), dims (u64 each), type (u32) and offset (u64) fields."""
    at = _string_at(raw, name)
    n_dims = int.from_bytes(raw[at:at + 4], "little")
    dims = at + 4
    kind = dims + 8 * n_dims
    return {"n_dims": at, "dims": dims, "type": kind, "offset": kind + 4, "count": n_dims}


def patch(raw: bytes, at: int, value: int, size: int) -> bytes:
    return raw[:at] + value.to_bytes(size, "little") + raw[at + size:]
