"""GGUF files (llama.cpp's format): config, tensors with HF names, quantized tensors loaded natively.

llama_fast.formats.gguf_reader validates the header (nothing is unpickled). This module turns it into
  * the fields of an HF config.json (`gguf_config`), from the `llama.*` and `tokenizer.ggml.*` metadata;
  * a stream of (HF tensor name, tensor) pairs (`gguf_tensors`) the model's loader consumes one at a time
    (llama_fast.loading builds the model from both; this module imports no model code).

Tensor types: F32, F16 and BF16 give dense tensors. Q8_0, Q4_0 and Q4_1 give a llama_fast.quant
QuantizedWeight holding the same numbers (no dequantize / requantize), each GGUF block being one group of 32:
    Q8_0: fp16 d, int8 q           w = q * d           -> bits 8, scale d, no offset
    Q4_0: fp16 d, 4-bit q          w = (q - 8) * d     -> bits 4, scale d, offset -8 d
    Q4_1: fp16 d, fp16 m, 4-bit q  w = q * d + m       -> bits 4, scale d, offset m
`QuantizedWeight.dequantize(torch.float32)` reproduces gguf.quants.dequantize bit for bit (for Q4_0,
q*d - 8d equals (q-8)*d exactly: q*d is exact in fp32 since d has an 11-bit mantissa and q 4 bits).
Scales stay fp16, their stored type, whatever dtype the model runs in, so nothing is rounded.
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q5_0 and Q5_1 give a llama_fast.kquants.KQuantWeight: the file's blocks as
they are (our affine format would cost more bits per weight), run by the kquant_linear kernels; its
dequantize() equals gguf.quants.dequantize bit for bit.
With dequantize=True every tensor comes out dense in the requested dtype instead.

Embeddings: a quantized token_embd stays native too: the lookup dequantizes only the rows it needs
(llama_fast.embedding; a dense fp32 copy would be 113 MB for SmolLM2's Q8_0 table, more than all its int4
layers). A model without output.weight ties lm_head to the embedding: with a quantized token_embd, lm_head
then reads the same native blocks, as llama.cpp does (one copy of the table for both). With dequantize=True
both use the dense table instead. An untied quantized output.weight stays native.

Q/K rows: convert_hf_to_gguf.py permutes the rows of q_proj / k_proj within each head so that llama.cpp's
interleaved-pair rotary works on them; we undo it (HF rotate_half convention). A row permutation moves
whole rows of quantized blocks, so it is exact for the quantized types too.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator

import numpy as np
import torch

from llama_fast import kquants
from llama_fast.formats import regions
from llama_fast.formats.gguf_reader import ggml_type_sizes
from llama_fast.kquants import KQuantWeight
from llama_fast.quant import QuantizedWeight, pack_int4

# The GGUF quantized block: 32 weights; the header holds fp16 d (and fp16 m for Q4_1).
BLOCK = 32
_HEADER_BYTES = {"Q8_0": 2, "Q4_0": 2, "Q4_1": 4}
_DENSE_TYPES = ("F32", "F16", "BF16")
SUPPORTED_TYPES = _DENSE_TYPES + tuple(_HEADER_BYTES) + tuple(t for t in kquants.TYPES if t not in _HEADER_BYTES)
_NATIVE = (QuantizedWeight, KQuantWeight)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


class GGUFError(ValueError):
    """A GGUF file we cannot read: malformed, truncated, or holding something we do not support."""


def hf_name(gguf_name: str) -> str | None:
    """HF parameter name of a GGUF tensor name (None for tensors the model does not use)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if re.fullmatch(r"blk\.\d+\.attn_rot_embd(\.weight)?", gguf_name):  # a rotary table, recomputed
        return None
    if gguf_name == "rope_freqs.weight":  # rope scaling factors: part of the config (gguf_config)
        return None
    m = _LAYER_RE.fullmatch(gguf_name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        raise KeyError(gguf_name)
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def open_gguf(path: str | os.PathLike):
    """The validated header of `path` (llama_fast.formats.gguf_reader): counts, lengths, tensor types, dims
    and the tiling of the data section are checked before anything is read or allocated from them."""
    from llama_fast.formats.gguf_reader import GGUFFormatError, GGUFReader

    try:
        return GGUFReader(path)
    except GGUFFormatError as e:
        raise GGUFError(str(e)) from None


def _field(reader, key: str, default=None):
    return reader.get(key, default)


def _int_field(reader, key: str, path: str, default=None, low: int = 1, high: int = 2 ** 31 - 1) -> int:
    """An integer metadata value in [low, high] (sizes beyond int32 describe no model we can build)."""
    value = reader.get(key, default)
    if value is None:
        raise GGUFError(f"{path}: metadata key {key} is missing")
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise GGUFError(f"{path}: metadata {key} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _float_field(reader, key: str, path: str, default: float) -> float:
    value = reader.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise GGUFError(f"{path}: metadata {key} must be a finite number, got {value!r}")
    return float(value)


def gguf_config(reader, path: str = "<gguf>") -> dict:
    """The HF config.json fields of a Llama-architecture GGUF file."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise GGUFError(f"{path}: general.architecture is {arch!r}; only 'llama' GGUF files are supported")

    def need(key, default=None):
        return _int_field(reader, f"llama.{key}", path, default)

    names = {t.name for t in reader.tensors}
    n_heads = need("attention.head_count")
    hidden = need("embedding_length")
    vocab = _field(reader, "llama.vocab_size")
    if vocab is None:
        vocab = reader.array_length("tokenizer.ggml.tokens")
    if vocab is None:
        embd = reader.tensor("token_embd.weight")
        if embd is None:
            raise GGUFError(f"{path}: cannot tell the vocabulary size (no llama.vocab_size, tokens or token_embd)")
        vocab = embd.shape[0]
    vocab = _int_field(reader, "llama.vocab_size", path, vocab)
    block_count = need("block_count")
    _check_block_count(block_count, names, path)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": block_count,
        "num_attention_heads": n_heads,
        "num_key_value_heads": need("attention.head_count_kv", n_heads),
        "head_dim": need("attention.key_length", hidden // n_heads if hidden >= n_heads else 0),
        "max_position_embeddings": need("context_length", 2048),
        "rms_norm_eps": _float_field(reader, "llama.attention.layer_norm_rms_epsilon", path, 1e-6),
        "rope_theta": _float_field(reader, "llama.rope.freq_base", path, 10000.0),
        "rope_scaling": _rope_scaling(reader, path),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": "blk.0.ffn_up.bias" in names,
    }
    factors = _rope_freq_factors(reader, config["head_dim"], path)
    if factors is not None:
        config["rope_freq_factors"] = factors
    rope_dim = _field(reader, "llama.rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != config["head_dim"]:
        raise GGUFError(f"{path}: llama.rope.dimension_count={rope_dim} differs from head_dim "
                        f"{config['head_dim']} (partial rotary is not a Llama model)")
    for ours, theirs in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                         ("pad_token_id", "padding_token_id")):
        if _field(reader, f"tokenizer.ggml.{theirs}") is not None:
            config[ours] = _int_field(reader, f"tokenizer.ggml.{theirs}", path, low=0)
    return config


def _check_block_count(block_count: int, names: set[str], path: str) -> None:
    """llama.block_count must be the number of blk.N layers the file holds (a corrupt count would build
    layers that no tensor fills, or until memory runs out)."""
    layers = {int(m.group(1)) for m in map(_LAYER_RE.fullmatch, names) if m is not None}
    if layers != set(range(block_count)):
        present = f"blk.0..blk.{max(layers)}" if layers else "none"
        raise GGUFError(f"{path}: llama.block_count is {block_count} but the file's layers are {present} "
                        f"({len(layers)} distinct)")


def _rope_freq_factors(reader, head_dim: int, path: str) -> list[float] | None:
    """rope_freqs.weight: Llama 3.1+'s rope scaling as llama.cpp stores it, one divisor per rotary frequency
    (convert_hf_to_gguf computes them from the llama3 rope parameters, which the file then omits). The model
    divides its inverse frequencies by them (llama_fast.rope), as llama.cpp does."""
    t = reader.tensor("rope_freqs.weight")
    if t is None:
        return None
    if t.type_name != "F32" or t.n_elements != head_dim // 2:
        raise GGUFError(f"{path}: rope_freqs.weight must be F32 with head_dim / 2 = {head_dim // 2} values, got "
                        f"{t.type_name} of shape {list(t.shape)}")
    factors = reader.read_tensor(t).view(np.float32)
    if not np.isfinite(factors).all() or (factors <= 0).any():
        raise GGUFError(f"{path}: rope_freqs.weight holds non-positive or non-finite factors")
    return [float(f) for f in factors]


def _rope_scaling(reader, path: str) -> dict | None:
    kind = _field(reader, "llama.rope.scaling.type")
    factor = _field(reader, "llama.rope.scaling.factor")
    if factor is not None:
        factor = _float_field(reader, "llama.rope.scaling.factor", path, 1.0)
    if kind in (None, "none") and factor in (None, 1.0, 0.0):
        return None
    if kind == "linear" or (kind is None and factor):
        return {"rope_type": "linear", "factor": float(factor)}
    raise GGUFError(f"{path}: rope scaling type {kind!r} is not supported (only linear)")


def _rows_unpermute(n_rows: int, n_heads: int) -> torch.Tensor:
    """Row order that undoes convert_hf_to_gguf's permute (rows of head h interleaved pairwise):
    hf_rows = gguf_rows[index]."""
    half = n_rows // n_heads // 2
    return torch.arange(n_rows).reshape(n_heads, half, 2).transpose(1, 2).reshape(n_rows)


def _quantized(raw: torch.Tensor, kind: str, n: int, k: int) -> QuantizedWeight:
    """uint8 [N, K/32 * block bytes] GGUF blocks -> QuantizedWeight (exact; see the module docstring)."""
    header = _HEADER_BYTES[kind]
    blocks = raw.reshape(n, k // BLOCK, -1)
    d = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1)
    payload = blocks[..., header:]
    if kind == "Q8_0":
        return QuantizedWeight(payload.contiguous().view(torch.int8).reshape(n, k), d, None, 8, BLOCK)
    # 4-bit: byte i of a block holds element i (low nibble) and element i + 16 (high nibble).
    codes = torch.cat((payload & 0x0F, payload >> 4), dim=-1).reshape(n, k)
    if kind == "Q4_1":
        offset = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1)
    else:  # Q4_0: offset -8 d; fp16 holds it exactly unless it overflows, then keep both in fp32.
        if d.float().abs().max() * 8 > torch.finfo(torch.float16).max:
            d = d.float()
        offset = d * -8
    return QuantizedWeight(pack_int4(codes), d, offset, 4, BLOCK)


_DENSE_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _read_raw(reader, t, split, path: str) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(uint8 bytes, shape) of tensor `t`, or of the rows (split.dim 0) or input columns (split.dim 1) that a
    tensor-parallel rank reads (llama_fast.parallel.layout.Split): only those bytes are read, and a column
    range must not split a quantized block."""
    if split is None:
        return torch.from_numpy(reader.read_tensor(t)), t.shape   # a buffer of our own: views copy nothing
    shape = t.shape
    if len(shape) == 1:       # a bias: small, read whole
        raw = torch.from_numpy(reader.read_tensor(t)).view(shape[0], -1)
        return raw[split.start:split.stop].reshape(-1), (split.size,)
    if len(shape) != 2:
        raise GGUFError(f"{path}: tensor {t.name} has shape {list(shape)}; only 1-D and 2-D tensors can be split")
    n, k = shape
    _, block_elems, block_bytes = ggml_type_sizes()[t.type_id]
    rows = (split.start, split.stop) if split.dim == 0 else (0, n)
    cols = (split.start, split.stop) if split.dim == 1 else (0, k)
    try:
        byte_cols = regions.block_columns(cols, block_elems, block_bytes, f"{path}: tensor {t.name} ({t.type_name})")
        raw = regions.read_rectangle(reader.path, t.offset, n, t.n_bytes // n, rows, byte_cols)
    except ValueError as e:
        raise GGUFError(str(e)) from None
    return raw.reshape(-1), (rows[1] - rows[0], cols[1] - cols[0])


def _native_tensor(reader, t, config: dict, path: str,
                   select=None) -> tuple[str, torch.Tensor | QuantizedWeight] | None:
    """(HF name, the tensor as stored: dense, or QuantizedWeight with the same numbers), Q/K rows unpermuted.
    select: HF name -> the Split a tensor-parallel rank reads (None: the whole tensor)."""
    try:
        name = hf_name(t.name)
    except KeyError:
        raise GGUFError(f"{path}: tensor {t.name} is not part of a Llama model") from None
    if name is None:
        return None
    kind = t.type_name
    if kind not in SUPPORTED_TYPES:
        raise GGUFError(f"{path}: tensor {t.name} has type {kind}; supported types are "
                        f"{', '.join(SUPPORTED_TYPES)}")
    raw, shape = _read_raw(reader, t, None if select is None else select(name), path)
    if kind in _DENSE_TYPES:
        value: torch.Tensor | QuantizedWeight = raw.view(_DENSE_DTYPES[kind]).reshape(shape)
    else:
        if len(shape) != 2:
            raise GGUFError(f"{path}: quantized tensor {t.name} has shape {shape}; expected 2-D")
        if kind in kquants.BLOCKS and kind not in _HEADER_BYTES:   # Q8_0: a quant weight (kquants.from_q8_0)
            if shape[1] % kquants.BLOCKS[kind][0]:
                raise GGUFError(f"{path}: tensor {t.name} of type {kind} has rows of {shape[1]} weights, not a "
                                f"multiple of its block of {kquants.BLOCKS[kind][0]}")
            value = KQuantWeight.single(kind, raw.reshape(shape[0], -1), shape[1], t.name)
        else:
            value = _quantized(raw, kind, *shape)
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    proj = name.split(".")[-2]
    if proj in heads:
        # convert_hf_to_gguf permutes rows within each head, so a rank's heads are a row range of the file too
        value = _take_rows(value, _rows_unpermute(shape[0], heads[proj] * shape[0] // t.shape[0]))
    return name, value


def _as_loaded(value, dequantize: bool, dtype: torch.dtype):
    """A native tensor as the model loads it: quantized weights (linears and the token table) stay native unless
    `dequantize`; every dense tensor comes out dense in `dtype`."""
    if isinstance(value, _NATIVE) and dequantize:
        value = value.dequantize(torch.float32)
    return value.to(dtype) if isinstance(value, torch.Tensor) else value


def _take_rows(value, index: torch.Tensor):
    if isinstance(value, torch.Tensor):
        return value[index]
    return value.take_rows(index)


def gguf_tensors(reader, config: dict, dequantize: bool = False, dtype: torch.dtype = torch.float32,
                 path: str = "<gguf>", select=None) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    """(HF name, tensor) for every tensor the model uses, one at a time (peak memory: one tensor). select:
    HF name -> the part a tensor-parallel rank reads (llama_fast.parallel.layout.Split) or None (all)."""
    tied = bool(config.get("tie_word_embeddings"))
    for t in reader.tensors:
        item = _native_tensor(reader, t, config, path, select)
        if item is None:
            continue
        name, native = item
        yield name, _as_loaded(native, dequantize, dtype)
        if name == "model.embed_tokens.weight" and tied and not dequantize and isinstance(native, _NATIVE):
            # The tied lm_head multiplies by the file's quantized table, as llama.cpp does: the same tensors
            # as the embedding's (llama_fast.embedding), so the table is held once.
            yield "lm_head.weight", native


def read_gguf(path: str | os.PathLike, dequantize: bool = False, dtype: torch.dtype = torch.float32):
    """-> (HF config dict, iterator of (HF name, tensor | QuantizedWeight))."""
    path = os.fspath(path)
    reader = open_gguf(path)
    config = gguf_config(reader, path)
    return config, gguf_tensors(reader, config, dequantize, dtype, path)
