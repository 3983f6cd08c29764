"""Units of the server: incremental text with stop strings, per-row penalties, the serve CLI's options."""
from __future__ import annotations

import pytest
import torch

from llama_fast.serve.detokenize import IncrementalText
from llama_fast.serve.sampling import RowSampler, SamplingParams, choose_rows


class PieceTokenizer:
    """Token i decodes to PIECES[i]; bytes pieces model a UTF-8 character split over tokens."""
    PIECES = ["Hel", "lo", " wor", "ld", "!", b"\xc3", b"\xa9", " st", "op", "<eos>"]

    def decode(self, ids, skip_special_tokens=False):
        raw = b"".join(p if isinstance(p, bytes) else p.encode() for p in (self.PIECES[i] for i in ids)
                       if not (skip_special_tokens and p == "<eos>"))
        return raw.decode("utf-8", errors="replace")


def _feed(tokens, stop):
    text = IncrementalText(PieceTokenizer(), stop)
    pieces = [text.add(t) for t in tokens]
    return pieces, text


def test_text_is_released_as_it_becomes_final():
    pieces, text = _feed([0, 1, 2, 3], [])
    assert pieces == ["Hel", "lo", " wor", "ld"] and not text.stopped


def test_split_utf8_character_is_held_back():
    pieces, text = _feed([0, 5, 6, 4], [])
    assert pieces == ["Hel", "", "é", "!"]


def test_stop_string_across_token_boundaries_cuts_the_text():
    pieces, text = _feed([0, 1, 2, 3, 4], ["o wo"])
    assert "".join(pieces) == "Hell" and text.stopped
    assert pieces[1] == "l"            # "lo" ends with "o", a prefix of the stop string: "o" is held back


def test_held_back_prefix_is_released_when_it_is_not_a_stop():
    pieces, text = _feed([0, 1, 4], ["o wo"])
    assert pieces == ["Hel", "l", "o!"] and not text.stopped


def test_flush_releases_the_held_tail_at_the_end():
    pieces, text = _feed([7], ["stop"])
    assert pieces == [" "] and text.flush() == "st"


def test_stop_inside_one_token_and_earliest_match_wins():
    pieces, text = _feed([2, 3, 7, 8], ["stop", "ld"])
    assert "".join(pieces) == " wor" and text.stopped


def test_presence_and_frequency_penalties_follow_openai():
    logits = torch.linspace(0, 1, 10)
    params = SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25)
    sampler = RowSampler(params, prompt_ids=[1, 2], vocab_size=10, device="cpu")
    sampler.output_ids = [9, 9, 3]
    expected = logits.clone()
    expected[9] -= 0.5 + 2 * 0.25
    expected[3] -= 0.5 + 0.25
    torch.testing.assert_close(sampler._penalized(logits), expected)     # the prompt is not penalized
    assert sampler.choose(logits).token == int(expected.argmax())


def test_batched_choice_equals_each_row_alone():
    """One step's rows sampled together (choose_rows: one argmax, one log-softmax over the batch) give each
    request what it would draw alone: plain greedy, greedy with a penalty, seeded temperature; with and
    without log-probabilities; logits rows picked out of a larger batch in any order."""
    torch.manual_seed(0)
    vocab = 50
    logits = torch.randn(6, vocab) * 3
    params = [SamplingParams(temperature=0.0, logprobs=True, top_logprobs=3),
              SamplingParams(temperature=0.0, repetition_penalty=1.3),
              SamplingParams(temperature=0.8, seed=7, logprobs=True),
              SamplingParams(temperature=0.0)]
    rows = [4, 0, 2, 5]
    first, second = logits[0].topk(2).indices.tolist()
    logits[0, second] = logits[0, first] - 0.1      # a close second: the penalty on `first` changes row 0's answer
    prompt = [first]
    together = [RowSampler(p, prompt, vocab, "cpu") for p in params]
    alone = [RowSampler(p, prompt, vocab, "cpu") for p in params]
    for _ in range(3):                                   # the samplers' state (outputs, generators) carries on
        choices = choose_rows(together, logits, rows)
        for sampler, row, choice in zip(alone, rows, choices):
            token = sampler.pick(logits[row])
            sampler.output_ids.append(token)
            assert choice.token == token
            if sampler.params.logprobs:
                reference = torch.log_softmax(logits[row], dim=-1)
                torch.testing.assert_close(torch.tensor(choice.logprob), reference[token])
                top = reference.topk(sampler.params.top_logprobs) if sampler.params.top_logprobs else None
                assert [t for t, _ in choice.top] == (top.indices.tolist() if top is not None else [])
            else:
                assert choice.logprob is None and choice.top == []
    assert [s.output_ids for s in together] == [s.output_ids for s in alone]
    assert together[1].output_ids[0] == second      # the penalized greedy row (row 0, whose argmax is `first`)


def test_serve_cli_options():
    from llama_fast.tools.cli import build_parser
    args = build_parser().parse_args(["serve", "--port", "0", "--max-batch", "4", "--max-queue", "2",
                                      "--max-seq-len", "512", "--served-model-name", "m", "--step-tokens", "8"])
    assert (args.command, args.port, args.max_batch, args.max_queue, args.max_seq_len) == ("serve", 0, 4, 2, 512)
    assert args.step_tokens == 8
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-batch", "0"])
