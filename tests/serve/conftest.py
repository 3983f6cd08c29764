"""Server fixtures: a tiny random model with the demo tokenizer, a Scheduler over it, and a uvicorn server on
127.0.0.1 (a free port picked by the OS) started in a thread and always shut down. Clients get short
timeouts so a hung server fails a test instead of stalling the suite."""
from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

MODEL_NAME = "tiny-test"
CLIENT_TIMEOUT_S = 60.0


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory):
    from _tiny_chat_model import save_tiny_chat_model

    path = tmp_path_factory.mktemp("tiny_chat_serve")
    save_tiny_chat_model(path, max_position_embeddings=256)
    return path


@pytest.fixture(scope="session")
def tiny_chat(tiny_chat_dir):
    """(llama_fast model, tokenizer) of the tiny chat model, fp32 on the CPU."""
    import llama_fast
    model = llama_fast.LlamaForCausalLM.from_pretrained(str(tiny_chat_dir), dtype="float32").eval()
    return model, llama_fast.AutoTokenizer.from_pretrained(tiny_chat_dir)


@contextlib.contextmanager
def running_server(app, startup_timeout_s: float = 30.0):
    """Serves `app` on 127.0.0.1 with uvicorn in a thread; yields the base URL; stops it on exit."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        assert not thread.is_alive(), "the test server did not shut down"


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


def reference_generate(model, prompt_ids, max_tokens, eos_ids, **kw):
    """generate()'s new tokens for one prompt (greedy unless kw says otherwise), stopping at eos_ids."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, max_new_tokens=max_tokens, eos_token_id=sorted(eos_ids), pad_token_id=None, **kw)
    new = out[0, len(prompt_ids):].tolist()
    for n, t in enumerate(new):
        if t in eos_ids:
            return new[:n + 1]
    return new
