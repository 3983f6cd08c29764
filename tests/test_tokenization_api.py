"""The transformers-style front end: padding, truncation, tensors, pad-token handling, chat templates,
errors. Uses a tiny tokenizer.json built here, so it runs without any model file."""
import json

import pytest
import torch

from llama_fast import AutoTokenizer
from llama_fast.tokenization.chat_template import TemplateError


@pytest.fixture
def tok_dir(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>", "hello", "world", "a", "b", "c", "Ġ"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": {"content": "</s>", "__type": "AddedToken"}, "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False,
        "chat_template": "{% for m in messages %}<s>{{ m['role'] }} {{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant{% endif %}"}))
    return tmp_path


def test_bos_added_and_no_pad_by_default(tok_dir):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert tok.encode("hello world") == [1, 3, 4]
    assert tok.encode("hello world", add_special_tokens=False) == [3, 4]
    assert tok.pad_token is None and tok.pad_token_id is None
    with pytest.raises(ValueError, match="padding token"):
        tok(["hello", "hello world"], padding=True)


def test_left_padding_attention_mask_and_tensors(tok_dir):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.pad_token = tok.eos_token
    batch = tok(["hello", "hello world a"], padding=True, return_tensors="pt")
    assert batch.input_ids.tolist() == [[2, 2, 1, 3], [1, 3, 4, 5]]
    assert batch.attention_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    right = tok(["hello", "hello world a"], padding=True, padding_side="right")
    assert right["input_ids"][0] == [1, 3, 2, 2]
    single = tok("hello", return_tensors="pt")
    assert single["input_ids"].shape == (1, 2) and single["input_ids"].dtype == torch.long
    with pytest.raises(ValueError, match="padding=True"):
        tok(["hello", "hello world"], return_tensors="pt")


def test_truncation_and_max_length_padding(tok_dir):
    tok = AutoTokenizer.from_pretrained(tok_dir, pad_token="</s>")
    assert tok("hello world a b c", truncation=True, max_length=3)["input_ids"] == [1, 3, 4]
    out = tok(["a", "a b"], padding="max_length", max_length=5)
    assert out["input_ids"] == [[2, 2, 2, 1, 5], [2, 2, 1, 5, 6]]
    assert tok(["a b c"], padding=True, pad_to_multiple_of=8)["attention_mask"][0] == [0, 0, 0, 0, 1, 1, 1, 1]


def test_decode_variants(tok_dir):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    ids = tok("hello world", return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == "<s> hello world"
    assert tok.decode(ids[0], skip_special_tokens=True) == "hello world"
    assert tok.batch_decode(ids, skip_special_tokens=True) == ["hello world"]
    assert tok.decode(3) == "hello"
    assert tok.convert_tokens_to_ids(["hello", "nope"]) == [3, 0]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([3, 99])


def test_chat_template(tok_dir):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    chat = [{"role": "user", "content": "hello"}]
    assert tok.apply_chat_template(chat, tokenize=False) == "<s>user hello</s>"
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True).endswith("<s>assistant")
    ids = tok.apply_chat_template(chat, return_tensors="pt", return_dict=False)
    assert ids.tolist() == [[1, 0, 3, 2]]  # "user" is unknown here; no extra BOS
    batch = tok.apply_chat_template([chat, chat + chat], tokenize=False)
    assert len(batch) == 2
    with pytest.raises(TemplateError, match="boom"):
        tok.apply_chat_template(chat, chat_template="{{ raise_exception('boom') }}")
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(chat)


def test_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        AutoTokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        AutoTokenizer.from_pretrained(tmp_path / "nope")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        AutoTokenizer.from_pretrained(tmp_path)


def test_bad_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(ValueError, match="GGUF"):
        AutoTokenizer.from_pretrained(bad)


def test_unsupported_options_are_errors_not_ignored(tok_dir):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert tok("hello", return_token_type_ids=False, verbose=False)["input_ids"] == [1, 3]
    with pytest.raises(ValueError, match="return_offsets_mapping"):
        tok("hello", return_offsets_mapping=True)
    with pytest.raises(TypeError, match="bogus"):
        tok("hello", bogus=1)
