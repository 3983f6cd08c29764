"""The continuous-batching scheduler without HTTP: rows of different lengths decoded together give generate()'s
tokens, requests join a running batch and leave it, freed rows are reused, cancelled requests free their row.
Batching is made deterministic by submitting before the scheduler thread starts, or by gating the model."""
from __future__ import annotations

import contextlib
import threading
import time

import pytest
import torch
from serve_util import WAIT_S, GatedModel, reference_generate, tiny_chat, tiny_chat_dir  # noqa: F401  (fixtures)

from llama_fast.serve.sampling import SamplingParams
from llama_fast.serve.scheduler import FinishEvent, QueueFullError, Request, Scheduler, SchedulerClosedError, TokenEvent


class Collector:
    """A request's sink: gathers the events; `done` is set by the FinishEvent."""

    def __init__(self):
        self.tokens, self.text, self.finish = [], [], None
        self.done = threading.Event()
        self.first_token = threading.Event()

    def __call__(self, event):
        if isinstance(event, TokenEvent):
            self.tokens.append(event.choice.token)
            self.text.append(event.text)
            self.first_token.set()
        else:
            assert isinstance(event, FinishEvent) and self.finish is None
            self.finish = event
            self.text.append(event.text)
            self.done.set()

    def wait(self):
        assert self.done.wait(WAIT_S), "the request did not finish"
        return self


def _prompts(tokenizer, n):
    texts = ["Once upon a time", "The capital of France is", "def fib(n):", "Hello", "1, 2, 3, 4,",
             "A long time ago in a galaxy far", "Q: why is the sky blue?\nA:", "import torch\n"]
    return [tokenizer.encode(texts[i % len(texts)] + " " * (i // len(texts))) for i in range(n)]


@contextlib.contextmanager
def gated_scheduler(model, tokenizer, start=True, **kwargs):
    """A Scheduler over the gated model: yields (scheduler, gated); always lets it finish and stops it."""
    gated = GatedModel(model)
    scheduler = Scheduler(gated, tokenizer, **kwargs)
    if start:
        scheduler.start()
    try:
        yield scheduler, gated
    finally:
        gated.allow(1000)
        scheduler.stop()


def _greedy(model, prompt, n):
    return model.generate(torch.tensor([prompt]), max_new_tokens=n, eos_token_id=[])[0, len(prompt):].tolist()


def _request(prompt, max_tokens, sink, **sampling):
    return Request(prompt_ids=prompt, max_tokens=max_tokens, sampling=SamplingParams(**{"temperature": 0.0,
                                                                                          **sampling}), sink=sink)


def test_rows_of_different_lengths_decode_like_each_alone(tiny_chat):
    """The model-level mechanism: prompts prefilled into rows of one cache at different times, then decoded
    as one batch with per-row lengths, give each row's own logits (fp32 rule: 1e-4 of their scale)."""
    model, tokenizer = tiny_chat
    prompts = _prompts(tokenizer, 3)
    cache = model.new_cache(4, 64)
    expected, tokens, lengths = [], [], [0, 0, 0, 0]
    for slot, prompt in zip((0, 2, 3), prompts):       # row 1 stays free: a hole in the batch
        view = cache.rows(slot, slot + 1)
        out = model(torch.tensor([prompt]), past_key_values=view, use_cache=True, logits_to_keep=1)
        lengths[slot] = len(prompt)
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
        alone = model(torch.tensor([prompt + [token]])).logits[0, -1]
        expected.append(alone)
    view = cache.rows(0, 4)
    view.lengths.copy_(torch.tensor(lengths, dtype=torch.int32))
    view.seen_tokens = max(lengths)
    batch_ids = torch.tensor([[tokens[0]], [0], [tokens[1]], [tokens[2]]])
    logits = model(batch_ids, past_key_values=view, use_cache=True, logits_to_keep=1).logits[:, -1]
    for slot, ref in zip((0, 2, 3), expected):
        diff = float((logits[slot] - ref).abs().max() / ref.abs().max())
        assert diff <= 1e-4, f"row {slot}: {diff:.3g}"
    assert cache.lengths.tolist() == [lengths[0] + 1, 1, lengths[2] + 1, lengths[3] + 1]


@pytest.mark.parametrize("max_batch,decode_rows,prefill_chunk,mixed,step_tokens", [
    (3, None, None, True, None), (3, None, None, False, None), (5, 2, 3, True, None), (5, 2, 3, False, None),
    (5, 4, 7, True, None), (5, None, None, True, 6), (5, 3, None, True, 2)])
def test_batch_equals_generate_and_rows_are_reused(tiny_chat, max_batch, decode_rows, prefill_chunk, mixed,
                                                   step_tokens):
    """Nine requests, three (five) rows: the first ones are prefilled before any decodes and then decode
    together (in forwards of at most decode_rows tokens); finished rows take the next request, whose prompt
    goes in while the others decode (prefill_chunk prompt tokens per step at most, in the decode forwards with
    mixed steps, where step_tokens bounds the step), and every request's tokens are generate()'s."""
    model, tokenizer = tiny_chat
    scheduler = Scheduler(model, tokenizer, max_batch=max_batch, max_queue=16, max_seq_len=128,
                          decode_rows=decode_rows, prefill_chunk=prefill_chunk, mixed_steps=mixed,
                          step_tokens=step_tokens)
    prompts = _prompts(tokenizer, 9)
    max_tokens = [5, 17, 9, 12, 3, 20, 8, 1, 14]
    sinks = [Collector() for _ in prompts]
    for prompt, n, sink in zip(prompts, max_tokens, sinks):
        scheduler.submit(_request(prompt, n, sink))
    scheduler.start()                # submitted first: the first step is guaranteed to batch three rows
    try:
        for prompt, n, sink in zip(prompts, max_tokens, sinks):
            sink.wait()
            expected = reference_generate(model, prompt, n, scheduler.eos_token_ids)
            assert sink.tokens == expected
            assert sink.finish.completion_tokens == len(expected)
            assert sink.finish.reason == ("stop" if expected[-1] in scheduler.eos_token_ids else "length")
            assert "".join(sink.text) == tokenizer.decode(expected, skip_special_tokens=True)
        assert scheduler.max_rows_in_step == max_batch
        assert scheduler.running == 0 and scheduler.waiting == 0
    finally:
        scheduler.stop()


def test_request_joins_a_running_batch_and_cancel_frees_the_row(tiny_chat):
    model, tokenizer = tiny_chat
    a_prompt, b_prompt, c_prompt = _prompts(tokenizer, 3)
    with gated_scheduler(model, tokenizer, max_batch=2, max_queue=4, max_seq_len=128) as (scheduler, gated):
        a, b, c = Collector(), Collector(), Collector()
        scheduler.submit(Request(a_prompt, 30, SamplingParams(temperature=0.0), a, ignore_eos=True))
        assert a.first_token.wait(WAIT_S)
        gated.allow(3)                                   # a decodes three steps alone
        b_request = Request(b_prompt, 30, SamplingParams(temperature=0.0), b, ignore_eos=True)
        scheduler.submit(b_request)                      # joins between steps
        assert b.first_token.wait(WAIT_S)
        gated.allow(2)
        scheduler.cancel(b_request)                      # b's client goes away: its row frees
        scheduler.submit(Request(c_prompt, 6, SamplingParams(temperature=0.0), c, ignore_eos=True))
        gated.allow(200)
        a.wait(), b.wait(), c.wait()
        assert b.finish.reason == "abort" and b.finish.completion_tokens < 30
        for prompt, n, sink in ((a_prompt, 30, a), (c_prompt, 6, c)):
            assert sink.tokens == _greedy(model, prompt, n)
            assert sink.finish.reason == "length"
        assert b.tokens == _greedy(model, b_prompt, len(b.tokens))
        assert scheduler.max_rows_in_step == 2 and scheduler.running == 0


class _Logged(Collector):
    """A Collector that also appends (name, token) to a log shared by several requests: their interleaving."""

    def __init__(self, name, log):
        super().__init__()
        self.name, self.log = name, log

    def __call__(self, event):
        if isinstance(event, TokenEvent):
            self.log.append((self.name, event.choice.token))
        super().__call__(event)


@pytest.mark.parametrize("mixed", [True, False])
@pytest.mark.parametrize("chunk", [3, 5])
def test_long_prompt_prefills_in_chunks_while_others_decode(tiny_chat, chunk, mixed):
    """A request joining a running batch has its prompt prefilled `chunk` tokens per step, in the running row's
    decode forward (mixed steps) or in a forward of its own followed by that decode step: the running row emits
    a token every step meanwhile, and both answers are generate()'s."""
    model, tokenizer = tiny_chat
    a_prompt = _prompts(tokenizer, 1)[0]
    b_prompt = tokenizer.encode("A long time ago in a galaxy far, far away, a small robot read every book it found")
    if len(b_prompt) % chunk == 1:
        b_prompt = b_prompt[:-1]    # the gated model would take a last chunk of one token for a decode step
    chunks = -(-len(b_prompt) // chunk)
    assert chunks >= 3
    log = []
    with gated_scheduler(model, tokenizer, max_batch=2, max_queue=4, max_seq_len=128, prefill_chunk=chunk,
                         mixed_steps=mixed) as (scheduler, gated):
        a, b = _Logged("a", log), _Logged("b", log)
        scheduler.submit(Request(a_prompt, 40, SamplingParams(temperature=0.0), a, ignore_eos=True))
        assert a.first_token.wait(WAIT_S)     # no permit given yet: a holds exactly this one token
        scheduler.submit(Request(b_prompt, 6, SamplingParams(temperature=0.0), b, ignore_eos=True))
        gated.allow(200)
        a.wait(), b.wait()
    a_before_b = next(i for i, (name, _) in enumerate(log) if name == "b")
    # a's first token, maybe a step that began before b was admitted, then a token per step of b's prefill: with
    # mixed steps in each of them (the running rows' tokens go out first), else after each chunk but the last
    # (whose first token comes before that step's decode)
    first_b = chunks + 1 if mixed else chunks
    assert a_before_b in (first_b, first_b + 1), (a_before_b, chunks)
    # a's token and b's chunk in one forward over both rows only with mixed steps
    assert ((2, chunk) in gated.shapes) == mixed
    assert a.tokens == _greedy(model, a_prompt, 40)
    assert b.tokens == _greedy(model, b_prompt, 6)


class _Counting:
    """The model, recording the real tokens (not pads) of every forward: the scheduler's token budget."""

    def __init__(self, model):
        self._model, self.config, self.model = model, model.config, model.model
        self.generation_config = model.generation_config
        self.real_tokens = []

    def new_cache(self, *args, **kwargs):
        return self._model.new_cache(*args, **kwargs)

    def __call__(self, input_ids, attention_mask=None, **kwargs):
        self.real_tokens.append(input_ids.numel() if attention_mask is None else int(attention_mask.sum()))
        return self._model(input_ids, attention_mask=attention_mask, **kwargs)


@pytest.mark.parametrize("step_tokens,prefill_chunk", [(4, 16), (8, 3), (16, 16)])
def test_a_prompt_joining_a_running_row_fills_the_step_to_its_token_budget(tiny_chat, step_tokens, prefill_chunk):
    """Mixed steps: while a row decodes, a joining prompt's chunks fill each forward up to step_tokens tokens
    (the running row's included) and never beyond, at most prefill_chunk prompt tokens per step; both answers
    are generate()'s."""
    model, tokenizer = tiny_chat
    counting = _Counting(model)
    scheduler = Scheduler(counting, tokenizer, max_batch=2, max_queue=4, max_seq_len=128, mixed_steps=True,
                          step_tokens=step_tokens, prefill_chunk=prefill_chunk)
    running_prompt = _prompts(tokenizer, 1)[0]
    long_prompt = tokenizer.encode("A long time ago in a galaxy far, far away, a small robot read every book it had")
    running, joining = Collector(), Collector()
    forwards_at_first_token = []

    def on_event(event):
        if isinstance(event, TokenEvent) and not joining.tokens:
            forwards_at_first_token.append(len(counting.real_tokens))
        joining(event)

    scheduler.submit(Request(running_prompt, 80, SamplingParams(temperature=0.0), running, ignore_eos=True))
    scheduler.start()
    try:
        assert running.first_token.wait(WAIT_S)
        started = len(counting.real_tokens)      # the running prompt's own prefill (nobody waited) came before
        scheduler.submit(Request(long_prompt, 5, SamplingParams(temperature=0.0), on_event, ignore_eos=True))
        joining.wait(), running.wait()
    finally:
        scheduler.stop()
    steps = counting.real_tokens[started:forwards_at_first_token[0]]
    budget = min(step_tokens, 1 + prefill_chunk)            # the running row's token + the prompt's chunk
    with_prompt = [n for n in steps if n > 1]               # before the join: the running row's decode steps
    assert len(with_prompt) == -(-len(long_prompt) // (budget - 1)), steps
    assert all(n == budget for n in with_prompt[:-1]) and with_prompt[-1] <= budget, steps
    assert running.tokens == _greedy(model, running_prompt, 80)
    assert joining.tokens == _greedy(model, long_prompt, 5)


def test_sixteen_clients_back_to_back_get_generate_answers(tiny_chat):
    """bench_serve's shape without HTTP: 16 client threads, each sending two requests back to back to 16 rows,
    so that prompts join a running batch at unplanned moments (the batching depends on timing, the answers must
    not): every answer is generate()'s, one by one."""
    model, tokenizer = tiny_chat
    prompts = _prompts(tokenizer, 32)
    max_tokens = [3 + (7 * i) % 13 for i in range(32)]
    scheduler = Scheduler(model, tokenizer, max_batch=16, max_queue=32, max_seq_len=128, mixed_steps=True).start()
    answers = {}

    def client(index):
        for n in (2 * index, 2 * index + 1):
            sink = Collector()
            scheduler.submit(Request(prompts[n], max_tokens[n], SamplingParams(temperature=0.0), sink,
                                     ignore_eos=True))
            answers[n] = sink.wait().tokens

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT_S)
    finally:
        scheduler.stop()
    assert sorted(answers) == list(range(32))
    for n, prompt in enumerate(prompts):
        assert answers[n] == _greedy(model, prompt, max_tokens[n]), n
    assert scheduler.max_rows_in_step > 1


def test_prompt_tokens_beside_running_rows(tiny_chat):
    """The budget rule: fill the step up to the next multiple of step_tokens (one prompt token at least),
    at most prefill_chunk."""
    model, tokenizer = tiny_chat
    scheduler = Scheduler(model, tokenizer, max_batch=2, max_seq_len=64, step_tokens=16, prefill_chunk=12)
    assert [scheduler._prompt_tokens_beside(n) for n in (0, 3, 4, 10, 15, 16, 20, 31, 32)] == \
        [12, 12, 12, 6, 1, 12, 12, 1, 12]
    with pytest.raises(ValueError, match="step_tokens"):
        Scheduler(model, tokenizer, max_batch=2, max_seq_len=64, step_tokens=0)


def test_queue_limit_and_context_limit(tiny_chat):
    model, tokenizer = tiny_chat
    prompt = _prompts(tokenizer, 1)[0]
    with gated_scheduler(model, tokenizer, start=False, max_batch=1, max_queue=1, max_seq_len=64) as (
            scheduler, gated):
        with pytest.raises(ValueError, match="exceed the context of 64"):
            scheduler.submit(_request(prompt, 64, Collector()))
        first, second = Collector(), Collector()
        scheduler.submit(_request(prompt, 4, first))
        with pytest.raises(QueueFullError, match="max_queue=1"):
            scheduler.submit(_request(prompt, 4, second))
        scheduler.start()
        assert first.first_token.wait(WAIT_S)
        scheduler.submit(_request(prompt, 4, second))     # the queue has room again
        gated.allow(100)
        assert first.wait().tokens == second.wait().tokens


def test_stop_aborts_waiting_and_running_requests(tiny_chat):
    model, tokenizer = tiny_chat
    prompt = _prompts(tokenizer, 1)[0]
    with gated_scheduler(model, tokenizer, max_batch=1, max_queue=4, max_seq_len=64) as (scheduler, gated):
        running, waiting = Collector(), Collector()
        scheduler.submit(Request(prompt, 20, SamplingParams(temperature=0.0), running, ignore_eos=True))
        assert running.first_token.wait(WAIT_S)       # now blocked in its first decode step
        scheduler.submit(_request(prompt, 20, waiting))
        stopper = threading.Thread(target=scheduler.stop)
        stopper.start()
        deadline = time.monotonic() + WAIT_S
        while not scheduler._closing:                 # stop() has asked before the step may finish
            assert time.monotonic() < deadline
            time.sleep(0.01)
        gated.allow(1)
        stopper.join(WAIT_S)
        assert running.wait().finish.reason == "abort" and running.finish.completion_tokens == 2
        assert waiting.wait().finish.reason == "abort"
        with pytest.raises(SchedulerClosedError):
            scheduler.submit(_request(prompt, 2, Collector()))
