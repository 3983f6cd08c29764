"""The FastAPI application: OpenAI's /v1/completions and /v1/chat/completions (streamed as server-sent events
ending with `data: [DONE]`), /v1/models, /health, /tokenize, /detokenize.

Handlers validate and tokenize, then hand a Request to the scheduler thread and await its events on an
asyncio queue (the scheduler calls the request's sink on its own thread; the sink hops onto the event loop,
a step's events for all requests together).
A client that disconnects cancels its request, which frees its batch row before the next decode step:
streaming responses cancel it when they end for any reason (Starlette ends them on a disconnect), non-streaming
ones wait on the connection's http.disconnect next to the result.

Every failure is an OpenAI error body: 400 for bad input (protocol.py), 404 for an unknown model or path,
413 for a huge body, 429 when the queue is full, 503 while the model loads or the server shuts down, 500 for
a failure inside the model (the server keeps serving).
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
import weakref
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from llama_fast.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    error_body,
    parse_request,
)
from llama_fast.serve.sampling import SamplingParams
from llama_fast.serve.scheduler import FinishEvent, QueueFullError, Request, SchedulerClosedError, TokenEvent

DEFAULT_COMPLETION_TOKENS = 16      # OpenAI's default max_tokens for /v1/completions


class Engine:
    """What the handlers need: the scheduler (which owns model and tokenizer) and the served model's name.
    `status` is "loading" until `ready()` is called, "failed" if loading raised."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.scheduler = None
        self.status = "loading"
        self.error: str | None = None
        self.created = int(time.time())

    def ready(self, scheduler) -> None:
        self.scheduler = scheduler
        self.status = "ready"

    def failed(self, error: BaseException) -> None:
        self.error = f"{type(error).__name__}: {error}"
        self.status = "failed"

    def require(self):
        if self.status == "ready":
            return self.scheduler
        if self.status == "failed":
            raise APIError(503, f"the model failed to load: {self.error}", type="server_error")
        raise APIError(503, "the model is still loading; retry shortly", type="server_error")


def create_app(scheduler=None, *, loader=None, model_name: str = "llama-fast") -> FastAPI:
    """An app serving `scheduler` (a started Scheduler), or the one `loader()` returns: then loading runs in a
    thread at startup and /health answers 503 until it is done. The scheduler is stopped at shutdown."""
    engine = Engine(model_name)
    if scheduler is not None:
        engine.ready(scheduler)

    @asynccontextmanager
    async def lifespan(app):
        if loader is not None and scheduler is None:
            def load():
                try:
                    engine.ready(loader())
                except BaseException as e:     # reported by /health and every request
                    engine.failed(e)
            threading.Thread(target=load, name="llama-fast-loader", daemon=True).start()
        yield
        if engine.scheduler is not None:
            await run_in_threadpool(engine.scheduler.stop)

    app = FastAPI(title="llama_fast", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"),
                            status_code=500)

    @app.get("/health")
    async def health():
        if engine.status != "ready":
            message = "loading" if engine.status == "loading" else f"failed: {engine.error}"
            return JSONResponse({"status": engine.status, **error_body(message, "server_error")}, status_code=503)
        s = engine.scheduler
        return {"status": "ok", "running": s.running, "waiting": s.waiting, "max_batch": s.max_batch}

    @app.get("/v1/models")
    async def models():
        data = {"id": engine.model_name, "object": "model", "created": engine.created, "owned_by": "llama_fast"}
        if engine.status == "ready":
            data["max_model_len"] = engine.scheduler.max_seq_len
        return {"object": "list", "data": [data]}

    async def accept(http: HTTPRequest, model_class):
        """The scheduler (503 unless ready) and the validated request (4xx otherwise)."""
        scheduler = engine.require()
        req = parse_request(await http.body(), model_class)
        _check_model(engine, req.model)
        return scheduler, req

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        scheduler, req = await accept(http, CompletionRequest)
        prompt_ids = await run_in_threadpool(_completion_prompt, scheduler, req.prompt)
        return await _respond(http, engine, scheduler, req, prompt_ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        scheduler, req = await accept(http, ChatCompletionRequest)
        prompt_ids = await run_in_threadpool(_chat_prompt, scheduler.tokenizer, req.messages)
        return await _respond(http, engine, scheduler, req, prompt_ids, chat=True)

    @app.post("/tokenize")
    async def tokenize(http: HTTPRequest):
        scheduler, req = await accept(http, TokenizeRequest)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "pass exactly one of prompt and messages", param="prompt")
        if req.messages is not None:
            ids = await run_in_threadpool(_chat_prompt, scheduler.tokenizer, req.messages)
        else:
            ids = await run_in_threadpool(scheduler.tokenizer.encode, req.prompt,
                                          add_special_tokens=req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": scheduler.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(http: HTTPRequest):
        scheduler, req = await accept(http, DetokenizeRequest)
        _check_token_ids(req.tokens, scheduler.vocab_size, "tokens")
        return {"prompt": scheduler.tokenizer.decode(req.tokens)}

    return app


# ---- prompts ----------------------------------------------------------------------------------------------

def _check_model(engine: Engine, name: str | None) -> None:
    if name is not None and name != engine.model_name:
        raise APIError(404, f"the model {name!r} does not exist; this server serves {engine.model_name!r}",
                       param="model", code="model_not_found")


def _check_token_ids(ids, vocab_size: int, param: str) -> None:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})", param=param)


def _completion_prompt(scheduler, prompt) -> list[int]:
    if isinstance(prompt, list):
        _check_token_ids(prompt, scheduler.vocab_size, "prompt")
        return list(prompt)
    return scheduler.tokenizer.encode(prompt)


def _chat_prompt(tokenizer, messages) -> list[int]:
    conversation = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in messages]
    try:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    except Exception as e:          # no template, or the template raised (e.g. roles it does not accept)
        raise APIError(400, f"the chat template failed on these messages: {e}", param="messages") from None
    return tokenizer.encode(text, add_special_tokens=False)


# ---- running a request ------------------------------------------------------------------------------------

class _LoopRelay:
    """Hands events from the scheduler thread to one event loop. Events posted while a hand-over is still
    pending ride along with it: a decode step's tokens for all its requests wake the loop about once, not
    once per request (each wake-up is a write to the loop's self-pipe and a pass of the loop, on the cores
    the model's threads need)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list = []             # (queue, event), in the order posted

    def post(self, queue: asyncio.Queue, event) -> None:
        with self._lock:
            self._pending.append((queue, event))
            if len(self._pending) > 1:
                return                        # a hand-over is scheduled and has not run yet: it takes this one
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:                  # the loop is closed: nobody is left to take these
            with self._lock:
                self._pending.clear()
            raise

    def _deliver(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        for queue, event in batch:
            queue.put_nowait(event)


_RELAYS: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopRelay]" = weakref.WeakKeyDictionary()


class _Job:
    """Bridges the scheduler thread's events onto this event loop."""

    def __init__(self):
        loop = asyncio.get_running_loop()
        self.relay = _RELAYS.get(loop) or _RELAYS.setdefault(loop, _LoopRelay(loop))
        self.events: asyncio.Queue = asyncio.Queue()

    def sink(self, event) -> None:
        self.relay.post(self.events, event)


def _sampling(req, chat: bool) -> SamplingParams:
    if chat:
        logprobs, top = req.logprobs, (req.top_logprobs or 0)
        if top and not logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    else:
        logprobs, top = req.logprobs is not None, (req.logprobs or 0)
    return SamplingParams(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, top_k=max(req.top_k or 0, 0), min_p=req.min_p or 0.0,
        seed=req.seed, presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0, logprobs=logprobs, top_logprobs=top)


def _max_tokens(req, chat: bool, prompt_len: int, context: int) -> int:
    if prompt_len == 0:
        raise APIError(400, "the prompt is empty (no tokens)", param="messages" if chat else "prompt")
    requested = req.max_new_tokens() if chat else req.max_tokens
    if prompt_len >= context:
        raise APIError(400, f"this model's maximum context length is {context} tokens; the prompt has {prompt_len}",
                       param="messages" if chat else "prompt", code="context_length_exceeded")
    if requested is None:
        requested = context - prompt_len if chat else min(DEFAULT_COMPLETION_TOKENS, context - prompt_len)
    if prompt_len + requested > context:
        raise APIError(400, f"this model's maximum context length is {context} tokens; you requested "
                            f"{prompt_len + requested} ({prompt_len} in the prompt, {requested} for the completion)",
                       param="max_completion_tokens" if chat and req.max_completion_tokens else "max_tokens",
                       code="context_length_exceeded")
    return requested


async def _respond(http, engine, scheduler, req, prompt_ids, chat: bool):
    job = _Job()
    request = Request(prompt_ids=prompt_ids, max_tokens=_max_tokens(req, chat, len(prompt_ids), scheduler.max_seq_len),
                      sampling=_sampling(req, chat), sink=job.sink, stop=req.stop_strings(), ignore_eos=req.ignore_eos)
    try:
        scheduler.submit(request)
    except QueueFullError as e:
        raise APIError(429, str(e), type="rate_limit_error", code="queue_full") from None
    except SchedulerClosedError as e:
        raise APIError(503, str(e), type="server_error") from None
    except ValueError as e:
        raise APIError(400, str(e), param="max_tokens") from None
    meta = _ResponseMeta(engine.model_name, chat, scheduler.tokenizer)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _EventStream(_stream(job, meta, include_usage), on_close=lambda: scheduler.cancel(request),
                            media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await _complete(http, job, scheduler, request, meta)


async def _complete(http, job: _Job, scheduler, request: Request, meta: "_ResponseMeta"):
    disconnected = asyncio.ensure_future(_wait_for_disconnect(http))
    text, choices = [], []
    try:
        while True:
            getter = asyncio.ensure_future(job.events.get())
            done, _ = await asyncio.wait({getter, disconnected}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                scheduler.cancel(request)
                return JSONResponse(error_body("the client disconnected"), status_code=499)
            event = getter.result()
            if isinstance(event, TokenEvent):
                text.append(event.text)
                choices.append(event.choice)
                continue
            _raise_if_failed(event)
            text.append(event.text)
            return meta.full_response("".join(text), choices, event)
    finally:
        disconnected.cancel()


class _EventStream(StreamingResponse):
    """A streaming response that calls `on_close` however it ends: done, failed, or cancelled because the
    client went away (also before the first chunk, when the body generator has not even started). The
    request is cancelled then; for a finished one that changes nothing."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _stream(job: _Job, meta: "_ResponseMeta", include_usage: bool):
    if meta.chat:
        yield _sse(meta.chunk({"role": "assistant", "content": ""}, None, None))
    while True:
        event = await job.events.get()
        if isinstance(event, TokenEvent):
            if event.text or event.choice.logprob is not None:
                yield _sse(meta.chunk(event.text, [event.choice], None))
            continue
        if event.reason in ("error", "abort"):
            status = 500 if event.reason == "error" else 503
            message = event.error or "the request was aborted"
            yield _sse({"error": error_body(message, "server_error", code=str(status))["error"]})
        else:
            yield _sse(meta.chunk(event.text, None, event.reason))
            if include_usage:
                yield _sse(meta.usage_chunk(event))
        yield "data: [DONE]\n\n"
        return


async def _wait_for_disconnect(http) -> None:
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return


def _raise_if_failed(event: FinishEvent) -> None:
    if event.reason == "error":
        raise APIError(500, event.error or "generation failed", type="server_error")
    if event.reason == "abort":
        raise APIError(503, event.error or "the request was aborted", type="server_error")


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# ---- response bodies --------------------------------------------------------------------------------------

class _ResponseMeta:
    """Builds the OpenAI bodies of one request (completion or chat, whole or chunked)."""

    def __init__(self, model_name: str, chat: bool, tokenizer):
        self.model, self.chat, self.tokenizer = model_name, chat, tokenizer
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.text_offset = 0

    def _head(self, chunk: bool) -> dict:
        if self.chat:
            kind = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    @staticmethod
    def usage(event: FinishEvent) -> dict:
        return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
                "total_tokens": event.prompt_tokens + event.completion_tokens}

    def full_response(self, text: str, choices, event: FinishEvent) -> dict:
        logprobs = self.logprobs(choices) if choices and choices[0].logprob is not None else None
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                      "finish_reason": event.reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": event.reason}
        return {**self._head(False), "choices": [choice], "usage": self.usage(event)}

    def chunk(self, delta, choices, finish_reason) -> dict:
        logprobs = self.logprobs(choices) if choices and choices[0].logprob is not None else None
        if self.chat:
            if isinstance(delta, str):
                delta = {"content": delta} if delta or finish_reason is None else {}
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return {**self._head(True), "choices": [choice]}

    def usage_chunk(self, event: FinishEvent) -> dict:
        return {**self._head(True), "choices": [], "usage": self.usage(event)}

    def _token(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def logprobs(self, choices) -> dict:
        if self.chat:
            content = []
            for c in choices:
                text = self._token(c.token)
                top = [{"token": self._token(t), "logprob": lp, "bytes": list(self._token(t).encode("utf-8"))}
                       for t, lp in c.top]
                content.append({"token": text, "logprob": c.logprob, "bytes": list(text.encode("utf-8")),
                                "top_logprobs": top})
            return {"content": content}
        tokens, offsets = [], []
        for c in choices:
            text = self._token(c.token)
            tokens.append(text)
            offsets.append(self.text_offset)
            self.text_offset += len(text)
        return {"tokens": tokens, "token_logprobs": [c.logprob for c in choices],
                "top_logprobs": [{self._token(t): lp for t, lp in c.top} for c in choices] if choices[0].top
                else None, "text_offset": offsets}
