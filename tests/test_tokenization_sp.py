"""LlamaTokenizer / LlamaTokenizerFast on a sentencepiece BPE model trained here, against transformers."""
import json
import os

import pytest

from llama_fast import AutoTokenizer, LlamaTokenizer, LlamaTokenizerFast

from _tokenizer_corpus import TRICKY_STRINGS, train_sentencepiece, with_special_tokens

spm = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")

@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    train_sentencepiece(str(d))
    return d


def _write_config(d, **config):
    base = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "add_bos_token": True, "add_eos_token": False}
    (d / "tokenizer_config.json").write_text(json.dumps({**base, **config}))


def _assert_same(ours, ref, strings):
    for s in strings:
        ids = ours.encode(s)
        assert ids == ref.encode(s), f"ids differ for {s!r}"
        assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), s


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("add_eos", [False, True])
def test_ids_and_text_match_transformers(sp_dir, legacy, add_eos):
    _write_config(sp_dir, legacy=legacy, add_eos_token=add_eos)
    ref = transformers.AutoTokenizer.from_pretrained(sp_dir)
    ours = AutoTokenizer.from_pretrained(sp_dir)
    assert isinstance(ours, LlamaTokenizer)
    _assert_same(ours, ref, TRICKY_STRINGS + with_special_tokens(["<s>", "</s>"]))


def test_legacy_changes_text_after_special_tokens(sp_dir):
    _write_config(sp_dir, legacy=True)
    legacy = AutoTokenizer.from_pretrained(sp_dir)
    _write_config(sp_dir, legacy=False)
    modern = AutoTokenizer.from_pretrained(sp_dir)
    assert legacy.tokenize("</s>Hello")[1].startswith("▁")
    assert not modern.tokenize("</s>Hello")[1].startswith("▁")


def test_first_token_prefix_space_quirk(sp_dir):
    """The seeds: decoding a sequence that starts with a word adds no leading space."""
    _write_config(sp_dir)
    tok = AutoTokenizer.from_pretrained(sp_dir)
    (banana,) = tok.encode("Banana", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(banana) == "▁Banana"
    assert tok.decode([banana]) == "Banana"
    assert tok.decode(tok.encode("Hello world", add_special_tokens=False)[::-1]) == "world Hello"


def test_byte_fallback_roundtrip(sp_dir):
    _write_config(sp_dir)
    tok = AutoTokenizer.from_pretrained(sp_dir)
    text = "ünïcödé ∑ 🦙 \x01"
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text


def test_fast_tokenizer_from_saved_tokenizer_json_matches(sp_dir, tmp_path):
    """transformers saves a tokenizer.json for the same model; our fast tokenizer reads it to the same ids."""
    _write_config(sp_dir, legacy=False)
    ref = transformers.AutoTokenizer.from_pretrained(sp_dir)
    ref.save_pretrained(tmp_path)
    if (tmp_path / "tokenizer.model").exists():  # make sure tokenizer.json alone is read
        os.remove(tmp_path / "tokenizer.model")
    ours = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(ours, LlamaTokenizerFast)
    _assert_same(ours, ref, TRICKY_STRINGS + with_special_tokens(["<s>", "</s>"]))


def test_save_pretrained_roundtrip(sp_dir, tmp_path):
    _write_config(sp_dir, legacy=False, add_eos_token=True)
    tok = AutoTokenizer.from_pretrained(sp_dir, pad_token="</s>")
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for s in TRICKY_STRINGS:
        assert again.encode(s) == tok.encode(s) == ref.encode(s)
    assert again.pad_token == "</s>" and again.add_eos_token


def test_sentencepiece_processor_available(sp_dir):
    _write_config(sp_dir)
    tok = AutoTokenizer.from_pretrained(sp_dir)
    assert tok.sp_model.encode("Banana") == tok.encode("Banana", add_special_tokens=False)


def test_corrupt_model_file_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\xff\xff\xff")
    with pytest.raises(ValueError, match="sentencepiece"):
        AutoTokenizer.from_pretrained(tmp_path)


def test_added_pad_token_past_the_vocab_survives_saving(sp_dir, tmp_path):
    """The seeds' advice: add a <pad> token (a new id past the sentencepiece vocabulary)."""
    _write_config(sp_dir)
    tok = AutoTokenizer.from_pretrained(sp_dir)
    assert tok.add_special_tokens({"pad_token": "<pad>"}) == 1
    assert tok.pad_token_id == 500 and len(tok) == 501
    assert tok(["Banana", "Hello world"], padding=True)["input_ids"][0][0] == 500
    assert tok.decode([500] + tok.encode("Banana", add_special_tokens=False), skip_special_tokens=True) == "Banana"
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.pad_token_id == 500 and again.encode("<pad>Banana") == tok.encode("<pad>Banana")
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert ref.pad_token_id == 500 and ref.encode("<pad>Banana") == again.encode("<pad>Banana")
