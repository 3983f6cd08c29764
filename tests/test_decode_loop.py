"""generate's sync-free loop pieces (llama_fast.decode_loop) on the CPU: the asynchronous "all finished" check
and token stream are forced on, with fake events that land some steps late, and generate must return exactly
what the synchronous loop returns (trimmed back to where every row finished) and stream exactly its tokens."""
from __future__ import annotations

import pytest
import torch

from llama_fast import LlamaForCausalLM, cuda_graphs, decode_loop
from llama_fast.config import LlamaConfig

from conftest import tiny_config


class LateEvent:
    """A copy that lands `lag` steps (events recorded) after its own; synchronize waits for it."""
    lag = 3
    clock = 0

    def __init__(self):
        LateEvent.clock += 1
        self.recorded = LateEvent.clock
        self.waited = False

    def query(self):
        return self.waited or LateEvent.clock - self.recorded >= self.lag

    def synchronize(self):
        self.waited = True


class Recorder:
    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(value.reshape(-1).tolist())

    def end(self):
        self.ended += 1


@pytest.fixture
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(**tiny_config(max_position_embeddings=128))
    return LlamaForCausalLM(cfg, dtype=torch.float32).eval()


def generate(model, ids, eos, streamer, async_):
    return model.generate(ids, max_new_tokens=24, eos_token_id=eos, pad_token_id=0, streamer=streamer)


def forced_async(monkeypatch):
    monkeypatch.setattr(decode_loop, "_overlaps", lambda device: True)
    monkeypatch.setattr(decode_loop, "_pinned", lambda shape, dtype: torch.zeros(shape, dtype=dtype))
    monkeypatch.setattr(decode_loop, "_new_event", LateEvent)


@pytest.mark.parametrize("batch", [1, 3])
def test_async_finish_check_and_stream_equal_the_synchronous_loop(model, monkeypatch, batch):
    ids = torch.randint(1, 128, (batch, 5), generator=torch.Generator().manual_seed(batch))
    free = model.generate(ids, max_new_tokens=24, eos_token_id=None)
    # eos: a token row 0 emits early, so generation really stops before max_new_tokens
    eos = int(free[0, 5 + 2])
    want_stream, got_stream = Recorder(), Recorder()
    want = generate(model, ids, eos, want_stream, False)
    assert want.shape[1] < 5 + 24 or batch > 1
    calls = []
    real_forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(1) or real_forward(*a, **k))
    forced_async(monkeypatch)
    got = generate(model, ids, eos, got_stream, True)
    assert torch.equal(got, want)
    assert got_stream.puts == want_stream.puts and got_stream.ended == want_stream.ended == 1
    if want.shape[1] < 5 + 24:
        # the late copies let the loop run past the finish (pad-only steps) and it was trimmed back
        assert len(calls) > want.shape[1] - 5


def test_without_eos_every_token_streams(model, monkeypatch):
    ids = torch.randint(1, 128, (2, 4), generator=torch.Generator().manual_seed(7))
    want_stream, got_stream = Recorder(), Recorder()
    want = model.generate(ids, max_new_tokens=6, eos_token_id=None, streamer=want_stream)
    forced_async(monkeypatch)
    got = model.generate(ids, max_new_tokens=6, eos_token_id=None, streamer=got_stream)
    assert torch.equal(got, want) and got_stream.puts == want_stream.puts
    assert len(got_stream.puts) == 1 + 6


def test_finish_watch_never_stops_early(monkeypatch):
    forced_async(monkeypatch)
    watch = decode_loop.FinishWatch(torch.device("cpu"))
    stops = [watch.update(torch.tensor([i < 4, False]), 10 + i) for i in range(10)]
    # all rows finished at i=4 (length 14); the host hears of it `lag` steps later, and not before
    assert stops.index(True) == 4 + LateEvent.lag
    assert watch.final_length(19) == 14


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_generate_through_the_static_decode_step_equals_forward(model, monkeypatch, backend):
    # What generate runs on CUDA (decode_step over the cache's capacity, eagerly), forced onto the CPU. The two
    # paths give the same logits to rounding (test_decode_step.py); token equality then holds unless a top-2
    # margin is within rounding, which this fixed seed's random model does not come near.
    from llama_fast import generation

    model.set_backend(backend)
    ids = torch.randint(1, 128, (3, 6), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[2, :2] = 0
    want = model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None)
    monkeypatch.setattr(generation, "STATIC_STEP_DEVICES", ("cuda", "cpu"))
    steps = []
    real = type(model).decode_step
    monkeypatch.setattr(type(model), "decode_step", lambda self, *a: steps.append(1) or real(self, *a))
    got = model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None)
    assert len(steps) == 11 and torch.equal(got, want)


class ReplayedStep:
    """A CUDA graph's semantics on the CPU: capture records the step once; replay reruns it reading the static
    input buffer and writing into the same output buffers (whose storage the caller keeps reading)."""

    def __init__(self, graphed, model):
        self.graphed, self.model, self.replays = graphed, model, 0

    def run(self):
        g = self.graphed
        logits = self.model.decode_step(g.tokens, g.cache, g.cos, g.sin)
        return logits, cuda_graphs.greedy_choice(logits)

    def replay(self):
        self.replays += 1
        logits, tokens = self.run()
        self.graphed.logits.copy_(logits)
        self.graphed.greedy_tokens.copy_(tokens)


def fake_capture(self, model):
    self.graph = ReplayedStep(self, model)
    self.logits, self.greedy_tokens = (t.clone() for t in self.graph.run())   # the "capture" (a step)
    self.cache.reset()


@pytest.mark.parametrize("do_sample", [False, True])
def test_generate_through_a_replayed_graph_equals_forward(model, monkeypatch, do_sample):
    # generate's CUDA-graph path on the CPU, with the graph replaced by ReplayedStep (same static buffers):
    # greedy takes its tokens from the graph's own argmax (GraphedDecode.greedy), sampling reads its logits.
    ids = torch.randint(1, 128, (3, 6), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[2, :2] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=12, eos_token_id=None, do_sample=do_sample, seed=3)
    want = model.generate(ids, **kwargs)
    monkeypatch.setattr(cuda_graphs, "supported", lambda m: None)
    monkeypatch.setattr(cuda_graphs.GraphedDecode, "_capture", fake_capture)
    greedy_calls = []
    real_greedy = cuda_graphs.GraphedDecode.greedy
    monkeypatch.setattr(cuda_graphs.GraphedDecode, "greedy",
                        lambda self, *a: greedy_calls.append(1) or real_greedy(self, *a))
    got = model.generate(ids, **kwargs)
    again = model.generate(ids, **kwargs)          # the same graph and cache, reset, serve a second call
    graphed = cuda_graphs._GRAPHS[model][3]
    assert torch.equal(got, want) and torch.equal(again, want)
    assert graphed.graph.replays == 2 * 11
    assert len(greedy_calls) == (0 if do_sample else 2 * 11)
    cuda_graphs.release(model)
