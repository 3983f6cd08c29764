"""Per-request sampling in a shared batch: each row of the decode batch picks its next token from its own
logits with its own settings and its own random generator (so a seeded request draws the same tokens whatever
else is in the batch).

Order, as in generate(): repetition penalty (transformers', over prompt and output), then OpenAI's presence /
frequency penalties (over the output only: logit -= presence * [count > 0] + frequency * count), then, when
temperature > 0, the warpers temperature, top-k, top-p, min-p and a multinomial draw; temperature 0 is greedy
(argmax, the same first index as generate()'s).

Log-probabilities reported to the client are those of the model's own distribution (log-softmax of the raw
logits), before any penalty or warper, as vLLM reports them by default.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from llama_fast import logits_process
from llama_fast.cuda_graphs import greedy_choice


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                  # 0: off
    min_p: float = 0.0              # 0: off
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: bool = False
    top_logprobs: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class TokenChoice:
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)    # (token, logprob), most likely first


class RowSampler:
    """The sampling state of one request: its settings, its generator, the tokens it has produced."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab_size: int, device):
        self.params = params
        self.vocab_size = vocab_size
        self.prompt_ids = prompt_ids
        self.output_ids: list[int] = []
        self.generator = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else random.randrange(2 ** 63)
            self.generator = torch.Generator(device=device).manual_seed(seed)
        self.warpers = [] if params.greedy else logits_process.warpers(
            params.temperature, params.top_k or None, params.top_p, params.min_p or None)

    def _penalized(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        scores = logits
        if p.repetition_penalty != 1.0:
            seen = torch.tensor([self.prompt_ids + self.output_ids], device=logits.device)
            scores = logits_process.RepetitionPenalty(p.repetition_penalty)(seen, scores[None])[0]
        if (p.presence_penalty or p.frequency_penalty) and self.output_ids:
            counts = torch.bincount(torch.tensor(self.output_ids, device=logits.device),
                                    minlength=self.vocab_size)[:scores.shape[-1]].to(scores.dtype)
            scores = scores - p.presence_penalty * (counts > 0).to(scores.dtype) - p.frequency_penalty * counts
        return scores

    @property
    def plain_greedy(self) -> bool:
        """Greedy without penalties: the token is the argmax of the raw logits."""
        p = self.params
        return p.greedy and p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty

    def pick(self, logits: torch.Tensor) -> int:
        """The next token from this row's logits [V] (fp32), penalties and warpers applied; not recorded."""
        scores = self._penalized(logits)
        if self.generator is None:
            return int(scores.max(dim=-1).indices)
        scores = logits_process.apply(self.warpers, None, scores[None])
        probs = scores.softmax(dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator)[0, 0])

    def choose(self, logits: torch.Tensor) -> TokenChoice:
        """The next token from this row's logits [V] (fp32)."""
        return choose_rows([self], logits[None], [0])[0]


def choose_rows(samplers: list[RowSampler], logits: torch.Tensor, rows: list[int]) -> list[TokenChoice]:
    """The next token of each request of a step: samplers[i] picks from logits[rows[i]] (logits: [R, V] fp32,
    rows distinct). The greedy rows without penalties take one argmax over the batch, and the log-probabilities
    come from one log-softmax over the batch (a row's result does not depend on the others': each row is
    reduced on its own), so a step's sampling costs a few batched ops, not a few ops per request. The other
    rows (penalties, temperature) pick on their own, with their own generators."""
    tokens = [0] * len(samplers)
    plain = [i for i, sampler in enumerate(samplers) if sampler.plain_greedy]
    if plain:
        argmax = greedy_choice(logits).tolist()
        for i in plain:
            tokens[i] = argmax[rows[i]]
    for i, sampler in enumerate(samplers):
        if not sampler.plain_greedy:
            tokens[i] = sampler.pick(logits[rows[i]])
    choices = [TokenChoice(token) for token in tokens]
    wanting = [i for i, sampler in enumerate(samplers) if sampler.params.logprobs]
    if wanting:
        logprobs = torch.log_softmax(logits, dim=-1)
        picked = logprobs[[rows[i] for i in wanting], [tokens[i] for i in wanting]].tolist()
        for i, value in zip(wanting, picked):
            choices[i].logprob = value
            top_n = samplers[i].params.top_logprobs
            if top_n:
                top = torch.topk(logprobs[rows[i]], min(top_n, logprobs.shape[-1]))
                choices[i].top = list(zip(top.indices.tolist(), top.values.tolist()))
    for sampler, token in zip(samplers, tokens):
        sampler.output_ids.append(token)
    return choices
