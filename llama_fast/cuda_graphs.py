"""generate's decode step on CUDA: LlamaForCausalLM.decode_step (static shapes, no host read) captured in a CUDA
graph once per batch size and replayed, so a step costs one launch instead of ~11 per layer. The graph ends with
the greedy choice (the first maximal logit of each row) into a static token buffer, so plain greedy decoding
replays embedding -> layers -> norm -> lm_head -> argmax as one graph. Sampling and logits processors read the
graph's logits buffer afterwards (a few kernels, no host read): processors such as the repetition penalty read the
growing output, which a static graph cannot, and a draw from the user's torch.Generator must advance that
generator's own state as eager sampling does, token for token.

A graph records device pointers, so everything it touches is static and owned here: the KV cache (capacity
rounded up to a power of two, at least 256, so one graph serves many generate calls), the input-token buffer,
the rope tables and the output logits. The cache is reset, not reallocated, by each generate call that uses it.
Before capture the step runs twice on a side stream: Triton autotuning, cuBLAS handles and workspace, lazy
plans and op resolution all happen there, not inside the capture. A graph is rebuilt when the weights change
(llama_fast.weights_version) and dropped with the model.

When a step cannot be captured (an op that syncs, an allocation pattern the capture refuses...) generate says why
once per model and runs the same static step eagerly. `generate(..., cuda_graphs=False)` turns graphs off.
"""
from __future__ import annotations

import warnings
import weakref

import torch

from llama_fast import _native, weights_version
from llama_fast.ops import cpu as _cpu_ops

MIN_CAPACITY = 256

# model -> {batch_size: GraphedDecode}; one per batch size (the latest capacity), so memory stays bounded.
_GRAPHS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_WARNED: "weakref.WeakSet" = weakref.WeakSet()


def capacity_for(total_tokens: int) -> int:
    capacity = MIN_CAPACITY
    while capacity < total_tokens:
        capacity *= 2
    return capacity


def supported(model) -> str | None:
    """Why `model`'s decode step cannot use graphs here, or None."""
    if model.device.type != "cuda":
        return f"CUDA graphs need a CUDA model, this one is on {model.device.type}"
    if getattr(model.model.rotary, "dynamic", False):
        return "dynamic NTK rope changes its tables with the longest position (not static)"
    return None


class GraphedDecode:
    """One captured decode step: logits [B, V] = model.decode_step(tokens [B, 1], cache), cache advanced."""

    def __init__(self, model, batch_size: int, capacity: int):
        self.version = weights_version.WeightsVersion()     # counts changes to this model's weights
        self.version.watch(model)
        self.built_at = self.version.count
        self.backends = _backends(model)
        self.cache = model.new_cache(batch_size, capacity)
        self.cos, self.sin = model.rope_tables(self.cache)
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=model.device)
        self.graph = None
        self.logits = None
        self.greedy_tokens = None
        self.error: str | None = None
        self._capture(model)

    def _capture(self, model) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):     # warm-up outside the capture: autotuning, cuBLAS, lazy set-up
                model.decode_step(self.tokens, self.cache, self.cos, self.sin)
        torch.cuda.current_stream().wait_stream(side)
        self.cache.reset()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.logits = model.decode_step(self.tokens, self.cache, self.cos, self.sin)
                self.greedy_tokens = greedy_choice(self.logits)
        except Exception as e:  # noqa: BLE001  (any capture failure means: run the same step eagerly)
            self.error = f"{type(e).__name__}: {e}"
            self.logits = self.greedy_tokens = None
            torch.cuda.synchronize()
        else:
            self.graph = graph
        self.cache.reset()

    def current(self, model) -> bool:
        return self.version.count == self.built_at and self.backends == _backends(model)

    def __call__(self, model, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of the next token after `tokens` [B, 1] (the graph's output buffer: read it before the
        next call)."""
        if self.graph is None:
            return model.decode_step(tokens, self.cache, self.cos, self.sin)
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits

    def greedy(self, model, tokens: torch.Tensor) -> torch.Tensor:
        """The greedy next tokens [B] after `tokens` [B, 1], chosen inside the graph (its output buffer: read it
        before the next call)."""
        if self.graph is None:
            return greedy_choice(model.decode_step(tokens, self.cache, self.cos, self.sin))
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.greedy_tokens


def greedy_choice(scores: torch.Tensor) -> torch.Tensor:
    """The first maximal index of each row of scores [B, V] (a NaN counting as the maximum): generate's greedy
    choice, in the graph or not. On the CPU llama_fast's argmax kernel gives the same index: ATen's reduction
    goes element by element (~1 ms for 8 rows of a 49K vocabulary, Zen 4) and, over several rows, forks ATen's
    OpenMP team, whose threads then spin on the cores the next decode step needs. Elsewhere max().indices
    (the same index as argmax, ~3x faster)."""
    if scores.device.type == "cpu" and scores.dim() == 2 and scores.dtype in _cpu_ops.DTYPES \
            and _native.extension() is not None:
        return torch.ops.llama_fast.cpu_argmax(scores)
    return scores.max(dim=-1).indices


def _backends(model) -> tuple:
    return tuple(getattr(m, "backend", None) for m in (model, model.model, model.model.layers[0]
                                                       if len(model.model.layers) else model))


def graphed_decode(model, batch_size: int, total_tokens: int) -> GraphedDecode:
    """The model's captured decode step for `batch_size` rows with room for `total_tokens`; its `.cache` is
    reset and ready for a prefill. Says once per model why, when the step could not be captured."""
    per_model = _GRAPHS.setdefault(model, {})
    graphed = per_model.get(batch_size)
    if graphed is None or graphed.cache.max_len < total_tokens or not graphed.current(model):
        per_model.pop(batch_size, None)          # free the old cache and graph before making new ones
        graphed = GraphedDecode(model, batch_size, capacity_for(total_tokens))
        per_model[batch_size] = graphed
        if graphed.error and model not in _WARNED:
            _WARNED.add(model)
            warnings.warn(f"llama_fast: the decode step could not be captured in a CUDA graph ({graphed.error}); "
                          "running it without graphs", RuntimeWarning, stacklevel=3)
    graphed.cache.reset()
    return graphed


def release(model) -> None:
    """Drops the model's graphs and their caches."""
    _GRAPHS.pop(model, None)
