"""Helpers and fixtures of the server tests: a tiny random model with the demo tokenizer, a server on 127.0.0.1
(a free port picked by the OS) in a thread, always shut down, with a Scheduler behind it; generate()'s answer
for one prompt; a model whose decode steps the test gates. Clients get timeouts, so a hung server fails a test
instead of stalling the suite.

Test modules import the fixtures they use from here (`from serve_util import server  # noqa: F401`): a
conftest.py in this folder would shadow tests/conftest.py, which other test modules import by that name.
"""
from __future__ import annotations

import contextlib
import threading

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from llama_fast.serve.background import serve_in_thread  # noqa: E402

MODEL_NAME = "tiny-test"
CLIENT_TIMEOUT_S = 60.0
WAIT_S = 60        # the longest a test waits for an event before failing


def running_server(app):
    """Serves `app` on 127.0.0.1 (a free port) in a thread; yields the base URL; always shuts it down."""
    return serve_in_thread(app)


@contextlib.contextmanager
def serving(model, tokenizer, **scheduler_kwargs):
    """A started Scheduler over (model, tokenizer) behind a running server: yields (base_url, scheduler)."""
    from llama_fast.serve.app import create_app
    from llama_fast.serve.scheduler import Scheduler

    scheduler = Scheduler(model, tokenizer, **{"max_batch": 4, "max_queue": 64, "max_seq_len": 256,
                                               **scheduler_kwargs}).start()
    try:
        with running_server(create_app(scheduler, model_name=MODEL_NAME)) as url:
            yield url, scheduler
    finally:
        scheduler.stop(timeout=30)


def reference_generate(model, prompt_ids, max_tokens, eos_ids, **kw):
    """generate()'s new tokens for one prompt (greedy unless kw says otherwise), stopping at eos_ids."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, max_new_tokens=max_tokens, eos_token_id=sorted(eos_ids), pad_token_id=None, **kw)
    new = out[0, len(prompt_ids):].tolist()
    for n, t in enumerate(new):
        if t in eos_ids:
            return new[:n + 1]
    return new


class GatedModel:
    """The model, but every decode step (a forward of one token per row) waits for a permit: the test decides
    when steps happen, so what joins or leaves between steps does not depend on timing."""

    def __init__(self, model):
        self._model = model
        self.permits = threading.Semaphore(0)
        self.config = model.config
        self.model = model.model
        self.generation_config = model.generation_config
        self.shapes = []                  # [rows, width] of every forward, in order

    def new_cache(self, *args, **kwargs):
        return self._model.new_cache(*args, **kwargs)

    def __call__(self, input_ids, **kwargs):
        self.shapes.append(tuple(input_ids.shape))
        if input_ids.shape[1] == 1:
            assert self.permits.acquire(timeout=WAIT_S), "the test never allowed this decode step"
        return self._model(input_ids, **kwargs)

    def allow(self, steps: int = 1):
        for _ in range(steps):
            self.permits.release()


# ---- fixtures --------------------------------------------------------------------------------------------

# Test modules import these fixtures, so pytest registers them once per module: the model is built once per
# process here instead.
_BUILT: dict = {}


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory):
    from _tiny_chat_model import save_tiny_chat_model

    if "dir" not in _BUILT:
        path = tmp_path_factory.mktemp("tiny_chat_serve")
        save_tiny_chat_model(path, max_position_embeddings=256)
        _BUILT["dir"] = path
    return _BUILT["dir"]


@pytest.fixture(scope="session")
def tiny_chat(tiny_chat_dir):
    """(llama_fast model, tokenizer) of the tiny chat model, fp32 on the CPU."""
    import llama_fast
    if "model" not in _BUILT:
        model = llama_fast.LlamaForCausalLM.from_pretrained(str(tiny_chat_dir), dtype="float32").eval()
        _BUILT["model"] = model, llama_fast.AutoTokenizer.from_pretrained(tiny_chat_dir)
    return _BUILT["model"]


@pytest.fixture(scope="module")
def server(tiny_chat):
    """One server for a test module: (base_url, scheduler, model, tokenizer)."""
    model, tokenizer = tiny_chat
    with serving(model, tokenizer) as (url, scheduler):
        yield url, scheduler, model, tokenizer


@pytest.fixture
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", timeout=CLIENT_TIMEOUT_S, max_retries=0)


