"""The OpenAI wire format: request models with strict validation, and error bodies.

Requests are parsed from the raw body here (not by FastAPI's automatic validation) so that every kind of bad
input gets the same answer: HTTP 400 (413 for a body over the limit) with OpenAI's error body

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}

Validation is strict: wrong JSON types are not coerced ("5" is not an int), unknown fields are rejected (a
field this server does not implement must not be silently ignored), strings must be valid Unicode.
"""
from __future__ import annotations

import json
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20


class APIError(Exception):
    """An error with its HTTP status and OpenAI error type; rendered by `error_body`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingRequest(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)                 # -1 and 0: no top-k (vLLM's convention)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2 ** 63)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)   # transformers' (an extension)
    ignore_eos: bool = False                                                  # an extension, for benchmarks
    user: str | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n):
        if n != 1:
            raise ValueError("only n=1 is supported (one choice per request)")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop):
        if stop is None:
            return []
        stops = [stop] if isinstance(stop, str) else stop
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return [_check_unicode(s) for s in stops]

    def stop_strings(self) -> list[str]:
        return list(self.stop or [])


class CompletionRequest(_SamplingRequest):
    prompt: Union[str, list[str], list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list):
            if prompt and isinstance(prompt[0], str):
                if len(prompt) != 1:
                    raise ValueError("one prompt per request (a list of several prompts is not supported)")
                prompt = prompt[0]
            elif not prompt:
                raise ValueError("the prompt is empty")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            _check_unicode(prompt)
        return prompt

    @field_validator("echo", "suffix")
    @classmethod
    def _unsupported(cls, value, info):
        # OpenAI fields of the legacy API this server does not implement; their neutral values pass
        if value:
            raise ValueError({"echo": "echo=true is not supported",
                              "suffix": "suffix is not supported (no fill-in-the-middle)"}[info.field_name])
        return value


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return _check_unicode(self.content)
        return _check_unicode("".join(part.text for part in self.content))


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


def _check_unicode(text: str) -> str:
    """JSON escapes can carry lone surrogates (\\ud800), which are not text: reject them here, not in the
    tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text holds an unpaired surrogate (invalid Unicode)") from None
    return text


def _is_union_tag(part) -> bool:
    """pydantic names the member of a Union it tried inside an error's location ("str", "list[int]"); those
    are not request fields."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "none") or "[" in part)


def parse_request(body: bytes, model_class: type[BaseModel]) -> BaseModel:
    """The request model from a raw HTTP body, or an APIError saying what is wrong with it."""
    if len(body) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") \
            from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model_class.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(part) for part in first["loc"] if not _is_union_tag(part)) or None
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            message = "unknown field (not supported by this server)"
        raise APIError(400, f"{param}: {message}" if param else message, param=param) from None
