"""Helpers of the server tests: a server on 127.0.0.1 (a free port picked by the OS) in a thread, always shut
down; a Scheduler behind it; generate()'s answer for one prompt; a model whose decode steps the test gates."""
from __future__ import annotations

import contextlib
import threading

import torch

from llama_fast.serve.background import serve_in_thread

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

    def new_cache(self, *args, **kwargs):
        return self._model.new_cache(*args, **kwargs)

    def __call__(self, input_ids, **kwargs):
        if input_ids.shape[1] == 1:
            assert self.permits.acquire(timeout=WAIT_S), "the test never allowed this decode step"
        return self._model(input_ids, **kwargs)

    def allow(self, steps: int = 1):
        for _ in range(steps):
            self.permits.release()
