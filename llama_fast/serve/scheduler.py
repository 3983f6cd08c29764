"""The continuous-batching scheduler: one thread owns the model and its KV cache of `max_batch` rows.

Between decode steps it admits queued requests into free rows: the new prompts are prefilled together (one
forward, left padded, into a staging cache whose rows are copied into theirs), each first token is sampled,
and from the next step on they decode together with the others. A decode step runs the rows
[0, highest busy row] as one batch of single tokens (StaticCache.rows: a view of those rows whose writes land
in the shared storage); every row attends to its own cache length (the cache keeps
per-row lengths, the attention kernels take per-row kv_lens), so requests at different lengths share a step.
A request leaves its row as soon as it finishes (eos, a stop string, max_tokens, or its client went away) and
the row takes the next request. Free rows below the highest busy one ride along with a dummy token and length 0
(wasted work, never read); new requests take the lowest free row to keep that range short. On the CPU a
batch wider than the fused decode kernels' row limit runs as consecutive forwards of at most that many rows
(`decode_rows`), each over its own contiguous slice of the cache.

The host keeps each row's length (the scheduler is the only writer), copies them into the cache before a step
and sets the view's seen_tokens to the longest, so the model never syncs with the device to plan a step.

Results go back through each request's `sink(event)` (called on this thread; the HTTP layer forwards them to
its event loop): a TokenEvent per new token, then exactly one FinishEvent.
"""
from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field

import torch

from llama_fast import _native
from llama_fast.ops import cpu_decode
from llama_fast.serve.detokenize import IncrementalText
from llama_fast.serve.sampling import RowSampler, SamplingParams, TokenChoice


class QueueFullError(RuntimeError):
    """More requests are waiting than max_queue allows."""


class SchedulerClosedError(RuntimeError):
    """The scheduler is stopping or stopped."""


@dataclass
class TokenEvent:
    text: str                        # newly released text (may be empty: held back, or a special token)
    choice: TokenChoice


@dataclass
class FinishEvent:
    reason: str                      # "stop", "length", "abort" (client gone / shutdown) or "error"
    prompt_tokens: int
    completion_tokens: int
    text: str = ""                   # the last released text
    error: str | None = None


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    sink: object                     # callable(event)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    id: int = field(default_factory=itertools.count().__next__)
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)


class _Row:
    """A request running in a row of the batch cache."""

    def __init__(self, request: Request, slot: int, sampler: RowSampler, text: IncrementalText):
        self.request, self.slot, self.sampler, self.text = request, slot, sampler, text
        self.length = 0                 # tokens in this row's cache
        self.next_token = 0             # the token the next decode step feeds
        self.generated = 0


class Scheduler:
    def __init__(self, model, tokenizer, max_batch: int = 8, max_queue: int = 64, max_seq_len: int | None = None,
                 eos_token_ids=None, prefill_budget: int = 4096, decode_rows: int | None = None,
                 prefill_chunk: int | None = None):
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_seq_len = int(min(max_seq_len or 2048, limit))
        if max_batch < 1 or max_queue < 0 or self.max_seq_len < 2:
            raise ValueError(f"max_batch must be >= 1, max_queue >= 0 and the context >= 2 tokens (got "
                             f"{max_batch}, {max_queue}, {self.max_seq_len})")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_budget = prefill_budget
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 tokens, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.vocab_size = model.config.vocab_size
        self.eos_token_ids = set(eos_token_ids if eos_token_ids is not None else _eos_ids(model, tokenizer))
        self._base = model if hasattr(model, "new_cache") else model.model
        self.cache = self._base.new_cache(max_batch, self.max_seq_len)
        self.decode_rows = decode_rows or _decode_rows(self.cache.device, max_batch)
        self._rows: list[_Row | None] = [None] * max_batch
        self._pending: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="llama-fast-scheduler", daemon=True)
        self.steps = 0                  # decode steps run (for tests and stats)
        self.max_rows_in_step = 0
        self.finished = collections.Counter()    # finish reasons so far

    # ---- the HTTP side (any thread) ----------------------------------------------------------------------

    def start(self) -> "Scheduler":
        self._thread.start()
        return self

    def submit(self, request: Request) -> None:
        if len(request.prompt_ids) + request.max_tokens > self.max_seq_len:
            raise ValueError(f"the prompt ({len(request.prompt_ids)} tokens) + max_tokens ({request.max_tokens}) "
                             f"exceed the context of {self.max_seq_len} tokens")
        with self._wake:
            if self._closing:
                raise SchedulerClosedError("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFullError(f"the server is busy: {len(self._pending)} requests are already waiting "
                                     f"(max_queue={self.max_queue}); retry later")
            self._pending.append(request)
            self._wake.notify()

    def cancel(self, request: Request) -> None:
        """The client went away: its row (or queue place) is freed before the next step."""
        request.cancelled = True
        with self._wake:
            self._wake.notify()

    def stop(self, timeout: float = 30.0) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def running(self) -> int:
        return sum(row is not None for row in self._rows)

    @property
    def waiting(self) -> int:
        return len(self._pending)

    # ---- the scheduler thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._closing and not self._pending and self.running == 0:
                        self._wake.wait()
                    if self._closing:
                        break
                try:
                    self._drop_cancelled()
                    self._admit()
                    if self.running:
                        self._decode_step()
                except Exception as e:     # a bug or a device error: fail what runs, keep serving
                    for row in self._rows:
                        if row is not None:
                            self._finish(row, "error", error=f"{type(e).__name__}: {e}")
        self._abort_all("the server is shutting down")

    def _drop_cancelled(self) -> None:
        with self._wake:
            gone = [r for r in self._pending if r.cancelled]
            for request in gone:
                self._pending.remove(request)
        for request in gone:
            _send(request, FinishEvent("abort", len(request.prompt_ids), 0))
        for row in self._rows:
            if row is not None and row.request.cancelled:
                self._finish(row, "abort")

    def _admit(self) -> None:
        """Moves queued requests into free rows: all that fit (rows, prefill_budget prompt tokens, and with
        prefill_chunk at most that many prompts; at least one) are prefilled together."""
        free = [i for i, row in enumerate(self._rows) if row is None]
        admitted, aborted, used = [], [], 0
        with self._wake:
            while free and self._pending:
                if self.prefill_chunk is not None and len(admitted) >= self.prefill_chunk:
                    break              # the next group waits for the next step: running rows keep decoding
                request = self._pending[0]
                if not request.cancelled and admitted and used + len(request.prompt_ids) > self.prefill_budget:
                    break
                self._pending.popleft()
                if request.cancelled:
                    aborted.append(request)
                    continue
                admitted.append((request, free.pop(0)))
                used += len(request.prompt_ids)
        for request in aborted:
            _send(request, FinishEvent("abort", len(request.prompt_ids), 0))
        if admitted:
            self._prefill(admitted)

    def _prefill(self, admitted: list) -> None:
        """One forward over the new prompts (left padded) into a staging cache, whose rows are then copied into
        the requests' rows of the batch cache (the staging cache stores each prompt compactly from slot 0, as
        the batch cache does). One forward, not one per prompt: the weights are read once for all of them.
        With prefill_chunk, at most that many prompts come at once (see _admit) and their columns go through in
        chunks of at most prefill_chunk tokens in all (for kernels that are fast only up to a number of rows;
        a chunk's pads are still leading ones)."""
        rows = []
        for request, slot in admitted:
            sampler = RowSampler(request.sampling, request.prompt_ids, self.vocab_size, self.cache.device)
            row = _Row(request, slot, sampler, IncrementalText(self.tokenizer, request.stop))
            self._rows[slot] = row
            rows.append(row)
        lengths = [len(row.request.prompt_ids) for row in rows]
        width = max(lengths)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - lengths[i]:] = torch.tensor(row.request.prompt_ids)
            mask[i, width - lengths[i]:] = 1
        device = self.cache.device
        ids, mask = ids.to(device), mask.to(device)
        # columns per forward: all of them, or as many as keep rows x columns within prefill_chunk
        step = width if self.prefill_chunk is None else max(1, self.prefill_chunk // len(rows))
        try:
            staging = self._base.new_cache(len(rows), width)
            for col in range(0, width, step):
                chunk_mask = mask[:, col:col + step]
                out = self.model(ids[:, col:col + step], past_key_values=staging, use_cache=True, logits_to_keep=1,
                                 attention_mask=None if bool(chunk_mask.all()) else chunk_mask)
        except Exception as e:         # e.g. out of memory: these requests fail, the running ones go on
            for row in rows:
                self._finish(row, "error", error=f"prefill failed: {type(e).__name__}: {e}")
            return
        for i, (row, n) in enumerate(zip(rows, lengths)):
            for layer in range(self.cache.num_layers):
                self.cache.k[layer][row.slot, :n] = staging.k[layer][i, :n]
                self.cache.v[layer][row.slot, :n] = staging.v[layer][i, :n]
            row.length = n
        logits = out.logits[:, -1].float()
        for i, row in enumerate(rows):
            self._advance(row, logits[i])

    def _decode_step(self) -> None:
        busy = [row for row in self._rows if row is not None]
        top = max(row.slot for row in busy) + 1
        tokens = [0] * top
        lengths = [0] * top
        for row in busy:
            tokens[row.slot] = row.next_token
            lengths[row.slot] = row.length
        logits = [None] * top
        for start in range(0, top, self.decode_rows):
            stop = min(top, start + self.decode_rows)
            if not any(lengths[start:stop]):
                continue                   # only free rows here
            view = self.cache.rows(start, stop)
            view.lengths.copy_(torch.tensor(lengths[start:stop], dtype=torch.int32))
            view.seen_tokens = max(lengths[start:stop])
            ids = torch.tensor(tokens[start:stop], dtype=torch.long, device=self.cache.device)[:, None]
            try:
                out = self.model(ids, past_key_values=view, use_cache=True, logits_to_keep=1)
            except Exception as e:         # e.g. out of memory: fail the batch, keep serving
                for row in busy:
                    self._finish(row, "error", error=f"decode failed: {e}")
                return
            logits[start:stop] = out.logits[:, -1].float().unbind(0)
        self.steps += 1
        self.max_rows_in_step = max(self.max_rows_in_step, len(busy))
        for row in busy:
            row.length += 1
            self._advance(row, logits[row.slot])

    def _advance(self, row: _Row, logits: torch.Tensor) -> None:
        """Samples the row's next token from its logits, hands it to the client, and finishes the row when
        the request is done."""
        request = row.request
        choice = row.sampler.choose(logits)
        row.generated += 1
        row.next_token = choice.token
        is_eos = choice.token in self.eos_token_ids and not request.ignore_eos
        text = "" if is_eos else row.text.add(choice.token)
        _send(request, TokenEvent(text, choice))
        if is_eos or row.text.stopped:
            self._finish(row, "stop")
        elif row.generated >= request.max_tokens:
            self._finish(row, "length")

    def _finish(self, row: _Row, reason: str, error: str | None = None) -> None:
        self._rows[row.slot] = None
        self.finished[reason] += 1
        tail = row.text.flush() if reason in ("stop", "length") else ""
        _send(row.request, FinishEvent(reason, len(row.request.prompt_ids), row.generated, tail, error))

    def _abort_all(self, message: str) -> None:
        for row in self._rows:
            if row is not None:
                self._finish(row, "abort", error=message)
        with self._wake:
            pending, self._pending = list(self._pending), collections.deque()
        for request in pending:
            _send(request, FinishEvent("abort", len(request.prompt_ids), 0, error=message))


def _send(request: Request, event) -> None:
    try:
        request.sink(event)
    except Exception:       # a sink whose client is gone must not stop the scheduler
        pass


def _decode_rows(device: torch.device, max_batch: int) -> int:
    """Rows per decode forward. On the CPU, the fused decode stack takes up to cpu_decode.max_rows() rows in one
    pass over the weights; a larger batch runs as several such passes (beyond that many rows, quantized
    linears without the VNNI kernels dequantize whole weight matrices per call: far slower per step; a dense
    model would do as well or better in one forward, which `decode_rows=max_batch` asks for).
    Elsewhere the whole batch is one forward."""
    if device.type != "cpu" or _native.extension() is None:
        return max_batch
    return min(max_batch, cpu_decode.max_rows())


def _eos_ids(model, tokenizer) -> set:
    ids = set()
    gen_config = getattr(model, "generation_config", None) or {}
    if not isinstance(gen_config, dict):
        gen_config = gen_config.to_dict() if hasattr(gen_config, "to_dict") else vars(gen_config)
    for value in (gen_config.get("eos_token_id"), getattr(model.config, "eos_token_id", None),
                  getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids
