"""The official openai client against a server on 127.0.0.1: completions and chat, streamed and not, give
generate()'s greedy tokens; stop strings, logprobs, usage, finish_reason, seeded sampling."""
from __future__ import annotations

import httpx
import pytest
import torch
from serve_util import MODEL_NAME, client, reference_generate, server, tiny_chat, tiny_chat_dir  # noqa: F401  (fixtures)

openai = pytest.importorskip("openai")


def _chat_ids(tokenizer, messages):
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def test_models_and_health(server, client):
    url, scheduler, _, _ = server
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    health = httpx.get(url + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"


@pytest.mark.parametrize("prompt,max_tokens", [("Once upon a time", 12), ("The capital of France is", 1),
                                               ("def fib(n):", 40)])
def test_completion_equals_generate(server, client, prompt, max_tokens):
    _, scheduler, model, tokenizer = server
    expected = reference_generate(model, tokenizer.encode(prompt), max_tokens, scheduler.eos_token_ids)
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0)
    choice = r.choices[0]
    assert choice.text == tokenizer.decode(expected, skip_special_tokens=True)
    assert choice.finish_reason == ("stop" if expected[-1] in scheduler.eos_token_ids else "length")
    assert r.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert r.usage.completion_tokens == len(expected)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.object == "text_completion" and r.model == MODEL_NAME


def test_completion_from_token_ids(server, client):
    _, scheduler, model, tokenizer = server
    ids = tokenizer.encode("Hello there")
    expected = reference_generate(model, ids, 6, scheduler.eos_token_ids)
    r = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=6, temperature=0)
    assert r.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)


def test_chat_equals_generate_streamed_and_not(server, client):
    _, scheduler, model, tokenizer = server
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}]
    expected = reference_generate(model, _chat_ids(tokenizer, messages), 24, scheduler.eos_token_ids)
    text = tokenizer.decode(expected, skip_special_tokens=True)
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == len(expected)
    assert r.object == "chat.completion"

    stream = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [r.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected)
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_completion_stream_and_done_marker(server, client):
    url, scheduler, model, tokenizer = server
    prompt = "A long time ago in a galaxy far"
    expected = reference_generate(model, tokenizer.encode(prompt), 20, scheduler.eos_token_ids)
    pieces = [c.choices[0].text for c in client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=20,
                                                                    temperature=0, stream=True)]
    assert "".join(pieces) == tokenizer.decode(expected, skip_special_tokens=True)
    with httpx.stream("POST", url + "/v1/completions", json={"prompt": prompt, "max_tokens": 3, "stream": True},
                      timeout=30) as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        events = [line for line in raw.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def _stop_inside(text: str) -> str:
    """A stop string that straddles a word boundary of `text`, from its middle."""
    middle = len(text) // 2
    return text[middle - 2:middle + 2]


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_across_tokens(server, client, stream):
    _, scheduler, model, tokenizer = server
    prompt = "Once upon a time"
    expected = reference_generate(model, tokenizer.encode(prompt), 30, scheduler.eos_token_ids)
    full = tokenizer.decode(expected, skip_special_tokens=True)
    stop = _stop_inside(full)
    assert len(stop) == 4 and stop in full
    kwargs = dict(model=MODEL_NAME, prompt=prompt, max_tokens=30, temperature=0, stop=[stop, "never-appears"])
    if stream:
        chunks = list(client.completions.create(stream=True, **kwargs))
        text = "".join(c.choices[0].text for c in chunks)
        reason = chunks[-1].choices[0].finish_reason
    else:
        r = client.completions.create(**kwargs)
        text, reason = r.choices[0].text, r.choices[0].finish_reason
    assert text == full[:full.index(stop)]
    assert reason == "stop"


def test_logprobs(server, client):
    """Logprobs are the model's log-softmax at each step: compare with generate()'s raw logits."""
    _, scheduler, model, tokenizer = server
    prompt = tokenizer.encode("1, 2, 3, 4,")
    out = model.generate(torch.tensor([prompt]), max_new_tokens=5, eos_token_id=[], output_logits=True,
                         return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    ref = [torch.log_softmax(step[0], dim=-1) for step in out.logits]
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=5, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert lp.tokens == [tokenizer.decode([t]) for t in tokens]
    for step, (token, got, top) in enumerate(zip(tokens, lp.token_logprobs, lp.top_logprobs)):
        assert abs(got - float(ref[step][token])) <= 1e-4 * float(ref[step].abs().max())
        best = torch.topk(ref[step], 3)
        assert list(top.values()) == pytest.approx(best.values.tolist(), abs=1e-3)
    chat = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)
    assert all(c.logprob <= 0 and bytes(c.bytes).decode("utf-8", "replace") == c.token for c in content)


def test_seeded_sampling_is_reproducible_and_equals_generate(server, client):
    _, scheduler, model, tokenizer = server
    prompt = tokenizer.encode("Once upon a time")
    kwargs = dict(model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0.9, top_p=0.95, seed=1234,
                  extra_body={"ignore_eos": True, "top_k": 40, "min_p": 0.02})
    a = client.completions.create(**kwargs).choices[0].text
    b = client.completions.create(**kwargs).choices[0].text
    assert a == b
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=True, temperature=0.9, top_p=0.95,
                         top_k=40, min_p=0.02, seed=1234, eos_token_id=[])
    assert a == tokenizer.decode(ref[0, len(prompt):], skip_special_tokens=True)
    other = client.completions.create(**{**kwargs, "seed": 99}).choices[0].text
    assert other != a


def test_penalties_change_greedy_output(server, client):
    _, scheduler, model, tokenizer = server
    kwargs = dict(model=MODEL_NAME, prompt="1, 2, 3, 4,", max_tokens=40, temperature=0,
                  extra_body={"ignore_eos": True})
    plain = client.completions.create(**kwargs).choices[0].text
    assert client.completions.create(frequency_penalty=2.0, **kwargs).choices[0].text != plain
    assert client.completions.create(presence_penalty=2.0, **kwargs).choices[0].text != plain
    prompt = tokenizer.encode("1, 2, 3, 4,")
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=40, repetition_penalty=1.3, eos_token_id=[])
    got = client.completions.create(**{**kwargs, "extra_body": {"ignore_eos": True, "repetition_penalty": 1.3}})
    assert got.choices[0].text == tokenizer.decode(ref[0, len(prompt):], skip_special_tokens=True)


def test_tokenize_and_detokenize(server):
    url, scheduler, _, tokenizer = server
    r = httpx.post(url + "/tokenize", json={"prompt": "Hello world"}, timeout=10).json()
    assert r["tokens"] == tokenizer.encode("Hello world") and r["count"] == len(r["tokens"])
    messages = [{"role": "user", "content": "hi"}]
    r = httpx.post(url + "/tokenize", json={"messages": messages}, timeout=10).json()
    assert r["tokens"] == _chat_ids(tokenizer, messages)
    r = httpx.post(url + "/detokenize", json={"tokens": tokenizer.encode("Hello world")}, timeout=10).json()
    assert r["prompt"] == "Hello world"
