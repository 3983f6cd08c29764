"""Writes the K-quant GGUF fixtures of tests/data (kquant_*.gguf) with llama.cpp's own quantizer.

A tiny random Llama (hidden 256, intermediate 256, 2 layers, 4 heads / 2 KV heads, vocab 384, tied
embeddings: rows and columns multiples of 256, so that every tensor gets a K-quant type) is written as an F32
GGUF the way convert_hf_to_gguf.py writes one (tests/gguf_util.py), with a sentencepiece-style vocabulary that
llama.cpp accepts (byte tokens <0x00>..<0xFF>, so it can load and run the file), then quantized by
llama-cpp-python's llama_model_quantize to Q4_K_M, Q5_K_M, Q6_K, Q3_K_M and Q2_K: the mixes llama.cpp's
src/llama-quant.cpp picks (a Q4_K_M file keeps the tied token table in Q6_K and attn_v / ffn_down of some layers
in Q6_K; Q2_K files mix Q2_K with Q3_K / Q4_K).

    pip install llama-cpp-python      # builds llama.cpp (minutes); CI never runs this script
    python tests/data/make_kquant_fixtures.py [--out tests/data] [--hidden 256 --intermediate 256 --layers 2]

Without llama-cpp-python (or with --quantizer own) the tensors are quantized by tests/kquant_quantize.py, a
plain round-to-nearest K-quant quantizer written from the block layouts, into the same per-tensor type mix
(`own_mix`, which follows llama-quant.cpp's rules for these ftypes). The committed fixtures say which one
made them in their general.name ("... (llama.cpp)" or "... (kquant_quantize)").

The F32 source is not committed: `write_f32(path)` rebuilds it bit for bit (a seeded generator), which is
what the tests compare the quantized files against. Bigger models for benchmarks come from the same script
with other sizes (--hidden 1024 ...).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))   # tests/, for gguf_util
import gguf_util as G  # noqa: E402

FTYPES = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q3_K_M", "Q2_K")


def fixture_config(hidden: int = 256, intermediate: int = 256, layers: int = 2, vocab: int = 384,
                   heads: int = 4, kv_heads: int = 2) -> dict:
    return G.tiny_config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=512, tie_word_embeddings=True, rope_theta=10000.0,
                         bos_token_id=1, eos_token_id=2)


def sentencepiece_vocab(size: int) -> dict:
    """tokenizer.ggml.* for a sentencepiece-style vocabulary of `size` tokens: <unk>, <s>, </s>, the 256 byte
    tokens, then made-up pieces."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581p{i}" for i in range(size - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (size - 259)
    scores = [0.0] * 259 + [-float(i) for i in range(size - 259)]
    return {"tokens": tokens, "types": types, "scores": scores}


def write_f32(path: str, config: dict, seed: int = 0, name: str | None = None) -> None:
    """The F32 source model (deterministic for a seed); `name` goes to general.name (llama.cpp's quantizer
    copies it into the files it writes)."""
    import gguf

    sd = G.random_state_dict(config, seed=seed)
    vocab = sentencepiece_vocab(config["vocab_size"])

    def add_vocab(w: gguf.GGUFWriter) -> None:
        if name:
            w.add_name(name)
        w.add_tokenizer_model("llama")
        w.add_token_list(vocab["tokens"])
        w.add_token_scores(vocab["scores"])
        w.add_token_types(vocab["types"])
        w.add_add_bos_token(True)

    G.write_llama_gguf(path, config, sd, extra=add_vocab)


def use_more_bits(layer: int, layers: int) -> bool:
    """llama-quant.cpp's choice of the layers whose attn_v / ffn_down get more bits in *_M mixes."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def own_mix(ftype: str, hf_name: str, layers: int) -> str:
    """The block type llama.cpp's quantizer gives `hf_name` in an `ftype` file (the rules of
    llama-quant.cpp for these ftypes, for a model whose rows are all multiples of 256)."""
    if hf_name == "model.embed_tokens.weight":     # a tied token table is quantized like output.weight
        return "Q6_K"
    layer = int(hf_name.split(".")[2])
    v, down = "v_proj" in hf_name, "down_proj" in hf_name
    if ftype == "Q6_K":
        return "Q6_K"
    if ftype in ("Q4_K_M", "Q5_K_M"):
        base = ftype[:4]
        return "Q6_K" if (v or down) and use_more_bits(layer, layers) else base
    if ftype == "Q3_K_M":
        if v:
            return "Q5_K" if layer < 2 else "Q4_K"
        if down:
            return "Q5_K" if layer < layers // 16 else "Q4_K"
        return "Q4_K" if "o_proj" in hf_name else "Q3_K"
    if ftype == "Q2_K":
        return "Q3_K" if (v or down or "o_proj" in hf_name) else "Q2_K"
    raise ValueError(f"no mix for {ftype}")


def quantize_own(dst: str, config: dict, ftype: str, seed: int = 0) -> None:
    """The F32 model's tensors quantized by tests/kquant_quantize.py into llama.cpp's type mix for `ftype`."""
    import gguf
    import kquant_quantize

    sd = G.random_state_dict(config, seed=seed)
    vocab = sentencepiece_vocab(config["vocab_size"])
    tensors, types = {}, {}
    for name, value in sd.items():
        if value.ndim == 2:
            kind = own_mix(ftype, name, config["num_hidden_layers"])
            if name.endswith("q_proj.weight"):      # quantize the rows in the file's (permuted) order
                value = G.permute(value, config["num_attention_heads"])
            elif name.endswith("k_proj.weight"):
                value = G.permute(value, config["num_key_value_heads"])
            blocks = kquant_quantize.quantize(value, kind)
            if name.endswith(("q_proj.weight", "k_proj.weight")):   # write_llama_gguf permutes again
                heads = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
                blocks = G.permute_back(blocks, heads)
            tensors[name], types[name] = blocks, gguf.GGMLQuantizationType[kind]
        else:
            tensors[name] = value

    def add_vocab(w: gguf.GGUFWriter) -> None:
        w.add_name(f"kquant fixture {ftype} (kquant_quantize)")
        w.add_tokenizer_model("llama")
        w.add_token_list(vocab["tokens"])
        w.add_token_scores(vocab["scores"])
        w.add_token_types(vocab["types"])
        w.add_add_bos_token(True)

    G.write_llama_gguf(dst, config, tensors, types, extra=add_vocab)


def quantize(src: str, dst: str, ftype: str, threads: int = 2) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({ftype}) failed with {rc}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=HERE)
    p.add_argument("--prefix", default="kquant")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=384)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--types", default=",".join(FTYPES))
    p.add_argument("--keep-f32", action="store_true")
    p.add_argument("--quantizer", choices=("auto", "llama_cpp", "own"), default="auto")
    args = p.parse_args()
    if args.quantizer == "auto":
        import importlib.util
        args.quantizer = "llama_cpp" if importlib.util.find_spec("llama_cpp") else "own"
    config = fixture_config(args.hidden, args.intermediate, args.layers, args.vocab, args.heads, args.kv_heads)
    os.makedirs(args.out, exist_ok=True)
    f32 = os.path.join(args.out, f"{args.prefix}_F32.gguf")
    write_f32(f32, config, name="kquant fixture (llama.cpp)" if args.quantizer == "llama_cpp" else None)
    for ftype in args.types.split(","):
        dst = os.path.join(args.out, f"{args.prefix}_{ftype}.gguf")
        if args.quantizer == "llama_cpp":
            quantize(f32, dst, ftype)
        else:
            quantize_own(dst, config, ftype)
        print(f"{dst}: {os.path.getsize(dst)} bytes")
    if not args.keep_f32:
        os.remove(f32)


if __name__ == "__main__":
    main()
