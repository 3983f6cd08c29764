"""generate()'s logits processors, stopping rules and dict outputs against transformers' generate on tiny random
models (same weights, saved by transformers, loaded by llama_fast): token for token in greedy fp32, and the
per-step scores / logits within the fp32 rule of the suite (max abs diff <= 1e-4 x their scale, -inf in the
same places)."""
import pytest
import torch
from test_generation import _batch  # left-padded prompts of ids 3.. (no pad/bos/eos inside), vocab 97

import llama_fast
from llama_fast.stop_strings import StopStrings

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import LogitsProcessorList, NoRepeatNGramLogitsProcessor  # noqa: E402

VOCAB = 97


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    ref = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():           # logits far apart: argmax is not a coin toss
        for p in ref.parameters():
            if p.dim() == 2:
                p.mul_(8)
    path = tmp_path_factory.mktemp("tiny")
    ref.save_pretrained(path)
    return ref, llama_fast.LlamaForCausalLM.from_pretrained(str(path), dtype="float32")


def _assert_steps_close(got, expected, what):
    assert len(got) == len(expected), f"{what}: {len(got)} steps, transformers {len(expected)}"
    for step, (a, b) in enumerate(zip(got, expected)):
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert torch.equal(torch.isinf(a), torch.isinf(b)), f"{what} step {step}: -inf in other places"
        finite = ~torch.isinf(b)
        scale = b[finite].abs().max().clamp(min=1e-6)
        diff = float((a[finite] - b[finite]).abs().max() / scale)
        assert diff <= 1e-4, f"{what} step {step}: differs from transformers by {diff:.3g} of its scale"


def _both(models, ids, mask, **kw):
    ref, ours = models
    kw = {"max_new_tokens": 10, "return_dict_in_generate": True, "output_scores": True, "output_logits": True, **kw}
    torch.manual_seed(1234)
    expected = ref.generate(input_ids=ids, attention_mask=mask, **kw)
    torch.manual_seed(1234)
    got = ours.generate(ids, attention_mask=mask, **kw)
    return got, expected


def _assert_same(got, expected):
    assert isinstance(got, llama_fast.generation.GenerateDecoderOnlyOutput)
    assert torch.equal(got.sequences, expected.sequences), (got.sequences, expected.sequences)
    _assert_steps_close(got.scores, expected.scores, "scores")
    _assert_steps_close(got.logits, expected.logits, "logits")
    assert got[0] is got.sequences and "scores" in got      # ModelOutput access


@pytest.mark.parametrize("penalty", [1.5, 0.7])
def test_repetition_penalty(models, penalty):
    ids, mask = _batch([7, 3, 11])
    got, expected = _both(models, ids, mask, do_sample=False, repetition_penalty=penalty, eos_token_id=None)
    _assert_same(got, expected)
    plain = models[1].generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    assert not torch.equal(got.sequences, plain), "the penalty changed nothing: the test cannot see it"


def test_min_new_tokens_holds_back_eos(models):
    ids, mask = _batch([6, 4, 8], seed=3)
    free = models[1].generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    eos = int(free[0, 8 + 1])     # row 0 emits this at step 1: as eos, it would stop the row there
    got, expected = _both(models, ids, mask, do_sample=False, eos_token_id=eos, pad_token_id=0, min_new_tokens=5)
    _assert_same(got, expected)
    assert int(got.sequences[0, 8 + 1]) != eos
    short, _ = _both(models, ids, mask, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert int(short.sequences[0, 8 + 1]) == eos


def test_bad_words_single_and_sequences(models):
    ids, mask = _batch([5, 9], seed=4)
    free = models[1].generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    new = free[:, 9:].tolist()
    bad = [[new[0][0]], [new[1][2], new[1][3]], [new[0][4], new[0][5], new[0][6]]]
    got, expected = _both(models, ids, mask, do_sample=False, bad_words_ids=bad, eos_token_id=None)
    _assert_same(got, expected)
    assert not torch.equal(got.sequences, free)


def test_user_logits_processor_list(models):
    ids, mask = _batch([8, 8], seed=5)
    processors = LogitsProcessorList([NoRepeatNGramLogitsProcessor(2)])
    got, expected = _both(models, ids, mask, do_sample=False, logits_processor=processors, eos_token_id=None,
                          max_new_tokens=20)
    _assert_same(got, expected)
    seen = [tuple(r) for r in got.sequences.tolist()]
    for row in seen:                                      # no bigram repeats, the processor's promise
        bigrams = list(zip(row, row[1:]))
        assert len(bigrams) == len(set(bigrams))


@pytest.mark.parametrize("settings", [dict(temperature=0.8, top_k=0, min_p=0.1),
                                      dict(temperature=1.3, top_k=20, top_p=0.9, min_p=0.05),
                                      dict(top_k=0, repetition_penalty=1.2, min_p=0.2)])
def test_sampling_warpers_and_min_p(models, settings):
    """Same seed, same draws: the processed scores (the distribution sampled from) match transformers'."""
    ids, mask = _batch([4, 6], seed=6)
    got, expected = _both(models, ids, mask, do_sample=True, eos_token_id=None, **settings)
    _assert_same(got, expected)


def test_scores_only_and_logits_only(models):
    ids, mask = _batch([5], seed=8)
    ours = models[1]
    out = ours.generate(ids, max_new_tokens=4, return_dict_in_generate=True, output_scores=True, eos_token_id=[])
    assert out.logits is None and len(out.scores) == 4
    out = ours.generate(ids, max_new_tokens=4, return_dict_in_generate=True, eos_token_id=[])
    assert out.scores is None and out.logits is None and out.sequences.shape == (1, 9)
    assert torch.equal(ours.generate(ids, max_new_tokens=4, output_scores=True, eos_token_id=[]), out.sequences)


def test_stopping_criteria_callable(models):
    ids, mask = _batch([5, 5], seed=9)
    ours = models[1]
    calls = []

    def after_three(input_ids, scores):
        calls.append(input_ids.shape[1])
        return torch.tensor([input_ids.shape[1] >= 8, False])

    out = ours.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[], stopping_criteria=[after_three])
    assert out.shape == (2, 11) and calls == list(range(6, 12))


def test_beam_search_and_bad_arguments_are_clear_errors(models):
    ours = models[1]
    ids, _ = _batch([4])
    with pytest.raises(ValueError, match="beam search"):
        ours.generate(ids, max_new_tokens=2, num_beams=2)
    with pytest.raises(ValueError, match="repetition_penalty"):
        ours.generate(ids, max_new_tokens=2, repetition_penalty=0.0)
    with pytest.raises(ValueError, match="min_p"):
        ours.generate(ids, max_new_tokens=2, do_sample=True, min_p=1.5)
    with pytest.raises(ValueError, match="bad_words_ids"):
        ours.generate(ids, max_new_tokens=2, bad_words_ids=[[]])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.generate(ids, max_new_tokens=2, bad_words_ids=[[VOCAB + 5]])
    with pytest.raises(ValueError, match="min_new_tokens"):
        ours.generate(ids, max_new_tokens=2, min_new_tokens=-1)
    with pytest.raises(ValueError, match="tokenizer"):
        ours.generate(ids, max_new_tokens=2, stop_strings=["x"])
    with pytest.raises(ValueError, match="output_attentions"):
        ours.generate(ids, max_new_tokens=2, output_attentions=True)


# ---- stop strings (a real byte-level tokenizer) ------------------------------------------------------------

@pytest.fixture(scope="module")
def chat_models(tmp_path_factory):
    from _tiny_chat_model import save_tiny_chat_model

    path = tmp_path_factory.mktemp("tiny_chat")
    ref = save_tiny_chat_model(path, max_position_embeddings=64)
    ours = llama_fast.LlamaForCausalLM.from_pretrained(str(path), dtype="float32")
    return ref, ours, transformers.AutoTokenizer.from_pretrained(path), llama_fast.AutoTokenizer.from_pretrained(path)


def test_stop_string_rule_matches_transformers_criterion(chat_models):
    """The text rule against transformers' tensor tables on token sequences that hold the stop strings at
    every offset, straddling token boundaries, and on random ones."""
    from transformers.generation.stopping_criteria import StopStringCriteria
    _, _, hf_tok, tok = chat_models
    stops = ["stop", "\n\n", "é!", " the end"]
    ref = StopStringCriteria(hf_tok, stops)
    ours = StopStrings(stops, tok)
    texts = ["please stop", "unstoppable", "a\n\nb", "café! yes", "this is the end", "the ending", "st op",
             "x", "stopstop now", "the end\n"]
    g = torch.Generator().manual_seed(0)
    rows = []
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        rows += [ids[:n] for n in range(1, len(ids) + 1)]
    rows += [torch.randint(0, 49152, (7,), generator=g).tolist() for _ in range(50)]
    width = max(len(r) for r in rows)
    batch = torch.tensor([[220] * (width - len(r)) + r for r in rows])
    expected = ref(batch, None)
    assert expected.any() and not expected.all()
    assert torch.equal(ours(batch), expected)


def test_stop_strings_generate_matches_transformers(chat_models):
    ref, ours, hf_tok, tok = chat_models
    ids = torch.tensor([tok.encode("Once upon a time", add_special_tokens=False)])
    free = ours.generate(ids, max_new_tokens=12, eos_token_id=[])
    new_text = [tok.decode(free[0, ids.shape[1] + n: ids.shape[1] + n + 1]) for n in range(12)]
    stop = new_text[4][-2:] if len(new_text[4]) >= 2 else new_text[4]   # text the 5th new token ends with
    assert stop
    for eos in (None, 2):
        expected = ref.generate(ids, max_new_tokens=12, do_sample=False, stop_strings=[stop], tokenizer=hf_tok,
                                eos_token_id=eos, pad_token_id=2)
        got = ours.generate(ids, max_new_tokens=12, stop_strings=[stop], tokenizer=tok, eos_token_id=eos,
                            pad_token_id=2)
        assert torch.equal(got, expected)
        assert got.shape[1] <= ids.shape[1] + 5
