"""The logits processors of generate(), with transformers' semantics and order.

Each processor is a callable `(input_ids [B, L], scores [B, V] fp32) -> scores`, the protocol of transformers'
LogitsProcessor, so a user's list (ours or transformers' classes) runs through the same loop. `build_processors`
assembles them as transformers' generate does: repetition penalty, bad words, min length / min new tokens, then
the user's processors, then (sampling only) the warpers temperature, top-k, top-p, min-p.

The server applies the same functions row by row with each request's own settings (llama_fast.serve.sampling).
"""
from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")


class RepetitionPenalty:
    """Every token already in input_ids (the prompt's real tokens and the generated ones) has its score divided
    by `penalty` when positive, multiplied by it when negative (CTRL's rule, once per distinct token).
    `skip` [B]: leading columns to ignore per row (left padding)."""

    def __init__(self, penalty: float, skip: torch.Tensor | None = None):
        if not isinstance(penalty, (int, float)) or not penalty > 0:
            raise ValueError(f"repetition_penalty must be a float > 0, got {penalty!r}")
        self.penalty = float(penalty)
        self.skip = skip

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        vocab = scores.shape[-1]
        ids = input_ids
        if self.skip is not None:
            columns = torch.arange(ids.shape[1], device=ids.device)
            ids = ids.masked_fill(columns[None, :] < self.skip.to(ids.device)[:, None], vocab)
        # ids >= vocab (the skipped columns, or an embedding table larger than the head) land in a spare column
        ids = ids.clamp(max=vocab)
        padded = torch.nn.functional.pad(scores, (0, 1))
        seen = padded.gather(1, ids)
        seen = torch.where(seen < 0, seen * self.penalty, seen / self.penalty)
        return padded.scatter(1, ids, seen)[:, :vocab]


class SuppressUntilLength:
    """min_length / min_new_tokens: the eos ids score -inf while the sequence (input_ids' width) is shorter
    than `min_length` columns."""

    def __init__(self, min_length: int, eos: torch.Tensor):
        self.min_length = int(min_length)
        self.eos = eos

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] >= self.min_length:
            return scores
        is_eos = torch.isin(torch.arange(scores.shape[-1], device=scores.device), self.eos.to(scores.device))
        return scores.masked_fill(is_eos, NEG_INF)


class BadWords:
    """A banned sequence of n tokens gets -inf on its last token wherever the row ends with its first n - 1
    (a one-token sequence is always banned). Sequences that are exactly one eos token are dropped, as in
    transformers (banning eos belongs to min_new_tokens)."""

    def __init__(self, bad_words_ids, eos: torch.Tensor | None = None):
        if not isinstance(bad_words_ids, (list, tuple)) or not bad_words_ids:
            raise ValueError(f"bad_words_ids must be a non-empty list of lists of token ids, got {bad_words_ids!r}")
        words = []
        for word in bad_words_ids:
            if not isinstance(word, (list, tuple)) or not word or \
                    not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in word):
                raise ValueError(f"bad_words_ids must be a list of non-empty lists of token ids >= 0, got {word!r}")
            words.append(tuple(word))
        eos_ids = set() if eos is None else set(eos.tolist())
        self.single = sorted({w[0] for w in words if len(w) == 1 and w[0] not in eos_ids})
        self.longer = sorted({w for w in words if len(w) > 1})

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        vocab = scores.shape[-1]
        out_of_range = [t for w in [tuple(self.single)] + self.longer for t in w if t >= vocab]
        if out_of_range:
            raise ValueError(f"bad_words_ids holds token ids {sorted(set(out_of_range))} outside the vocabulary "
                             f"of {vocab}")
        banned = torch.zeros_like(scores, dtype=torch.bool)
        if self.single:
            banned[:, self.single] = True
        for word in self.longer:
            prefix = len(word) - 1
            if prefix > input_ids.shape[1]:
                continue
            tail = torch.tensor(word[:-1], device=input_ids.device)
            rows = (input_ids[:, -prefix:] == tail).all(dim=-1)
            banned[:, word[-1]] |= rows.to(banned.device)
        return scores.masked_fill(banned, NEG_INF)


class Temperature:
    def __init__(self, temperature: float):
        self.temperature = float(temperature)

    def __call__(self, input_ids, scores):
        return scores / self.temperature


class TopK:
    """Keeps the k highest scores of each row (ties with the k-th kept too)."""

    def __init__(self, top_k: int):
        self.top_k = int(top_k)

    def __call__(self, input_ids, scores):
        kth = torch.topk(scores, min(self.top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        return scores.masked_fill(scores < kth, NEG_INF)


class TopP:
    """Keeps the smallest set of most likely tokens whose probability reaches top_p (at least one)."""

    def __init__(self, top_p: float):
        self.top_p = float(top_p)

    def __call__(self, input_ids, scores):
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1 - self.top_p)
        drop_sorted[..., -1:] = False     # always keep the most likely token
        return scores.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), NEG_INF)


class MinP:
    """Drops tokens less likely than min_p x the most likely token's probability (the top one always stays)."""

    def __init__(self, min_p: float):
        self.min_p = float(min_p)

    def __call__(self, input_ids, scores):
        probs = scores.softmax(dim=-1)
        drop = probs < self.min_p * probs.amax(dim=-1, keepdim=True)
        drop.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
        return scores.masked_fill(drop, NEG_INF)


def check_sampling(temperature, top_k, top_p, min_p) -> None:
    """The ranges transformers accepts, as ValueErrors naming the argument."""
    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature > 0
            and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0 when sampling (got {temperature!r}); use "
                         "do_sample=False for greedy")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if min_p is not None and not 0 <= min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")


def warpers(temperature=1.0, top_k=None, top_p=1.0, min_p=None) -> list:
    """transformers' sampling warpers in their order (neutral settings add nothing)."""
    check_sampling(temperature, top_k, top_p, min_p)
    chain = []
    if temperature != 1.0:
        chain.append(Temperature(temperature))
    if top_k:
        chain.append(TopK(top_k))
    if top_p is not None and top_p < 1.0:
        chain.append(TopP(top_p))
    if min_p is not None:
        chain.append(MinP(min_p))
    return chain


def build_processors(*, prompt_len: int, eos: torch.Tensor | None, pad_lengths: torch.Tensor | None,
                     repetition_penalty=None, bad_words_ids=None, min_length=None, min_new_tokens=None,
                     user_processors=None, do_sample=False, temperature=1.0, top_k=None, top_p=1.0,
                     min_p=None) -> list:
    """The processors generate() applies each step, in transformers' order."""
    chain = []
    if repetition_penalty is not None and repetition_penalty != 1.0:
        chain.append(RepetitionPenalty(repetition_penalty, pad_lengths))
    if bad_words_ids is not None:
        chain.append(BadWords(bad_words_ids, eos))
    for name, value in (("min_length", min_length), ("min_new_tokens", min_new_tokens)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if eos is not None and min_length:
        chain.append(SuppressUntilLength(min_length, eos))
    if eos is not None and min_new_tokens:
        chain.append(SuppressUntilLength(prompt_len + min_new_tokens, eos))
    if user_processors is not None:
        if not all(callable(p) for p in user_processors):
            raise TypeError("logits_processor must be a list of callables (input_ids, scores) -> scores")
        chain.extend(user_processors)
    if do_sample:
        chain.extend(warpers(temperature, top_k, top_p, min_p))
    return chain


def apply(processors, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    for processor in processors:
        scores = processor(input_ids, scores)
    return scores


def warp_logits(logits, temperature=1.0, top_k=None, top_p=1.0, min_p=None):
    """The sampling warpers on logits [..., V] (fp32 result): temperature, top-k, top-p, min-p; dropped tokens
    get -inf."""
    return apply(warpers(temperature, top_k, top_p, min_p), None, logits.float())
