"""Issue 17's catalogue of malformed files, one regression test each: every one must end in a clear
ValueError-family error (naming the problem), quickly and without allocating from the bad numbers; never a
hang, a silently different model, or a path outside the model directory."""
import json
import math
import os
import struct

import numpy as np
import pytest
import torch
from sentencepiece_util import model_bytes, varint

from llama_fast import LlamaConfig, LlamaForCausalLM
from llama_fast.formats.gguf import GGUFError
from llama_fast.formats.gguf_reader import GGUFFormatError, GGUFReader
from llama_fast.formats.safetensors import SafetensorsError, SafetensorsFile
from llama_fast.loading import CheckpointError
from llama_fast.tokenization.gguf import tokenizer_from_gguf
from llama_fast.tokenization.sentencepiece_model import parse_sentencepiece_model

import gguf_util as G

CONFIG = G.tiny_config()


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory):
    """A valid tiny GGUF (F32, Q8_0 and Q4_0 tensors) as bytes."""
    path = tmp_path_factory.mktemp("gguf") / "m.gguf"
    sd = G.random_state_dict(CONFIG)
    types = {"model.layers.0.mlp.up_proj.weight": G.Q.Q8_0, "model.layers.1.mlp.down_proj.weight": G.Q.Q4_0}
    G.write_llama_gguf(path, CONFIG, sd, types)
    return path.read_bytes()


def _tokenized_gguf(tmp_path, tokens=None):
    """A tiny GGUF with a byte-level vocabulary (for the tokenizer path)."""
    import gguf
    path = tmp_path / "tok.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens or ["a", "b", "ab", "Ġ"])
    w.add_token_merges(["a b"])
    w.add_token_types([1, 1, 1, 1])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _load(tmp_path, raw: bytes):
    path = tmp_path / "bad.gguf"
    path.write_bytes(raw)
    return LlamaForCausalLM.from_pretrained(path)


# ---- GGUF ---------------------------------------------------------------------------------------------

def test_valid_gguf_header_matches_the_gguf_package(gguf_bytes, tmp_path):
    import gguf
    path = tmp_path / "ok.gguf"
    path.write_bytes(gguf_bytes)
    ours, theirs = GGUFReader(path), gguf.GGUFReader(path, "r")
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.offset, a.n_bytes, a.dims, a.type_name) == (
            b.data_offset, b.n_bytes, tuple(b.shape.tolist()), b.tensor_type.name)
        assert np.array_equal(ours.read_tensor(a), np.asarray(b.data).reshape(-1).view(np.uint8))
    for key, field in theirs.fields.items():
        if not key.startswith("GGUF."):
            assert ours.get(key) == field.contents(), key


def test_vocabulary_only_gguf_reads(tmp_path):
    """A GGUF with metadata and no tensors (llama.cpp's vocab files) is valid."""
    reader = GGUFReader(_tokenized_gguf(tmp_path))
    assert reader.tensors == [] and reader.get("tokenizer.ggml.tokens") == ["a", "b", "ab", "Ġ"]
    tokenizer, _ = tokenizer_from_gguf(str(tmp_path / "tok.gguf"))
    assert tokenizer.get_vocab_size() == 4


def test_array_claiming_2_40_items_fails_at_once(tmp_path):
    """Was: the gguf package's reader kept reading zero-byte items, RSS grew to 13 GiB (from_pretrained,
    the GGUF tokenizer and the CLI all went through it)."""
    raw = _tokenized_gguf(tmp_path).read_bytes()
    at = G.kv_value_offset(raw, "tokenizer.ggml.tokens") + 4 + 4    # value type, element type, then count
    bad = tmp_path / "huge.gguf"
    bad.write_bytes(G.patch(raw, at, 2 ** 40, 8))
    with pytest.raises(GGUFFormatError, match=r"claims 1099511627776 strings"):
        GGUFReader(bad)
    with pytest.raises(ValueError, match=r"claims 1099511627776 strings"):
        tokenizer_from_gguf(str(bad))
    with pytest.raises(GGUFError, match=r"claims 1099511627776 strings"):
        LlamaForCausalLM.from_pretrained(bad)


@pytest.mark.parametrize("item_type, size", [(4, 4), (12, 8), (9, 12)])
def test_numeric_and_nested_arrays_bounded_by_the_bytes_left(tmp_path, item_type, size):
    raw = _tokenized_gguf(tmp_path).read_bytes()
    at = G.kv_value_offset(raw, "tokenizer.ggml.token_type") + 4
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(G.patch(G.patch(raw, at, item_type, 4), at + 4, 2 ** 60, 8))
    with pytest.raises(GGUFFormatError, match="claims 1152921504606846976"):
        GGUFReader(bad)


def test_string_of_2_31_bytes_is_refused(tmp_path):
    raw = _tokenized_gguf(tmp_path).read_bytes()
    at = G.kv_value_offset(raw, "tokenizer.ggml.model") + 4
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(G.patch(raw, at, 2 ** 31, 8))
    with pytest.raises(GGUFFormatError, match="needs 2147483648 bytes"):
        GGUFReader(bad)


def test_block_count_must_match_the_layers_present(tmp_path, gguf_bytes):
    at = G.kv_value_offset(gguf_bytes, "llama.block_count") + 4
    with pytest.raises(GGUFError, match=r"block_count must be an integer in \[1, 2147483647\], got 4294967295"):
        _load(tmp_path, G.patch(gguf_bytes, at, 2 ** 32 - 1, 4))
    with pytest.raises(GGUFError, match=r"block_count is 3 but the file's layers are blk.0..blk.1"):
        _load(tmp_path, G.patch(gguf_bytes, at, 3, 4))


@pytest.mark.parametrize("key, value, message", [
    ("llama.attention.head_count", 0, r"head_count must be an integer in \[1,"),
    ("llama.embedding_length", 0, r"embedding_length must be an integer in \[1,"),
])
def test_zero_sizes_are_clear_errors(tmp_path, gguf_bytes, key, value, message):
    """Was: ZeroDivisionError for head_count 0."""
    at = G.kv_value_offset(gguf_bytes, key) + 4
    with pytest.raises(GGUFError, match=message):
        _load(tmp_path, G.patch(gguf_bytes, at, value, 4))


def test_vocab_2_63_is_refused(tmp_path):
    import gguf
    path = tmp_path / "vocab.gguf"
    G.write_llama_gguf(path, CONFIG, G.random_state_dict(CONFIG), skip_keys=("vocab_size",),
                       extra_kv={"llama.vocab_size": (2 ** 63, gguf.GGUFValueType.UINT64)})
    with pytest.raises(GGUFError, match=r"vocab_size must be an integer in \[1, 2147483647\], got 9223372036854775808"):
        LlamaForCausalLM.from_pretrained(path)


def test_non_finite_rope_theta_and_eps_are_refused(tmp_path, gguf_bytes):
    for key in ("llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon"):
        at = G.kv_value_offset(gguf_bytes, key) + 4
        with pytest.raises(GGUFError, match=f"{key} must be a finite number, got nan"):
            _load(tmp_path, gguf_bytes[:at] + struct.pack("<f", math.nan) + gguf_bytes[at + 4:])


def _first_two_tensors(raw):
    return [G.tensor_info_offsets(raw, n) for n in ("token_embd.weight", "output_norm.weight")]


@pytest.mark.parametrize("how", ["other_tensor", "overlap", "misaligned", "wrap"])
def test_tensor_offsets_must_tile_the_data_section(tmp_path, gguf_bytes, how):
    """Was: only "ends inside the file" was checked, so these loaded and gave garbage."""
    infos = _first_two_tensors(gguf_bytes)
    second = infos[1]["offset"]
    old = int.from_bytes(gguf_bytes[second:second + 8], "little")
    new = {"other_tensor": 0, "overlap": old - 32, "misaligned": old + 4, "wrap": 2 ** 64 - 32}[how]
    with pytest.raises(GGUFError, match=rf"tensor output_norm.weight has offset {new}, expected {old}"):
        _load(tmp_path, G.patch(gguf_bytes, second, new, 8))


@pytest.mark.parametrize("new_type", [1, 2, 8, 30])   # F16, Q4_0, Q8_0, BF16
def test_changed_tensor_type_is_refused(tmp_path, gguf_bytes, new_type):
    info = G.tensor_info_offsets(gguf_bytes, "token_embd.weight")   # F32 [96, 64]
    with pytest.raises(GGUFError, match="(offset|after the last tensor|belong to no tensor)"):
        _load(tmp_path, G.patch(gguf_bytes, info["type"], new_type, 4))


def test_unknown_tensor_type_is_refused(tmp_path, gguf_bytes):
    info = G.tensor_info_offsets(gguf_bytes, "token_embd.weight")
    with pytest.raises(GGUFError, match="unknown type 1000"):
        _load(tmp_path, G.patch(gguf_bytes, info["type"], 1000, 4))


def test_five_dim_tensor_and_zero_rows_are_refused(tmp_path, gguf_bytes):
    info = G.tensor_info_offsets(gguf_bytes, "token_embd.weight")
    with pytest.raises(GGUFError, match=r"has 5 dims \(1 to 4 allowed\)"):
        _load(tmp_path, G.patch(gguf_bytes, info["n_dims"], 5, 4))
    q = G.tensor_info_offsets(gguf_bytes, "blk.0.ffn_up.weight")      # Q8_0
    with pytest.raises(GGUFError, match=r"has dims \[64, 0\]"):
        _load(tmp_path, G.patch(gguf_bytes, q["dims"] + 8, 0, 8))


def test_row_not_a_whole_number_of_blocks(tmp_path, gguf_bytes):
    q = G.tensor_info_offsets(gguf_bytes, "blk.0.ffn_up.weight")
    with pytest.raises(GGUFError, match="not a multiple of its block size 32"):
        _load(tmp_path, G.patch(gguf_bytes, q["dims"], 48, 8))


def test_trailing_garbage_after_the_last_tensor(tmp_path, gguf_bytes):
    with pytest.raises(GGUFError, match="belong to no tensor"):
        _load(tmp_path, gguf_bytes + b"\0" * 64)


# ---- safetensors ----------------------------------------------------------------------------------------

def _safetensors(path, header: dict, data: bytes):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_overlapping_data_offsets_are_refused(tmp_path):
    """Was accepted: two tensors sharing bytes."""
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    with pytest.raises(SafetensorsError, match="tensor 'b' starts at byte 4 of the data, expected 8.*overlaps"):
        SafetensorsFile(_safetensors(tmp_path / "x.safetensors", header, b"\0" * 12))
    header["b"]["data_offsets"] = [12, 20]
    with pytest.raises(SafetensorsError, match="leaves a gap"):
        SafetensorsFile(_safetensors(tmp_path / "x.safetensors", header, b"\0" * 20))


def test_header_nested_100k_deep_is_a_clear_error(tmp_path):
    """Was: RecursionError."""
    raw = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(SafetensorsError, match="nested deeper than 3"):
        SafetensorsFile(path)


@pytest.mark.parametrize("info", [
    [1, 2], {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]},
    {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}, {"dtype": "F32", "shape": [2], "data_offsets": [0]},
    {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]},
    {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}, {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]},
])
def test_entries_of_the_wrong_json_type(tmp_path, info):
    with pytest.raises(SafetensorsError, match="corrupt safetensors header entry for tensor 'a'"):
        SafetensorsFile(_safetensors(tmp_path / "x.safetensors", {"a": info}, b"\0" * 8))


def test_size_must_be_shape_times_dtype(tmp_path):
    header = {"a": {"dtype": "F16", "shape": [3], "data_offsets": [0, 8]}}
    with pytest.raises(SafetensorsError, match=r"8 bytes of data for shape \[3\] F16 \(needs 6\)"):
        SafetensorsFile(_safetensors(tmp_path / "x.safetensors", header, b"\0" * 8))


def test_errors_never_print_the_file_contents(tmp_path):
    secret = tmp_path / "model.safetensors"
    secret.write_bytes(b"SECRET!!" + b"x" * 100)
    with pytest.raises(SafetensorsError) as info:
        SafetensorsFile(secret)
    assert str(int.from_bytes(b"SECRET!!", "little")) not in str(info.value) and "SECRET" not in str(info.value)


@pytest.fixture
def model_dir(tmp_path):
    config = LlamaConfig(**CONFIG)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    directory = tmp_path / "model"
    model.save_pretrained(directory, max_shard_size=30_000)     # sharded: an index and several files
    assert (directory / "model.safetensors.index.json").exists()
    return directory


def _edit_index(directory, edit):
    path = directory / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    edit(index)
    path.write_text(json.dumps(index))


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_index_paths_never_leave_the_model_directory(tmp_path, model_dir, how):
    """Was: followed, and the first 8 bytes of the named file were printed in the error."""
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"SECRET!!" + b"x" * 64)
    first = sorted(p.name for p in model_dir.glob("model-*.safetensors"))[0]
    if how == "symlink":
        os.remove(model_dir / first)
        os.symlink(outside, model_dir / first)
    else:
        target = str(outside) if how == "absolute" else "../outside.safetensors"
        _edit_index(model_dir, lambda index: index["weight_map"].update(
            {k: target for k, v in index["weight_map"].items() if v == first}))
    with pytest.raises(ValueError, match="(not a plain relative name|resolves outside)") as info:
        LlamaForCausalLM.from_pretrained(model_dir)
    assert "SECRET" not in str(info.value) and str(int.from_bytes(b"SECRET!!", "little")) not in str(info.value)


def test_single_weights_file_symlinked_out_is_refused(tmp_path):
    config = LlamaConfig(**CONFIG)
    directory = tmp_path / "model"
    LlamaForCausalLM(config).save_pretrained(directory)
    moved = tmp_path / "elsewhere.safetensors"
    os.replace(directory / "model.safetensors", moved)
    os.symlink(moved, directory / "model.safetensors")
    with pytest.raises(ValueError, match="resolves outside the model directory"):
        LlamaForCausalLM.from_pretrained(directory)


def test_hf_cache_layout_symlinks_into_blobs_still_load(tmp_path):
    """huggingface_hub's cache: snapshots/<rev>/file -> ../../blobs/<hash>; must keep working."""
    config = LlamaConfig(**CONFIG)
    plain = tmp_path / "plain"
    LlamaForCausalLM(config).save_pretrained(plain)
    repo = tmp_path / "models--x--y"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(os.listdir(plain))):
        os.replace(plain / f, repo / "blobs" / f"blob{i}")
        os.symlink(f"../../blobs/blob{i}", snapshot / f)
    assert LlamaForCausalLM.from_pretrained(snapshot).config.num_hidden_layers == 2


@pytest.mark.parametrize("weight_map", [[1, 2], {"a": 3}, "x"])
def test_weight_map_of_the_wrong_type(model_dir, weight_map):
    """Was: AttributeError / TypeError."""
    _edit_index(model_dir, lambda index: index.update(weight_map=weight_map))
    with pytest.raises(CheckpointError, match="'weight_map' must be an object mapping tensor names to file names"):
        LlamaForCausalLM.from_pretrained(model_dir)


# ---- config.json ----------------------------------------------------------------------------------------

def _edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("changes, message", [
    ({"rope_theta": math.nan}, "rope_theta must be a finite positive number"),
    ({"rope_theta": math.inf}, "rope_theta must be a finite positive number"),
    ({"rms_norm_eps": math.nan}, "rms_norm_eps must be a finite non-negative number"),
    ({"rope_scaling": {"rope_type": "linear", "factor": math.nan}}, "rope_scaling factor must be finite"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": math.nan, "high_freq_factor": 4.0}},
     "rope_scaling low_freq_factor must be finite"),
    ({"head_dim": 0}, "head_dim must be a positive integer"),
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer"),
    ({"vocab_size": 2 ** 63}, "vocab_size must be a positive integer up to 2147483647"),
    ({"num_hidden_layers": 10 ** 9}, "num_hidden_layers must be a positive integer up to 65536"),
    ({"num_hidden_layers": 3}, r"num_hidden_layers=3 but the checkpoint's layers are 0..1"),
    ({"quantization_config": [1]}, "quantization_config must be an object"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
    ({"pad_token_id": {"a": 1}}, "pad_token_id must be an integer or null"),
    ({"eos_token_id": [2, True]}, "eos_token_id must be an int or a list of ints"),
    # Found by the fuzzer: a tied config over a checkpoint whose lm_head differs loaded a different model.
    ({"tie_word_embeddings": True}, "tie_word_embeddings=true but the checkpoint's lm_head.weight differs"),
])
def test_config_values_out_of_range(model_dir, changes, message):
    if "rope_parameters" in json.loads((model_dir / "config.json").read_text()) and (
            "rope_theta" in changes or "rope_scaling" in changes):
        _edit_config(model_dir, rope_parameters=None)
    _edit_config(model_dir, **changes)
    with pytest.raises(ValueError, match=message):
        LlamaForCausalLM.from_pretrained(model_dir)


def test_config_nested_too_deep(model_dir):
    (model_dir / "config.json").write_text('{"x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ValueError, match="nested too deeply"):
        LlamaForCausalLM.from_pretrained(model_dir)


# ---- tokenizer.model ------------------------------------------------------------------------------------

def _sp_model(pieces=(("a", -1.0), ("b", -2.0)), model_type: int = 2) -> bytes:
    return model_bytes([(text, score, 1) for text, score in pieces], model_type)


def test_sentencepiece_model_parses():
    model = parse_sentencepiece_model(_sp_model())
    assert model.model_type == "bpe" and [p[0] for p in model.pieces] == ["a", "b"]


def test_piece_text_as_a_2_31_varint_allocates_nothing():
    """Was: bytes(2**31) — a ~100-byte file allocated 2 GiB."""
    piece = b"\x08" + varint(2 ** 31)             # field 1 with wire type 0 (a varint), not a string
    data = b"\x0a" + varint(len(piece)) + piece + _sp_model()
    with pytest.raises(ValueError, match="piece text has the wrong protobuf wire type"):
        parse_sentencepiece_model(data)


def test_length_past_the_end_is_refused():
    with pytest.raises(ValueError, match="truncated field: 2147483648 bytes claimed"):
        parse_sentencepiece_model(b"\x0a" + varint(2 ** 31) + b"\0" * 90)


def test_truncated_model_is_an_error_not_a_unigram_model():
    """Was: cut after the pieces, it loaded with the default model type (unigram) instead of bpe."""
    full = _sp_model()
    cut = full[:full.index(b"\x12")]
    with pytest.raises(ValueError, match="no trainer_spec or normalizer_spec"):
        parse_sentencepiece_model(cut)


@pytest.mark.parametrize("data", [b"\x0a\x02\x10\x05", b"\x12\x02\x1a\x00", b"\x08\x01"])
def test_odd_field_types(data):
    with pytest.raises(ValueError, match="not a valid sentencepiece model"):
        parse_sentencepiece_model(data + _sp_model())


@pytest.mark.parametrize("group_size", [0, -5, 2.5, True])
def test_group_size_must_be_positive(model_dir, group_size):
    """Was: ZeroDivisionError for group_size=0."""
    with pytest.raises(ValueError, match="group_size must be a positive integer"):
        LlamaForCausalLM.from_pretrained(model_dir, quantize="int4", group_size=group_size)
