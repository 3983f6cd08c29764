"""Streamers: the text pieces join to the decoded new tokens, in a thread (iterator) and printed."""
import threading

import pytest
import torch

import llama_fast
from llama_fast.streamers import TextIteratorStreamer, TextStreamer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # Byte-level pieces so streaming meets words split over tokens, spaces and multi-byte characters.
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(40)] + ["Ġ", "Ċ", "Ġw", "ðŁ", "ĺ", "Ģ"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.decoder = decoders.ByteLevel()
    path = tmp_path_factory.mktemp("tok")
    tok.save(str(path / "tokenizer.json"))
    return llama_fast.AutoTokenizer.from_pretrained(path, add_bos_token=False)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = llama_fast.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                    max_position_embeddings=128, eos_token_id=2)
    return llama_fast.LlamaForCausalLM(config)


def test_iterator_streamer_yields_the_decoded_text(model, tokenizer):
    ids = torch.tensor([[3, 4, 43, 5]])
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=60)
    result = {}
    thread = threading.Thread(target=lambda: result.update(
        out=model.generate(ids, max_new_tokens=40, do_sample=True, seed=0, streamer=streamer)))
    thread.start()
    pieces = list(streamer)
    thread.join()
    new_tokens = result["out"][0, ids.shape[1]:]
    assert "".join(pieces) == tokenizer.decode(new_tokens)
    assert len(pieces) > 1


def test_streamer_holds_back_unfinished_words_and_characters(tokenizer):
    seen = []

    class Collect(TextStreamer):
        def on_finalized_text(self, text, stream_end=False):
            seen.append(text)

    s = Collect(tokenizer)
    for token in ["w1", "Ġw", "w2", "ðŁ", "ĺ", "Ģ", "Ċ"]:
        s.put(torch.tensor([tokenizer.convert_tokens_to_ids(token)]))
    s.end()
    assert seen[0] == "" and seen[1] == "w1 "    # "w1 w" may still grow, so only up to the space
    assert "\ufffd" not in "".join(seen)         # the emoji comes out whole
    assert "".join(seen) == tokenizer.decode(tokenizer.convert_tokens_to_ids(["w1", "Ġw", "w2", "ðŁ", "ĺ", "Ģ", "Ċ"]))


def test_print_streamer(model, tokenizer, capsys):
    ids = torch.tensor([[3, 4]])
    out = model.generate(ids, max_new_tokens=8, streamer=TextStreamer(tokenizer, skip_prompt=True), eos_token_id=[])
    assert capsys.readouterr().out == tokenizer.decode(out[0, 2:]) + "\n"


def test_streamer_rejects_batches(tokenizer):
    with pytest.raises(ValueError, match="batch of one"):
        TextStreamer(tokenizer).put(torch.zeros(2, 3, dtype=torch.long))
