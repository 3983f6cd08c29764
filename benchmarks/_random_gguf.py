"""Random-weight Llama GGUF files of real shapes for the speed benchmarks (speed does not depend on the values).

The tokenizer metadata is copied from the demo model (SmolLM2's 49152-token BPE vocabulary), so both engines open
the file as they would a real checkpoint; the weights are N(0, 0.02) in F16 (norms 1.0, F32 as llama.cpp wants
1-D tensors). Quantized copies are made by llama.cpp's own quantizer (`llama_model_quantize`), the way users get
their files, with the token table in Q8_0 (tied: it also serves as the output head).
"""
from __future__ import annotations

import os

import numpy as np

# name -> (hidden, layers, heads, kv heads, intermediate); vocabulary 49152 (the copied tokenizer's), tied head.
SHAPES = {
    "llama-1b": (2048, 16, 32, 8, 8192),        # Llama 3.2 1B's body with the copied vocabulary
    "llama-8b": (4096, 32, 32, 8, 14336),       # Llama 3.1 8B's body (about 15 GB in F16: written only on request)
}

# Legacy block types written directly as random blocks (write_random_blocks): bytes per block of 32 weights,
# where the fp16 scale sits, and the scale that makes the weights' spread about 0.02 like write_random_f16's.
# (Q4_0: codes q - 8 uniform on -8..7, std ~4.6; Q8_0: int8 codes uniform on -127..127, std ~73.)
RANDOM_BLOCKS = {"Q4_0": (18, 0.02 / 4.6), "Q8_0": (34, 0.02 / 73.0)}
# K-quant types written as random blocks (the random mixes below): bytes per super-block of 256 weights and the
# offsets of their fp16 fields (d, dmin), set to 1e-4 (weights up to ~0.1: finite logits). The other bytes (codes,
# packed sub-block scales) are uniform: speed does not depend on them.
RANDOM_SUPER_BLOCKS = {"Q4_K": (144, (0, 2)), "Q6_K": (210, (208,))}
# File types written directly without llama.cpp's quantizer, as `<ftype>-random`: which K-quant type each kind of
# tensor gets. Q4_K_M-like: llama.cpp's Q4_K_M keeps attn_v and ffn_down in Q6_K for some layers (all here) and
# the token table in Q6_K.
RANDOM_MIXES = {"Q4_K_M": {"default": "Q4_K", "attn_v": "Q6_K", "ffn_down": "Q6_K", "token_embd": "Q6_K"}}


def start_writer(demo_gguf: str, tmp: str, shape: str, name: str, file_type: int):
    """A GGUFWriter on `tmp` with the Llama hyper-parameters of `shape` and the demo model's tokenizer metadata;
    returns it and the vocabulary size."""
    import gguf

    from _gguf_dense import copy_field

    hidden, layers, heads, kv_heads, inter = SHAPES[shape]
    reader = gguf.GGUFReader(demo_gguf)
    writer = gguf.GGUFWriter(tmp, "llama")
    writer.add_name(name)
    writer.add_context_length(8192)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(file_type)
    vocab = None
    for field in reader.fields.values():
        if field.name.startswith("tokenizer."):
            copy_field(writer, field)
            if field.name == "tokenizer.ggml.tokens":
                vocab = len(field.data)
    return writer, vocab


def write_random_f16(demo_gguf: str, dst: str, shape: str, seed: int = 0) -> str:

    from _gguf_dense import finish

    if os.path.exists(dst):
        return dst
    hidden, layers, heads, kv_heads, inter = SHAPES[shape]
    head_dim = hidden // heads
    tmp = dst + ".tmp"
    writer, vocab = start_writer(demo_gguf, tmp, shape, f"random-{shape}", file_type=1)  # MOSTLY_F16
    rng = np.random.default_rng(seed)

    def weight(rows, cols):  # GGUF stores [rows, cols] row-major as ne = (cols, rows)
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    writer.add_tensor("token_embd.weight", weight(vocab, hidden))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        p = f"blk.{i}."
        writer.add_tensor(p + "attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(p + "attn_q.weight", weight(heads * head_dim, hidden))
        writer.add_tensor(p + "attn_k.weight", weight(kv_heads * head_dim, hidden))
        writer.add_tensor(p + "attn_v.weight", weight(kv_heads * head_dim, hidden))
        writer.add_tensor(p + "attn_output.weight", weight(hidden, heads * head_dim))
        writer.add_tensor(p + "ffn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(p + "ffn_gate.weight", weight(inter, hidden))
        writer.add_tensor(p + "ffn_up.weight", weight(inter, hidden))
        writer.add_tensor(p + "ffn_down.weight", weight(hidden, inter))
    return finish(writer, tmp, dst)


def write_random_blocks(demo_gguf: str, dst: str, shape: str, kind: str, seed: int = 0) -> str:
    """A random model of `shape` whose matrices are random `kind` (Q4_0 / Q8_0, or a mix of RANDOM_MIXES: Q4_K_M)
    blocks written directly, token table in Q8_0 (the mix's type for a mix): the way to get an 8B-shaped file
    without writing and quantizing a 15 GB F16 one first, or a K-quant file without llama.cpp's quantizer. Each
    tensor is generated and written on its own (add_tensor_info + write_tensor_data), so memory stays at one
    tensor, not the whole file."""
    import gguf


    if os.path.exists(dst):
        return dst
    hidden, layers, heads, kv_heads, inter = SHAPES[shape]
    head_dim = hidden // heads
    tmp = dst + ".tmp"
    file_type = {"Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15}[kind]   # MOSTLY_Q4_0 / MOSTLY_Q8_0 / MOSTLY_Q4_K_M
    mix = RANDOM_MIXES.get(kind, {"default": kind, "token_embd": "Q8_0"})

    def type_of(name):
        return mix.get(name, mix["default"])

    writer, vocab = start_writer(demo_gguf, tmp, shape, f"random-{shape}-{kind}", file_type)
    tensors = [("token_embd.weight", (vocab, hidden), type_of("token_embd")), ("output_norm.weight", (hidden,), "F32")]
    for i in range(layers):
        p = f"blk.{i}."
        tensors += [(p + "attn_norm.weight", (hidden,), "F32"),
                    (p + "attn_q.weight", (heads * head_dim, hidden), type_of("attn_q")),
                    (p + "attn_k.weight", (kv_heads * head_dim, hidden), type_of("attn_k")),
                    (p + "attn_v.weight", (kv_heads * head_dim, hidden), type_of("attn_v")),
                    (p + "attn_output.weight", (hidden, heads * head_dim), type_of("attn_output")),
                    (p + "ffn_norm.weight", (hidden,), "F32"),
                    (p + "ffn_gate.weight", (inter, hidden), type_of("ffn_gate")),
                    (p + "ffn_up.weight", (inter, hidden), type_of("ffn_up")),
                    (p + "ffn_down.weight", (hidden, inter), type_of("ffn_down"))]
    rng = np.random.default_rng(seed)

    def nbytes_of(shape, ttype):
        if ttype == "F32":
            return int(np.prod(shape)) * 4
        if ttype in RANDOM_SUPER_BLOCKS:
            return shape[0] * shape[1] // 256 * RANDOM_SUPER_BLOCKS[ttype][0]
        return shape[0] * shape[1] // 32 * RANDOM_BLOCKS[ttype][0]

    def data(shape, ttype):
        if ttype == "F32":
            return np.ones(shape, np.float32)
        rows, cols = shape
        if ttype in RANDOM_SUPER_BLOCKS:
            block_bytes, fp16_at = RANDOM_SUPER_BLOCKS[ttype]
            blocks = rng.integers(0, 256, size=(rows, cols // 256, block_bytes), dtype=np.uint8)
            for at in fp16_at:
                blocks[:, :, at:at + 2] = np.frombuffer(np.float16(1e-4).tobytes(), np.uint8)
            return blocks.reshape(rows, -1)
        block_bytes, scale = RANDOM_BLOCKS[ttype]
        blocks = rng.integers(0, 256, size=(rows, cols // 32, block_bytes), dtype=np.uint8)
        blocks[:, :, 0:2] = np.frombuffer(np.float16(scale).tobytes(), np.uint8)   # every block's fp16 d
        return blocks.reshape(rows, -1)

    for name, shape_, ttype in tensors:
        qtype = getattr(gguf.GGMLQuantizationType, ttype)
        nbytes = nbytes_of(shape_, ttype)
        byte_shape = shape_ if ttype == "F32" else (shape_[0], nbytes // shape_[0])
        writer.add_tensor_info(name, byte_shape, np.float32 if ttype == "F32" else np.uint8, nbytes,
                               raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, shape_, ttype in tensors:
        writer.write_tensor_data(data(shape_, ttype))
    writer.close()
    os.replace(tmp, dst)
    return dst


def quantize_with_llama_cpp(src: str, dst: str, kind: str) -> str:
    """`kind` in Q4_0, Q4_1, Q8_0, Q4_K_M, Q5_K_M, Q6_K: llama.cpp's quantizer, token table (and so the tied
    head) in Q8_0 for the legacy types as in issue 14's 1B file, llama.cpp's own choice for the K-quant mixes."""
    import llama_cpp

    if os.path.exists(dst):
        return dst
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.nthread = os.cpu_count() or 1
    if not kind.endswith(("_K_M", "_K")):
        params.token_embedding_type = llama_cpp.GGML_TYPE_Q8_0
        params.output_tensor_type = llama_cpp.GGML_TYPE_Q8_0
    tmp = dst + ".tmp"
    status = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), params)
    if status != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {kind}) failed with status {status}")
    os.replace(tmp, dst)
    return dst
