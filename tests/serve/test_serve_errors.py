"""Bad input never takes the server down: each case gets a 4xx with an OpenAI error body naming the problem,
and the next good request still works."""
from __future__ import annotations

import json

import httpx
import pytest
from serve_util import MODEL_NAME, client, server, serving, tiny_chat, tiny_chat_dir  # noqa: F401  (fixtures)

GOOD = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 2, "temperature": 0}
CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}

# (path, body: dict -> JSON, bytes -> sent as is, status, a phrase the message must hold, param)
CASES = [
    ("/v1/completions", b"{not json", 400, "not valid JSON", None),
    ("/v1/completions", b"", 400, "not valid JSON", None),
    ("/v1/completions", b"[1, 2]", 400, "must be a JSON object", None),
    ("/v1/completions", b'{"prompt": "caf\xe9"}', 400, "not valid UTF-8", None),
    ("/v1/completions", {**GOOD, "prompt": "\ud800"}, 400, "surrogate", "prompt"),
    ("/v1/completions", {**GOOD, "max_tokens": "5"}, 400, "valid integer", "max_tokens"),
    ("/v1/completions", {**GOOD, "max_tokens": 0}, 400, "greater than or equal to 1", "max_tokens"),
    ("/v1/completions", {**GOOD, "max_tokens": -3}, 400, "greater than or equal to 1", "max_tokens"),
    ("/v1/completions", {**GOOD, "max_tokens": 10 ** 9}, 400, "maximum context length", "max_tokens"),
    ("/v1/completions", {**GOOD, "max_tokens": 10 ** 30}, 400, "maximum context length", "max_tokens"),
    ("/v1/completions", {**GOOD, "max_tokens": 2.5}, 400, "valid integer", "max_tokens"),
    ("/v1/completions", {**GOOD, "temperature": "hot"}, 400, "valid number", "temperature"),
    ("/v1/completions", {**GOOD, "temperature": -1}, 400, "greater than or equal to 0", "temperature"),
    ("/v1/completions", {**GOOD, "top_p": 0}, 400, "greater than 0", "top_p"),
    ("/v1/completions", {**GOOD, "stream": "yes"}, 400, "valid boolean", "stream"),
    ("/v1/completions", {**GOOD, "n": 2}, 400, "only n=1", "n"),
    ("/v1/completions", {**GOOD, "logit_bias": {"1": 5}}, 400, "unknown field", "logit_bias"),
    ("/v1/completions", {**GOOD, "stop": [""]}, 400, "must not be empty", "stop"),
    ("/v1/completions", {**GOOD, "stop": ["x"] * 17}, 400, "at most 16", "stop"),
    ("/v1/completions", {**GOOD, "prompt": ""}, 400, "prompt is empty", "prompt"),
    ("/v1/completions", {**GOOD, "prompt": []}, 400, "prompt is empty", "prompt"),
    ("/v1/completions", {**GOOD, "prompt": [1, 10 ** 6]}, 400, "outside the vocabulary", "prompt"),
    ("/v1/completions", {**GOOD, "prompt": ["a", "b"]}, 400, "one prompt per request", "prompt"),
    ("/v1/completions", {**GOOD, "prompt": "word " * 400}, 400, "maximum context length", "prompt"),
    ("/v1/completions", {**GOOD, "echo": True}, 400, "echo", "echo"),
    ("/v1/completions", {"max_tokens": 2}, 400, "Field required", "prompt"),
    ("/v1/completions", {**GOOD, "model": "gpt-17"}, 404, "does not exist", "model"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "at least 1", "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": "hello"}, 400, "valid list", "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, 400, "role",
     "messages.0.role"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"content": "x"}]}, 400, "Field required", "messages.0.role"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 5}]}, 400, "content",
     "messages.0.content"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 3}, 400, "needs logprobs", "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 50, "logprobs": True}, 400, "less than or equal to 20",
     "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 10 ** 6}, 400, "maximum context length",
     "max_completion_tokens"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "word " * 400}]}, 400,
     "maximum context length", "messages"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, 400, "unknown field", "tools"),
    ("/detokenize", {"tokens": [-1]}, 400, "outside the vocabulary", "tokens"),
    ("/tokenize", {}, 400, "exactly one of prompt and messages", "prompt"),
]


def _post(url, path, body):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + path, content=content, headers={"content-type": "application/json"}, timeout=30)


@pytest.mark.parametrize("path,body,status,phrase,param", CASES, ids=[str(i) for i in range(len(CASES))])
def test_bad_input_is_a_clear_4xx_and_the_server_stays_up(server, path, body, status, phrase, param):
    url = server[0]
    r = _post(url, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert phrase in error["message"], error
    assert error["param"] == param and error["type"] == "invalid_request_error"
    ok = _post(url, "/v1/completions", GOOD)
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_huge_body_is_413(server):
    r = _post(server[0], "/v1/completions", {**GOOD, "prompt": "x" * (5 * 1024 * 1024)})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


def test_unknown_path_and_method_are_openai_errors(server):
    url = server[0]
    r = httpx.get(url + "/v1/nothing", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["message"]
    r = httpx.get(url + "/v1/completions", timeout=10)
    assert r.status_code == 405 and r.json()["error"]["message"]


def test_openai_client_sees_bad_request(client):
    import openai
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=100000)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi", max_tokens=1)


def test_failing_chat_template_is_400(tiny_chat_dir, tiny_chat):
    import llama_fast
    model, _ = tiny_chat
    tokenizer = llama_fast.AutoTokenizer.from_pretrained(tiny_chat_dir)
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('system messages are not supported') }}{% endif %}"
                               "{{ m['content'] }}{% endfor %}")
    with serving(model, tokenizer) as (url, _):
        r = _post(url, "/v1/chat/completions", {**CHAT, "messages": [{"role": "system", "content": "x"}]})
        assert r.status_code == 400 and "system messages are not supported" in r.json()["error"]["message"]
        r = _post(url, "/v1/chat/completions", CHAT)
        assert r.status_code == 200
    tokenizer.chat_template = None
    with serving(model, tokenizer) as (url, _):
        r = _post(url, "/v1/chat/completions", CHAT)
        assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]
