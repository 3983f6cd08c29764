"""Concurrency and lifecycle over HTTP: many clients at once all get generate()'s answers; a client that
disconnects (streaming or not) frees its row; a full queue answers 429; /health says 503 while loading.
Decode steps are gated by the test where the outcome would otherwise depend on timing."""
from __future__ import annotations

import concurrent.futures
import threading
import time

import httpx
import pytest
from serve_util import (  # noqa: F401  (fixtures)
    MODEL_NAME,
    WAIT_S,
    GatedModel,
    reference_generate,
    running_server,
    serving,
    tiny_chat,
    tiny_chat_dir,
)

openai = pytest.importorskip("openai")

CLIENTS, REQUESTS_PER_CLIENT = 16, 4


def _wait_until(condition, what: str, step=None):
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        if step is not None:
            step()
        time.sleep(0.01)


def test_concurrent_clients_all_get_generate_answers(tiny_chat):
    model, tokenizer = tiny_chat
    words = ["Once upon a time", "The capital of France is", "def fib(n):", "Hello", "1, 2, 3,", "Dear Sir,",
             "import numpy", "In 1492", "Roses are red", "Q: what is AI?", "The quick brown fox", "Chapter 1",
             "SELECT * FROM", "Let x be", "My favourite food is", "Breaking news:"]
    jobs = []
    for client_index in range(CLIENTS):
        for n in range(REQUESTS_PER_CLIENT):
            prompt = words[client_index] + " " + words[(client_index + n) % len(words)].lower()
            jobs.append((client_index, prompt, 4 + (client_index * 7 + n * 5) % 29, (client_index + n) % 2 == 0,
                         (client_index + n) % 3 == 0))
    with serving(model, tokenizer, max_batch=8, max_queue=CLIENTS * REQUESTS_PER_CLIENT) as (url, scheduler):
        eos = scheduler.eos_token_ids
        expected = {}
        for _, prompt, max_tokens, _, chat in jobs:
            ids = _prompt_ids(tokenizer, prompt, chat)
            expected[(prompt, max_tokens, chat)] = tokenizer.decode(
                reference_generate(model, ids, max_tokens, eos), skip_special_tokens=True)

        def run_client(client_index):
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", timeout=WAIT_S, max_retries=0)
            answers = []
            for index, prompt, max_tokens, stream, chat in jobs:
                if index != client_index:
                    continue
                answers.append(((prompt, max_tokens, chat), _ask(client, prompt, max_tokens, stream, chat)))
            return answers

        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            futures = [pool.submit(run_client, i) for i in range(CLIENTS)]
            results = [f.result(timeout=4 * WAIT_S) for f in futures]
        answers = [a for client_answers in results for a in client_answers]
        assert len(answers) == CLIENTS * REQUESTS_PER_CLIENT
        for key, text in answers:
            assert text == expected[key], key
        assert scheduler.running == 0 and scheduler.waiting == 0
        assert scheduler.finished["abort"] == 0 and scheduler.finished["error"] == 0


def _prompt_ids(tokenizer, prompt, chat):
    if not chat:
        return tokenizer.encode(prompt)
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def _ask(client, prompt, max_tokens, stream, chat):
    if chat:
        kwargs = dict(model=MODEL_NAME, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                      temperature=0)
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True,
                                                                                                    **kwargs))
        return client.chat.completions.create(**kwargs).choices[0].message.content
    kwargs = dict(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0)
    if stream:
        return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs))
    return client.completions.create(**kwargs).choices[0].text


@pytest.fixture
def gated_server(tiny_chat):
    model, tokenizer = tiny_chat
    gated = GatedModel(model)
    try:
        with serving(gated, tokenizer, max_batch=1, max_queue=1) as (url, scheduler):
            yield url, scheduler, gated
    finally:
        gated.allow(10_000)


BODY = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "ignore_eos": True}


def test_streaming_client_disconnect_frees_its_row(gated_server):
    url, scheduler, gated = gated_server
    with httpx.Client(timeout=WAIT_S) as http:
        with http.stream("POST", url + "/v1/completions", json={**BODY, "stream": True}) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert '"text"' in first
    # the connection is closed; decode steps go on one at a time until the server notices and drops the row
    _wait_until(lambda: scheduler.finished["abort"] == 1, "the row was freed", step=gated.allow)
    assert scheduler.running == 0 and scheduler.steps < 200
    gated.allow(1)
    r = httpx.post(url + "/v1/completions", json={**BODY, "max_tokens": 2}, timeout=WAIT_S)   # the row works
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_non_streaming_client_disconnect_frees_its_row(gated_server):
    url, scheduler, gated = gated_server
    with httpx.Client(timeout=0.5) as http:
        with pytest.raises(httpx.ReadTimeout):      # decode is gated: no answer can come
            http.post(url + "/v1/completions", json=BODY)
    _wait_until(lambda: scheduler.finished["abort"] == 1, "the row was freed", step=gated.allow)
    assert scheduler.running == 0 and scheduler.steps < 200


def test_full_queue_is_429_and_the_server_recovers(gated_server):
    url, scheduler, gated = gated_server
    body = {**BODY, "max_tokens": 3}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=WAIT_S)
        _wait_until(lambda: scheduler.running == 1, "the first request runs")
        queued = pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=WAIT_S)
        _wait_until(lambda: scheduler.waiting == 1, "the second request waits")
        r = httpx.post(url + "/v1/completions", json=body, timeout=WAIT_S)
        assert r.status_code == 429
        error = r.json()["error"]
        assert "max_queue=1" in error["message"] and error["type"] == "rate_limit_error"
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", timeout=WAIT_S, max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=1)
        gated.allow(100)
        assert running.result(WAIT_S).status_code == 200 and queued.result(WAIT_S).status_code == 200


def test_health_is_503_while_loading_then_ok(tiny_chat):
    from llama_fast.serve.app import create_app
    from llama_fast.serve.scheduler import Scheduler

    model, tokenizer = tiny_chat
    release = threading.Event()
    started = []

    def loader():
        assert release.wait(WAIT_S)
        started.append(Scheduler(model, tokenizer, max_batch=2, max_seq_len=128).start())
        return started[0]

    try:
        with running_server(create_app(loader=loader, model_name=MODEL_NAME)) as url:
            r = httpx.get(url + "/health", timeout=WAIT_S)
            assert r.status_code == 503 and r.json()["status"] == "loading"
            r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=WAIT_S)
            assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
            release.set()
            _wait_until(lambda: httpx.get(url + "/health", timeout=WAIT_S).status_code == 200, "the model loaded")
            r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=WAIT_S)
            assert r.status_code == 200
        assert not started[0]._thread.is_alive(), "shutdown did not stop the scheduler"
    finally:
        release.set()


def test_failed_load_is_reported(tiny_chat):
    from llama_fast.serve.app import create_app

    def loader():
        raise FileNotFoundError("no such model: /nowhere")

    with running_server(create_app(loader=loader, model_name=MODEL_NAME)) as url:
        _wait_until(lambda: httpx.get(url + "/health", timeout=WAIT_S).json()["status"] == "failed", "load failed")
        r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=WAIT_S)
        assert r.status_code == 503 and "no such model" in r.json()["error"]["message"]
