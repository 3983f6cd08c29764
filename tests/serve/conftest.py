"""Server fixtures: a tiny random model with the demo tokenizer, and a server over it for each test module.
Clients get timeouts so that a hung server fails a test instead of stalling the suite."""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_util import CLIENT_TIMEOUT_S, serving  # noqa: E402


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


