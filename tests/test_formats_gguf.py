"""llama_fast.formats.gguf on small GGUF files written like llama.cpp's converter does (tests/gguf_util.py):
config from metadata, names, Q/K unpermutation, dense and native quantized tensors, bad files."""
import gguf
import numpy as np
import pytest
import torch

from llama_fast.formats.gguf import GGUFError, read_gguf
from llama_fast.quant import QuantizedWeight

import gguf_util as G


@pytest.fixture(scope="module")
def tiny():
    config = G.tiny_config()
    return config, G.random_state_dict(config)


def write(tmp_path, config, sd, types=None, name="m.gguf", **kwargs):
    path = tmp_path / name
    G.write_llama_gguf(path, config, sd, types, **kwargs)
    return path


def test_f32_file_gives_back_the_hf_weights_exactly(tmp_path, tiny):
    config, sd = tiny
    got_config, tensors = read_gguf(write(tmp_path, config, sd))
    tensors = dict(tensors)
    assert set(tensors) == set(sd)
    for name, value in tensors.items():
        # q_proj / k_proj were permuted on the way in; equality means the permutation was undone.
        assert torch.equal(value, torch.from_numpy(sd[name])), name
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rope_theta", "bos_token_id", "eos_token_id",
                "tie_word_embeddings"):
        assert got_config[key] == config[key], key
    assert got_config["head_dim"] == 16 and got_config["rope_scaling"] is None
    assert got_config["rms_norm_eps"] == pytest.approx(config["rms_norm_eps"])


@pytest.mark.parametrize("gqa", [(4, 4), (4, 1), (8, 2)])
def test_unpermute_for_each_head_layout(tmp_path, gqa):
    heads, kv_heads = gqa
    config = G.tiny_config(num_attention_heads=heads, num_key_value_heads=kv_heads, num_hidden_layers=1)
    sd = G.random_state_dict(config, seed=heads * 10 + kv_heads)
    _, tensors = read_gguf(write(tmp_path, config, sd))
    tensors = dict(tensors)
    for proj in ("q_proj", "k_proj"):
        name = f"model.layers.0.self_attn.{proj}.weight"
        assert torch.equal(tensors[name], torch.from_numpy(sd[name]))


def test_f16_bf16_tensors_and_requested_dtype(tmp_path, tiny):
    config, sd = tiny
    types = {"model.layers.0.mlp.up_proj.weight": G.Q.F16, "model.layers.1.self_attn.q_proj.weight": G.Q.BF16}
    _, tensors = read_gguf(write(tmp_path, config, sd, types))
    tensors = dict(tensors)
    up = tensors["model.layers.0.mlp.up_proj.weight"]
    assert up.dtype == torch.float32
    assert torch.equal(up, torch.from_numpy(sd["model.layers.0.mlp.up_proj.weight"]).half().float())
    q = tensors["model.layers.1.self_attn.q_proj.weight"]
    expected = gguf.quants.dequantize(gguf.quants.quantize(sd["model.layers.1.self_attn.q_proj.weight"],
                                                           G.Q.BF16), G.Q.BF16)
    assert torch.equal(q, torch.from_numpy(expected))
    _, as_bf16 = read_gguf(tmp_path / "m.gguf", dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for _, v in as_bf16)


@pytest.mark.parametrize("qtype,bits,has_offset", [(G.Q.Q4_0, 4, True), (G.Q.Q4_1, 4, True),
                                                    (G.Q.Q8_0, 8, False)])
def test_quantized_tensors_load_natively_and_bit_exact(tmp_path, tiny, qtype, bits, has_offset):
    config, sd = tiny
    linear = [n for n in sd if n.endswith("proj.weight")] + ["lm_head.weight"]
    types = {n: qtype for n in linear}
    types["model.embed_tokens.weight"] = qtype
    path = write(tmp_path, config, sd, types)
    _, native = read_gguf(path)
    native = dict(native)
    _, dense = read_gguf(path, dequantize=True)
    dense = dict(dense)
    reader = gguf.GGUFReader(str(path))
    raw = {t.name: t for t in reader.tensors}
    for name in linear:
        qw = native[name]
        assert isinstance(qw, QuantizedWeight), name
        assert (qw.bits, qw.group_size, qw.offset is not None) == (bits, 32, has_offset)
        assert qw.scale.dtype == torch.float16  # GGUF's own fp16 block scales, unrounded
        t = raw[G.gguf_name(name)]
        theirs = gguf.quants.dequantize(t.data, t.tensor_type)
        if "q_proj" in name or "k_proj" in name:
            theirs = G.permute_back(theirs, config["num_attention_heads" if "q_proj" in name
                                                  else "num_key_value_heads"])
        assert torch.equal(qw.dequantize(torch.float32), torch.from_numpy(theirs)), name
        assert torch.equal(dense[name], torch.from_numpy(theirs)), name
        # and it is the right weight: within the quantization error of the original
        assert np.abs(theirs - sd[name]).max() < 0.1
    # The embedding table stays native too (its lookup dequantizes rows: llama_fast.embedding), dense with
    # dequantize=True; both the same numbers as the file.
    t = raw["token_embd.weight"]
    theirs = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type))
    embed = native["model.embed_tokens.weight"]
    assert isinstance(embed, QuantizedWeight) and torch.equal(embed.dequantize(torch.float32), theirs)
    assert torch.equal(dense["model.embed_tokens.weight"], theirs)


def test_q4_0_with_huge_scales_stays_exact(tmp_path):
    """-8 * d overflows fp16 for d > 8188; the loader then keeps scale and offset in fp32."""
    config = G.tiny_config(num_hidden_layers=1)
    sd = G.random_state_dict(config)
    sd["model.layers.0.mlp.up_proj.weight"][3, :32] *= 1e6
    name = "model.layers.0.mlp.up_proj.weight"
    path = write(tmp_path, config, sd, {name: G.Q.Q4_0})
    qw = dict(read_gguf(path)[1])[name]
    assert qw.scale.dtype == torch.float32
    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.0.ffn_up.weight")
    assert torch.equal(qw.dequantize(torch.float32), torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)))


def test_tied_embeddings_and_rope_scaling_in_config(tmp_path):
    config = G.tiny_config(tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 4.0})
    sd = G.random_state_dict(config)
    got, tensors = read_gguf(write(tmp_path, config, sd))   # an F32 table: lm_head is tied to it, not stored
    assert got["tie_word_embeddings"] is True and "lm_head.weight" not in dict(tensors)
    assert got["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


@pytest.mark.parametrize("qtype", [G.Q.Q8_0, G.Q.Q4_1])
def test_tied_quantized_table_gives_a_native_lm_head(tmp_path, qtype):
    """A tied model with a quantized token_embd (SmolLM2's GGUF: Q8_0): lm_head multiplies by the native
    blocks, as llama.cpp does, and the lookup reads the same tensors (one copy of the table); both hold the
    file's numbers. dequantize=True ties lm_head to the dense table instead."""
    import llama_fast
    config = G.tiny_config(tie_word_embeddings=True)
    sd = G.random_state_dict(config)
    path = write(tmp_path, config, sd, {"model.embed_tokens.weight": qtype})
    tensors = dict(read_gguf(path)[1])
    head, native_embed = tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]
    assert head is native_embed and isinstance(head, QuantizedWeight)
    dequantized = dict(read_gguf(path, dequantize=True)[1])
    assert "lm_head.weight" not in dequantized
    embed = dequantized["model.embed_tokens.weight"]
    assert torch.equal(head.dequantize(torch.float32), embed)
    model = llama_fast.LlamaForCausalLM.from_pretrained(str(path), dtype="float32")
    assert model.lm_head.quantized and model.lm_head.bits == (8 if qtype == G.Q.Q8_0 else 4)
    table = model.model.embed_tokens
    assert table.native and table.weight is None
    assert table.qweight.data_ptr() == model.lm_head.qweight.data_ptr()    # one copy for both
    # exact by construction: each row is dequantized by the same per-row formula as the whole table
    assert torch.equal(table.dequantized(), embed)
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.inference_mode():
        logits = model(ids).logits
    dense_head = torch.nn.functional.linear(model.model(ids).last_hidden_state, embed)
    torch.testing.assert_close(logits, dense_head, rtol=1e-5, atol=1e-5 * dense_head.abs().max().item())
    # saved and loaded back: still the native head, same logits
    model.save_pretrained(tmp_path / "saved")
    again = llama_fast.LlamaForCausalLM.from_pretrained(str(tmp_path / "saved"), dtype="float32")
    assert again.lm_head.quantized    # the table saved once, as the embedding's; the head shares it again
    assert again.model.embed_tokens.native
    assert again.model.embed_tokens.qweight.data_ptr() == again.lm_head.qweight.data_ptr()
    with torch.inference_mode():
        assert torch.equal(again(ids).logits, logits)


def test_defaults_when_optional_keys_are_missing(tmp_path, tiny):
    config, sd = tiny
    got, _ = read_gguf(write(tmp_path, config, sd, skip_keys=("head_count_kv", "vocab_size", "bos", "eos")))
    assert got["num_key_value_heads"] == got["num_attention_heads"] == 4
    assert got["vocab_size"] == 96  # from token_embd's shape
    assert "bos_token_id" not in got


# --- bad files -------------------------------------------------------------------------------------------

def test_unsupported_tensor_type_names_the_tensor(tmp_path, tiny):
    config, sd = tiny
    name = "model.layers.1.mlp.down_proj.weight"
    rows, cols = sd[name].shape   # IQ4_NL (block 32, 18 bytes) has no quantizer in gguf: random raw blocks
    raw = np.random.default_rng(0).integers(0, 256, (rows, cols // 32 * 18), dtype=np.uint8)
    path = write(tmp_path, config, {**sd, name: raw}, {name: G.Q.IQ4_NL})
    _, tensors = read_gguf(path)
    with pytest.raises(GGUFError, match=r"m.gguf: tensor blk.1.ffn_down.weight has type IQ4_NL; supported types "
                                         r"are F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, "
                                         r"Q5_0, Q5_1"):
        dict(tensors)


def test_non_llama_architecture(tmp_path, tiny):
    config, sd = tiny
    with pytest.raises(GGUFError, match="m.gguf: general.architecture is 'gpt2'; only 'llama'"):
        read_gguf(write(tmp_path, config, sd, arch="gpt2"))


def test_missing_required_metadata(tmp_path, tiny):
    config, sd = tiny
    with pytest.raises(GGUFError, match="m.gguf: metadata key llama.block_count is missing"):
        read_gguf(write(tmp_path, config, sd, skip_keys=("block_count",)))


def test_unknown_tensor_name(tmp_path, tiny):
    config, sd = tiny
    path = tmp_path / "extra.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("block_count", 1), ("embedding_length", 64), ("feed_forward_length", 128),
                       ("head_count", 4), ("vocab_size", 96)):
        getattr(w, f"add_{key}")(value)
    w.add_tensor("blk.0.attn_qkv_magic.weight", np.zeros((4, 64), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(GGUFError, match="extra.gguf: tensor blk.0.attn_qkv_magic.weight is not part of a Llama"):
        dict(read_gguf(path)[1])


@pytest.mark.parametrize("keep", [0.5, 0.99, 40, 3])
def test_truncated_file(tmp_path, tiny, keep):
    config, sd = tiny
    data = write(tmp_path, config, sd, {"model.layers.1.mlp.up_proj.weight": G.Q.Q4_1}).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(GGUFError, match="cut.gguf: .*(truncated|corrupt)"):
        read_gguf(cut)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "weights.gguf"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(GGUFError, match="weights.gguf: not a readable GGUF file.*magic"):
        read_gguf(bad)
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        read_gguf(tmp_path / "nope.gguf")


def test_rope_freqs_of_the_wrong_size_is_named(tmp_path, tiny):
    config, sd = tiny   # head_dim 16: 8 factors expected
    path = write(tmp_path, config, {**sd, "rope_freqs.weight": np.ones(5, np.float32)})
    with pytest.raises(GGUFError, match="m.gguf: rope_freqs.weight must be F32 with head_dim / 2 = 8 values"):
        read_gguf(path)
