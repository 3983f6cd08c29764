"""Issue 17's catalogue of bad calls (generate, streamer, masks, positions): clear errors, never a hang or a
silently different answer."""
import threading

import pytest
import torch

from llama_fast import LlamaConfig, LlamaForCausalLM
from llama_fast.streamers import TextIteratorStreamer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


class _Tokenizer:
    """What TextIteratorStreamer needs of a tokenizer."""

    def decode(self, ids, **kwargs):
        return " ".join(str(i) for i in ids)


def test_streamer_consumer_never_blocks_when_generate_raises(model, monkeypatch):
    """Was: the prompt was streamed, then generate raised, and the consumer waited forever for end()."""
    # The timeout only turns a regression (a consumer blocked forever) into a failure instead of a hung suite.
    streamer = TextIteratorStreamer(_Tokenizer(), skip_prompt=False, timeout=300)
    calls = {"n": 0}
    forward = type(model).forward

    def failing_forward(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom in the second step")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", failing_forward)
    errors = []

    def run():
        try:
            model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, streamer=streamer)
        except RuntimeError as e:
            errors.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    received = list(streamer)          # returns only when generate called end()
    thread.join(timeout=60)
    assert not thread.is_alive() and len(errors) == 1 and "boom" in str(errors[0])
    assert received                     # the prompt (and the first token) were streamed before the error


@pytest.mark.parametrize("value, error", [(2.5, TypeError), ("3", TypeError), (True, TypeError), (0, ValueError),
                                          (-1, ValueError)])
def test_max_new_tokens_of_the_wrong_type_or_value(model, value, error):
    with pytest.raises(error, match="max_new_tokens|nothing to generate"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=value)


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": float("nan")}, "temperature must be a finite number > 0"),
    ({"temperature": float("inf")}, "temperature must be a finite number > 0"),
    ({"top_p": float("nan")}, r"top_p must be in \(0, 1\]"),
    ({"top_k": 2.5}, "top_k must be an int"),
])
def test_non_finite_sampling_settings(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=2, do_sample=True, **kwargs)


@pytest.mark.parametrize("value", [0.5, 2.0, float("nan")])
def test_attention_mask_values_other_than_0_and_1(model, value):
    """Was: 0.5 was cast to 0 and treated as padding."""
    mask = torch.ones(1, 3)
    mask[0, 0] = value
    with pytest.raises(ValueError, match="only 0 and 1"):
        model(torch.tensor([[1, 2, 3]]), attention_mask=mask)
    with pytest.raises(ValueError, match="only 0 and 1"):
        model.generate(torch.tensor([[1, 2, 3]]), attention_mask=mask, max_new_tokens=1)


def test_huge_position_ids_are_refused_and_nothing_is_retained(model):
    """Was: position 2^24 built and kept 2 GiB of rotary tables."""
    with pytest.raises(ValueError, match="past the limit of 2048 positions"):
        model(torch.tensor([[1]]), position_ids=torch.tensor([[2 ** 24]]))
    rotary = model.model.rotary
    # Past max_position_embeddings but within the limit: answered, with tables that are not kept.
    out = model(torch.tensor([[1]]), position_ids=torch.tensor([[1000]]))
    assert torch.isfinite(out.logits).all()
    assert all(cos.shape[0] <= rotary.kept_limit for cos, _ in rotary._tables.values())
