"""The continuous-batching scheduler: one thread owns the model and its KV cache of `max_batch` rows.

Every step of the scheduler thread does two things with the rows of the batch cache:

- a decode step (after the prefill below): every row whose prompt is in its cache feeds its last token; the
  rows [0, highest such row] run as one batch of single tokens (StaticCache.rows: a view of those rows whose
  writes land in the shared storage); every row attends to its own cache length (the cache keeps per-row
  lengths, the attention kernels take per-row kv_lens), so requests at different lengths share a step. Rows
  inside that range that are not decoding (free, or still prefilling) ride along masked out: their token is a
  pad, which writes no key and leaves their length as it is (wasted work, never read); new requests take the
  lowest free row to keep the range short.
- chunked prefill: queued requests take free rows at once, and their prompts go into their rows' caches in
  chunks of at most `prefill_chunk` tokens per step (oldest requests first). So new requests never stall the
  running ones for longer than one bounded step: those keep emitting a token every step while they prefill.
  When a prompt's last chunk is in, its first token is sampled from that chunk's logits.

Mixed steps (on the CPU, where the fused decode stack skips pads and runs any batch of up to
cpu_decode.max_rows() real tokens in one pass over the weights): the decoding rows' next tokens and the prompt
chunks go into the same forward, each row right-aligned in a [rows, width] batch (left pads: no key written,
length kept, no compute), so a joining prompt costs its chunk's share of one pass over the weights instead of a
second forward. The prompt tokens of a mixed step are bounded by the step's token budget too: they fill the
step up to the next multiple of `step_tokens` (16: the AMX GEMM's tile height) and no further, at least one, so
that a joining prompt never makes a step spill into one more tile (a step costs about the same from 9 to 16
tokens, half again as much from 17 on, and every running request waits for the whole step: bench_serve's
inter-token p99). A forward holds at most `decode_rows` real tokens; more run as consecutive forwards over
consecutive row ranges. Elsewhere (a GPU computes the pads too) the chunks go in a forward of their own,
at most `prefill_chunk` tokens pads included, before the decode step of the rows whose prompts are in.
When no row is decoding nobody waits, and a prefill forward may hold up to `prefill_budget` tokens.

A request leaves its row as soon as it finishes (eos, a stop string, max_tokens, or its client went away) and
the row takes the next request. On the CPU a batch wider than the fused decode stack's row limit runs as
consecutive forwards of at most that many tokens (`decode_rows`), each over its own contiguous slice of the cache.

The host keeps each row's length (the scheduler is the only writer), copies them into the cache before a step
and sets the view's seen_tokens to the longest, so the model never syncs with the device to plan a step.

The tokens of a step are chosen together (sampling.choose_rows: one argmax and one log-softmax over the
step's logits for the greedy rows, each seeded or penalized row on its own), then each row's text is released.

Results go back through each request's `sink(event)`: a TokenEvent per new token, then exactly one
FinishEvent. The sinks are called on this thread once a step's sampling and text are done, not row by row: a
sink wakes the HTTP layer's event loop, whose work would otherwise contend with the rest of the step for the
interpreter lock (the HTTP layer forwards the events to its loop).
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
from llama_fast.serve.sampling import RowSampler, SamplingParams, TokenChoice, choose_rows


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
        self.prefilled = 0              # prompt tokens in this row's cache
        self.next_token = 0             # the token the next decode step feeds
        self.generated = 0

    @property
    def decoding(self) -> bool:
        """Whether the whole prompt is in the cache (the row then takes part in decode steps)."""
        return self.prefilled == len(self.request.prompt_ids)


class Scheduler:
    def __init__(self, model, tokenizer, max_batch: int = 8, max_queue: int = 64, max_seq_len: int | None = None,
                 eos_token_ids=None, prefill_budget: int = 4096, decode_rows: int | None = None,
                 prefill_chunk: int | None = None, mixed_steps: bool | None = None, step_tokens: int | None = None):
        """prefill_chunk: prompt tokens prefilled per step while other rows decode (default: _prefill_chunk);
        prefill_budget: per step while none decodes (nobody waits then); mixed_steps: prompt chunks ride in the
        decode forward (default: where the model skips pads, see the top of this file); step_tokens: a mixed
        step's tokens (decoding rows + prompt chunks) stay within the smallest multiple of step_tokens that
        holds the decoding rows and one prompt token (default: _step_tokens)."""
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_seq_len = int(min(max_seq_len or 2048, limit))
        if max_batch < 1 or max_queue < 0 or self.max_seq_len < 2:
            raise ValueError(f"max_batch must be >= 1, max_queue >= 0 and the context >= 2 tokens (got "
                             f"{max_batch}, {max_queue}, {self.max_seq_len})")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 tokens, got {prefill_chunk}")
        if step_tokens is not None and step_tokens < 1:
            raise ValueError(f"step_tokens must be >= 1 tokens, got {step_tokens}")
        self.vocab_size = model.config.vocab_size
        self.eos_token_ids = set(eos_token_ids if eos_token_ids is not None else _eos_ids(model, tokenizer))
        self._base = model if hasattr(model, "new_cache") else model.model
        self._stack = getattr(model, "model", model)       # the decoder stack without the head
        self.cache = self._base.new_cache(max_batch, self.max_seq_len)
        self.decode_rows = decode_rows or _decode_rows(self.cache.device, max_batch)
        self.prefill_chunk = prefill_chunk or _prefill_chunk(self.cache.device)
        self.prefill_budget = max(prefill_budget, self.prefill_chunk)
        self.step_tokens = step_tokens or _step_tokens(self.cache.device)
        self.mixed_steps = _skips_pads(self.cache.device) if mixed_steps is None else bool(mixed_steps)
        self._rows: list[_Row | None] = [None] * max_batch
        self._pending: collections.deque[Request] = collections.deque()
        self._outbox: list = []                  # (request, event) not yet handed to its sink (_deliver)
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
                        self._step()
                except Exception as e:     # a bug or a device error: fail what runs, keep serving
                    for row in self._rows:
                        if row is not None:
                            self._finish(row, "error", error=f"{type(e).__name__}: {e}")
                finally:
                    self._deliver()
        self._abort_all("the server is shutting down")
        self._deliver()

    def _drop_cancelled(self) -> None:
        with self._wake:
            gone = [r for r in self._pending if r.cancelled]
            for request in gone:
                self._pending.remove(request)
        for request in gone:
            self._send(request, FinishEvent("abort", len(request.prompt_ids), 0))
        for row in self._rows:
            if row is not None and row.request.cancelled:
                self._finish(row, "abort")

    def _admit(self) -> None:
        """Moves queued requests into free rows (lowest first); their prompts go in chunk by chunk (_step)."""
        free = [i for i, row in enumerate(self._rows) if row is None]
        admitted, aborted = [], []
        with self._wake:
            while free and self._pending:
                request = self._pending.popleft()
                if request.cancelled:
                    aborted.append(request)
                    continue
                admitted.append((request, free.pop(0)))
        for request in aborted:
            self._send(request, FinishEvent("abort", len(request.prompt_ids), 0))
        for request, slot in admitted:
            sampler = RowSampler(request.sampling, request.prompt_ids, self.vocab_size, self.cache.device)
            self._rows[slot] = _Row(request, slot, sampler, IncrementalText(self.tokenizer, request.stop))

    def _step(self) -> None:
        """One forward of the next prompt chunks (bounded by prefill_chunk while rows decode), then a decode step
        of the rows whose prompts are in (including any whose last chunk just went in)."""
        busy = [row for row in self._rows if row is not None]
        prefilling = sorted((row for row in busy if not row.decoding), key=lambda row: row.request.id)
        if self.mixed_steps and len(prefilling) < len(busy):
            self._mixed_step([row for row in busy if row.decoding], prefilling)
            return
        if prefilling:
            others_decode = len(prefilling) < len(busy)
            self._prefill_chunks(prefilling, self.prefill_chunk if others_decode else self.prefill_budget)
            self._deliver()                # first tokens go out before the decode forward
        decoding = [row for row in self._rows if row is not None and row.decoding]
        if decoding:
            self._decode_step(decoding)

    def _prefill_chunks(self, prefilling: list, area: int) -> None:
        """The next prompt chunks of the oldest prefilling requests in one forward over their contiguous rows
        [lo, hi], each chunk right-aligned in a [hi - lo + 1, width] batch (left pads: no key written, length
        kept; rows of that range not in the group are all pads). The batch's area, pads included, stays within
        `area` tokens (at least the oldest request's next token): one forward, so its cost is bounded however
        many requests join at once. After a prompt's last chunk its first token is sampled from its logits."""
        first = prefilling[0]
        remaining = lambda row: len(row.request.prompt_ids) - row.prefilled  # noqa: E731
        group, lo, hi, width = [first], first.slot, first.slot, max(1, min(remaining(first), area))
        for row in prefilling[1:]:
            new_lo, new_hi = min(lo, row.slot), max(hi, row.slot)
            new_width = max(width, min(remaining(row), area))
            if (new_hi - new_lo + 1) * new_width <= area:
                group.append(row)
                lo, hi, width = new_lo, new_hi, new_width
        chunks = {row.slot: min(remaining(row), width) for row in group}
        ids = torch.zeros(hi - lo + 1, width, dtype=torch.long)
        mask = torch.zeros(hi - lo + 1, width, dtype=torch.long)
        # the other rows of the range are all pads with length 0 here (keys read: none); their real lengths are
        # the host's, copied into the cache before each decode step
        lengths = [0] * (hi - lo + 1)
        for row in group:
            lengths[row.slot - lo] = row.length
        for row in group:
            n = chunks[row.slot]
            ids[row.slot - lo, width - n:] = torch.tensor(row.request.prompt_ids[row.prefilled:row.prefilled + n])
            mask[row.slot - lo, width - n:] = 1
        device = self.cache.device
        view = self.cache.rows(lo, hi + 1)
        view.lengths.copy_(torch.tensor(lengths, dtype=torch.int32))
        view.seen_tokens = max(lengths)
        finishing = [row for row in group if row.prefilled + chunks[row.slot] == len(row.request.prompt_ids)]
        ids, mask = ids.to(device), mask.to(device)
        mask_arg = None if bool(mask.all()) else mask
        try:
            if finishing:
                out = self.model(ids, past_key_values=view, use_cache=True, logits_to_keep=1, attention_mask=mask_arg)
            else:     # no prompt ends here: no head
                self._stack(ids, past_key_values=view, use_cache=True, attention_mask=mask_arg)
        except Exception as e:         # e.g. out of memory: these requests fail, the running ones go on
            for row in group:
                self._finish(row, "error", error=f"prefill failed: {type(e).__name__}: {e}")
            return
        for row in group:
            row.prefilled += chunks[row.slot]
            row.length = row.prefilled
        if finishing:
            self._advance(finishing, out.logits[:, -1].float(), [row.slot - lo for row in finishing])

    def _decode_step(self, decoding: list) -> None:
        top = max(row.slot for row in decoding) + 1
        tokens = [0] * top
        lengths = [0] * top
        live = [0] * top                   # 1 for the rows that decode, 0 for free and prefilling ones (pads)
        for row in self._rows[:top]:
            if row is not None:
                lengths[row.slot] = row.length
        for row in decoding:
            tokens[row.slot] = row.next_token
            live[row.slot] = 1
        results = []                       # (the rows' logits, its first row) per forward
        for start in range(0, top, self.decode_rows):
            stop = min(top, start + self.decode_rows)
            if not any(live[start:stop]):
                continue                   # no decoding row here
            view = self.cache.rows(start, stop)
            view.lengths.copy_(torch.tensor(lengths[start:stop], dtype=torch.int32))
            view.seen_tokens = max(lengths[start:stop])
            device = self.cache.device
            ids = torch.tensor(tokens[start:stop], dtype=torch.long, device=device)[:, None]
            # a pad (mask 0) writes no key and leaves its row's length: a prefilling row's cache stays intact
            mask = None if all(live[start:stop]) else torch.tensor(live[start:stop], device=device)[:, None]
            try:
                out = self.model(ids, past_key_values=view, use_cache=True, logits_to_keep=1, attention_mask=mask)
            except Exception as e:         # e.g. out of memory: fail the batch, keep serving
                for row in decoding:
                    self._finish(row, "error", error=f"decode failed: {e}")
                return
            results.append((out.logits[:, -1].float(), start))
        self.steps += 1
        self.max_rows_in_step = max(self.max_rows_in_step, len(decoding))
        for row in decoding:
            row.length += 1
        for logits, start in results:
            rows = [row for row in decoding if start <= row.slot < start + logits.shape[0]]
            self._advance(rows, logits, [row.slot - start for row in rows])

    def _mixed_step(self, decoding: list, prefilling: list) -> None:
        """One step of mixed forwards: every decoding row's next token and the next prompt chunks of the oldest
        prefilling requests (`prefill_chunk` tokens in all), rows in slot order, cut into forwards of at most
        `decode_rows` real tokens over consecutive rows (a row's tokens are never split). Rows of a forward's range
        that take no part are all pads. Then the decoding rows' tokens, then the first tokens of the prompts that
        are now in."""
        budget, chunks = self._prompt_tokens_beside(len(decoding)), {}
        for row in prefilling:
            if budget == 0:
                break
            chunks[row.slot] = min(len(row.request.prompt_ids) - row.prefilled, budget)
            budget -= chunks[row.slot]
        rows = sorted(decoding + [row for row in prefilling if row.slot in chunks], key=lambda row: row.slot)
        forwards, tokens = [[]], 0
        for row in rows:
            n = chunks.get(row.slot, 1)
            if forwards[-1] and tokens + n > self.decode_rows:
                forwards.append([])
                tokens = 0
            forwards[-1].append(row)
            tokens += n
        results = [(group, self._mixed_forward(group, chunks)) for group in forwards]
        self.steps += 1
        self.max_rows_in_step = max(self.max_rows_in_step, len(decoding))
        for group, logits in results:
            if logits is None:
                continue                   # failed: its requests are finished already
            lo = group[0].slot
            decoded = [row for row in group if row.slot not in chunks]
            for row in decoded:
                row.length += 1
            prompts_in = []
            for row in group:
                if row.slot in chunks:
                    row.prefilled += chunks[row.slot]
                    row.length = row.prefilled
                    if row.decoding:
                        prompts_in.append(row)
            # the running rows' tokens first, then the first tokens of the prompts that are now in
            rows = decoded + prompts_in
            self._advance(rows, logits, [row.slot - lo for row in rows])

    def _prompt_tokens_beside(self, decoding: int) -> int:
        """Prompt tokens that join a mixed step of `decoding` rows: at most prefill_chunk, and no more than fill
        the step up to the next multiple of step_tokens (at least one, so that prompts always progress). A
        step's cost grows in steps of tokens (on the CPU the quantized GEMM works on tiles of 16 rows), and
        every running request waits for the whole step: a step that spills into one more tile for a prompt
        chunk is a long gap for all of them (bench_serve's inter-token p99)."""
        room = -(-(decoding + 1) // self.step_tokens) * self.step_tokens - decoding
        return min(self.prefill_chunk, room)

    def _mixed_forward(self, group: list, chunks: dict) -> dict:
        """One forward over the rows [first, last] of `group` (each right-aligned: a decoding row's next token, or a
        prefilling row's chunk of chunks[slot] prompt tokens). -> the last-token logits of the rows [first, last],
        or None after failing the group's requests."""
        lo, hi = group[0].slot, group[-1].slot
        feed = {row.slot: ([row.next_token] if row.slot not in chunks else
                           row.request.prompt_ids[row.prefilled:row.prefilled + chunks[row.slot]]) for row in group}
        width = max(len(tokens) for tokens in feed.values())
        ids = torch.zeros(hi - lo + 1, width, dtype=torch.long)
        mask = torch.zeros(hi - lo + 1, width, dtype=torch.long)
        for slot, tokens in feed.items():
            ids[slot - lo, width - len(tokens):] = torch.tensor(tokens)
            mask[slot - lo, width - len(tokens):] = 1
        # every row of the range keeps its length (pads write nothing): the host's lengths, 0 for free rows
        lengths = [row.length if row is not None else 0 for row in self._rows[lo:hi + 1]]
        view = self.cache.rows(lo, hi + 1)
        view.lengths.copy_(torch.tensor(lengths, dtype=torch.int32))
        view.seen_tokens = max(lengths)
        device = self.cache.device
        mask_arg = None if bool(mask.all()) else mask.to(device)
        try:
            out = self.model(ids.to(device), past_key_values=view, use_cache=True, logits_to_keep=1,
                             attention_mask=mask_arg)
        except Exception as e:         # e.g. out of memory: these requests fail, the others go on
            for row in group:
                self._finish(row, "error", error=f"step failed: {type(e).__name__}: {e}")
            return None
        return out.logits[:, -1].float()

    def _advance(self, rows: list, logits: torch.Tensor, index: list[int]) -> None:
        """Samples each row's next token from logits[index[i]] (one batched choice for the step's rows), hands
        it to the client, and finishes the rows whose requests are done."""
        for row, choice in zip(rows, choose_rows([row.sampler for row in rows], logits, index)):
            self._hand_out(row, choice)

    def _hand_out(self, row: _Row, choice: TokenChoice) -> None:
        request = row.request
        row.generated += 1
        row.next_token = choice.token
        is_eos = choice.token in self.eos_token_ids and not request.ignore_eos
        text = "" if is_eos else row.text.add(choice.token)
        self._send(request, TokenEvent(text, choice))
        if is_eos or row.text.stopped:
            self._finish(row, "stop")
        elif row.generated >= request.max_tokens:
            self._finish(row, "length")

    def _finish(self, row: _Row, reason: str, error: str | None = None) -> None:
        self._rows[row.slot] = None
        self.finished[reason] += 1
        tail = row.text.flush() if reason in ("stop", "length") else ""
        self._send(row.request, FinishEvent(reason, len(row.request.prompt_ids), row.generated, tail, error))

    def _send(self, request: Request, event) -> None:
        """Queues an event for its request's sink; _deliver hands them out (after the step's Python work)."""
        self._outbox.append((request, event))

    def _deliver(self) -> None:
        """Calls the sinks with the events queued so far, in order. Done once the step's sampling and text are
        done rather than per row: a sink wakes the HTTP event loop, whose work would otherwise contend with the
        rest of the step for the interpreter lock (and on a small CPU, for the cores)."""
        outbox, self._outbox = self._outbox, []
        for request, event in outbox:
            try:
                request.sink(event)
            except Exception:       # a sink whose client is gone must not stop the scheduler
                pass

    def _abort_all(self, message: str) -> None:
        for row in self._rows:
            if row is not None:
                self._finish(row, "abort", error=message)
        with self._wake:
            pending, self._pending = list(self._pending), collections.deque()
        for request in pending:
            self._send(request, FinishEvent("abort", len(request.prompt_ids), 0, error=message))




def _decode_rows(device: torch.device, max_batch: int) -> int:
    """Tokens per decode forward (one per decoding row, plus the prompt chunks of a mixed step). On the CPU, the
    fused decode stack takes up to cpu_decode.max_rows() tokens in one pass over the weights; a larger batch runs
    as several such passes (beyond that many rows, quantized linears dequantize whole weight matrices per call
    for a GEMM). Elsewhere the whole batch is one forward."""
    if not _skips_pads(device):
        return max_batch
    return cpu_decode.max_rows()


def _skips_pads(device: torch.device) -> bool:
    """Whether the model's forward skips left pads (the CPU's fused decode stack, cpu_decode): then a padded
    [rows, width] step costs its real tokens only, and prompt chunks can ride in the decode forward."""
    return device.type == "cpu" and _native.extension() is not None


def _prefill_chunk(device: torch.device) -> int:
    """Prompt tokens (pads included) per step while rows decode. On the CPU, where a batched step's cost grows
    with its rows (the FMA work), 16: a chunk costs about as much as a decode step of 16 rows. On a GPU a chunk
    of 512 costs about as much as a decode step."""
    if device.type != "cpu" or _native.extension() is None:
        return 512
    return 16


def _step_tokens(device: torch.device) -> int:
    """The granule of a mixed step's tokens (see Scheduler._prompt_tokens_beside). 16 on the CPU: the AMX
    quantized GEMM's tile height (a step of 17 tokens costs about as much as one of 32, one of 9 about as much
    as one of 16), and on CPUs without AMX a step of 16 tokens is still one bounded pass over the weights."""
    return 16


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
