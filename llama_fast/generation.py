"""generate(): greedy and sampled decoding over a preallocated KV cache, with transformers' logits processors.

    ids = generate(model, input_ids, attention_mask=mask, max_new_tokens=64)                 # greedy
    ids = generate(model, input_ids, do_sample=True, temperature=0.7, top_p=0.9, seed=0)     # reproducible
    out = generate(model, ids, max_new_tokens=8, output_scores=True, return_dict_in_generate=True)
    out.sequences, out.scores                                                                 # GenerateOutput

Returns prompt + new tokens [B, T + n], like transformers; rows that finished (an eos token, or a stop string
when an eos is set) continue with pad_token_id until every row has finished (or max_new_tokens is reached).
Batches are left padded (the tokenizer's default): `attention_mask` marks the pads, which never enter the cache.

Each step's logits go through the processors transformers' generate builds, in its order (see
llama_fast.logits_process): repetition_penalty, bad_words_ids, min_length / min_new_tokens, the caller's
`logits_processor` list, then, when sampling, temperature, top_k, top_p, min_p. `stop_strings` (with
`tokenizer=`) and a `stopping_criteria` list end rows like transformers' criteria.

The cache is allocated once for prompt + max_new_tokens; the decode loop writes each step's token into a
preallocated output buffer.

On CUDA the decode loop never waits for the device: each step is the model's static `decode_step`, captured in
a CUDA graph per batch size (llama_fast.cuda_graphs; `cuda_graphs=False` runs it eagerly), "have all rows
finished?" and the streamer's tokens come back through asynchronous copies (llama_fast.decode_loop). Stopping
criteria (stop strings, user criteria) read the host copy of the output every step, so they synchronize.

Any argument left as None is taken from the model's generation_config, then its config, then the
transformers defaults (max_length 20, top_k 50), as transformers does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llama_fast import cuda_graphs as _cuda_graphs
from llama_fast import logits_process
from llama_fast.decode_loop import AsyncTokenStream, FinishWatch
from llama_fast.outputs import ModelOutput
from llama_fast.stop_strings import StopStrings

_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "max_length": 20}
# transformers arguments that ask for something this loop does not do; a clear error beats ignoring them.
_UNSUPPORTED = {"num_beams": 1, "num_return_sequences": 1, "num_beam_groups": 1, "penalty_alpha": None,
                "assistant_model": None, "prompt_lookup_num_tokens": None}
# Settings read from generation_config when not passed (the rest of it is ignored, as before).
_CONFIG_SETTINGS = ("max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "min_p",
                    "repetition_penalty", "min_new_tokens", "min_length", "bad_words_ids", "stop_strings",
                    "eos_token_id", "pad_token_id", "output_scores", "output_logits", "return_dict_in_generate")


@dataclass
class GenerateDecoderOnlyOutput(ModelOutput):
    """transformers' GenerateDecoderOnlyOutput: the sequences [B, T + n]; with output_scores the processed
    scores of each step (a tuple of n [B, V] fp32 tensors), with output_logits the raw ones."""
    sequences: torch.Tensor | None = None
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    attentions: Any = None
    hidden_states: Any = None
    cache: Any = None


@torch.inference_mode()
def generate(model, input_ids=None, attention_mask=None, max_new_tokens=None, max_length=None, do_sample=None,
             temperature=None, top_k=None, top_p=None, min_p=None, repetition_penalty=None, min_new_tokens=None,
             min_length=None, bad_words_ids=None, stop_strings=None, tokenizer=None, logits_processor=None,
             stopping_criteria=None, output_scores=None, output_logits=None, return_dict_in_generate=None,
             eos_token_id=None, pad_token_id=None, generator=None, seed=None, streamer=None, past_key_values=None,
             use_cache=True, cuda_graphs=None, **kwargs):
    input_ids, attention_mask = _unpack_inputs(input_ids, attention_mask)
    settings = _settings(model, dict(max_new_tokens=max_new_tokens, max_length=max_length, do_sample=do_sample,
                                     temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                     repetition_penalty=repetition_penalty, min_new_tokens=min_new_tokens,
                                     min_length=min_length, bad_words_ids=bad_words_ids, stop_strings=stop_strings,
                                     eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                                     output_scores=output_scores, output_logits=output_logits,
                                     return_dict_in_generate=return_dict_in_generate), kwargs)
    batch, prompt_len = input_ids.shape
    for name in ("max_new_tokens", "max_length"):
        value = settings[name]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"generate: {name} must be an int, got {value!r} ({type(value).__name__})")
    max_new = settings["max_new_tokens"]
    if max_new is None:
        max_new = settings["max_length"] - prompt_len
    if max_new <= 0:
        raise ValueError(f"nothing to generate: the prompt has {prompt_len} tokens and max_length is "
                         f"{settings['max_length']}; pass max_new_tokens")
    total = prompt_len + max_new
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and total > limit:
        raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new}) = {total} exceeds the model's "
                         f"max_position_embeddings ({limit})")
    eos = _as_id_tensor(settings["eos_token_id"], input_ids.device)
    pad = settings["pad_token_id"]
    if pad is None and eos is not None:
        pad = int(eos[0])                     # transformers' fallback: finished rows repeat eos
    if attention_mask is None:
        attention_mask = _infer_attention_mask(input_ids, pad, eos)
    do_sample = bool(settings["do_sample"])
    processors = logits_process.build_processors(
        prompt_len=prompt_len, eos=eos, pad_lengths=(attention_mask != 0).int().argmax(dim=1),
        repetition_penalty=settings["repetition_penalty"], bad_words_ids=settings["bad_words_ids"],
        min_length=settings["min_length"], min_new_tokens=settings["min_new_tokens"],
        user_processors=logits_processor, do_sample=do_sample, temperature=float(settings["temperature"]),
        top_k=settings["top_k"], top_p=float(settings["top_p"]), min_p=settings["min_p"])
    criteria = _stopping_criteria(settings["stop_strings"], tokenizer, stopping_criteria)
    choose = _make_chooser(do_sample, generator, seed, input_ids.device)
    as_dict = bool(settings["return_dict_in_generate"])
    scores = [] if as_dict and settings["output_scores"] else None
    raw_logits = [] if as_dict and settings["output_logits"] else None

    graphed = None
    if past_key_values is None and cuda_graphs is not False and hasattr(model, "decode_step") \
            and _cuda_graphs.supported(model) is None:
        graphed = _cuda_graphs.graphed_decode(model, batch, total)
        cache = graphed.cache
    else:
        cache = _prepare_cache(model, past_key_values, batch, total)
    # A cache given with tokens already in it holds the first columns of input_ids (transformers' contract).
    new_input = input_ids[:, cache.seen_tokens:] if cache.seen_tokens else input_ids
    if new_input.shape[1] == 0:
        raise ValueError("past_key_values already holds every token of input_ids; nothing to prefill")

    output = torch.empty(batch, total, dtype=input_ids.dtype, device=input_ids.device)
    output[:, :prompt_len] = input_ids
    stream = None
    if streamer is not None:
        streamer.put(input_ids.cpu())
        stream = AsyncTokenStream(streamer, output.device)
    try:
        length = _decode_loop(model, new_input, attention_mask, output, prompt_len, max_new, cache, graphed,
                              processors, choose, criteria, scores, raw_logits, pad, eos, stream)
    finally:
        if stream is not None:  # also when decoding raises: a TextIteratorStreamer's consumer waits for end()
            stream.close()
    sequences = output[:, :length]
    if not as_dict:
        return sequences
    return GenerateDecoderOnlyOutput(sequences=sequences, scores=None if scores is None else tuple(scores),
                                     logits=None if raw_logits is None else tuple(raw_logits), cache=cache)


def _decode_loop(model, new_input, attention_mask, output, prompt_len, max_new, cache, graphed, processors, choose,
                 criteria, scores, raw_logits, pad, eos, stream) -> int:
    """The prefill and decode steps: fills output[:, prompt_len:] (and scores / raw_logits when collected),
    feeds `stream` (an AsyncTokenStream, or None) and returns the filled length."""
    batch = output.shape[0]
    unfinished = torch.ones(batch, dtype=torch.bool, device=output.device)
    # eos alone is watched without a sync (a few pad-only steps may run past the finish on a GPU); stopping
    # criteria read the output on the host anyway, so with them the loop checks every step.
    watch = FinishWatch(output.device) if eos is not None and not criteria else None
    decode = _decode_function(model, cache, graphed)
    # Plain greedy with a CUDA graph: the graph itself ends with the choice (cuda_graphs.GraphedDecode.greedy).
    greedy_in_graph = graphed is not None and choose is _cuda_graphs.greedy_choice and not processors \
        and raw_logits is None and scores is None
    out = model(new_input, attention_mask=attention_mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1, :]
    chosen = None      # next tokens chosen by the graph, when greedy_in_graph
    length = prompt_len
    for step in range(max_new):
        if chosen is not None:
            next_tokens = chosen      # the graph's buffer: used (copied) before the next replay on the same stream
        else:
            if processors or raw_logits is not None or scores is not None:
                logits = logits.float()
                step_scores = logits_process.apply(processors, output[:, :length], logits.clone()) if processors \
                    else logits
                if raw_logits is not None:
                    raw_logits.append(logits)
                if scores is not None:
                    scores.append(step_scores)
            else:
                step_scores = logits      # plain greedy: no fp32 copy (the argmax is the same)
            next_tokens = choose(step_scores)
        # transformers pads finished rows only when an eos criterion exists (a stop string alone does not)
        if pad is not None and eos is not None:
            next_tokens = torch.where(unfinished, next_tokens, pad)
        output[:, length] = next_tokens
        length += 1
        if eos is not None:
            unfinished &= ~torch.isin(next_tokens, eos)
        for criterion in criteria:
            unfinished &= ~_as_row_flags(criterion(output[:, :length], scores), batch, unfinished.device)
        if watch is not None:
            stop = watch.update(unfinished, length)
        else:
            stop = bool(criteria) and not bool(unfinished.any())
        if stream is not None:
            stream.put(next_tokens, length, None if watch is None else watch.done_at)
        if stop:
            break
        if step + 1 < max_new:
            if greedy_in_graph:
                cache.seen_tokens += 1
                chosen = graphed.greedy(model, output[:, length - 1:length])
            else:
                logits = decode(output[:, length - 1:length])
    if watch is not None:
        length = watch.final_length(length)    # on a GPU the loop may have run a few (pad-only) steps past it
    return length


# Devices whose decode steps run LlamaForCausalLM.decode_step (static shapes, no host read). The CPU keeps forward:
# its fused C++ decode plan is faster there, and a host read costs nothing on the CPU.
STATIC_STEP_DEVICES = ("cuda",)


def _decode_function(model, cache, graphed):
    """tokens [B, 1] -> next-token logits [B, V], advancing `cache`: the captured graph, else on CUDA the static
    decode step run eagerly, else forward (the CPU's fused C++ decode plan)."""
    if graphed is not None:
        def decode(tokens):
            cache.seen_tokens += 1
            return graphed(model, tokens)
        return decode
    if cache.device.type in STATIC_STEP_DEVICES and hasattr(model, "decode_step") \
            and not getattr(model.model.rotary, "dynamic", False):
        cos, sin = model.rope_tables(cache)

        def decode(tokens):
            cache.reserve(1)
            cache.seen_tokens += 1
            return model.decode_step(tokens, cache, cos, sin)
        return decode
    return lambda tokens: model(tokens, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1, :]


def _unpack_inputs(input_ids, attention_mask):
    """input_ids as a [B, T] long tensor; a tokenizer's BatchEncoding / dict is accepted too."""
    if isinstance(input_ids, dict):
        attention_mask = input_ids.get("attention_mask", attention_mask) if attention_mask is None else attention_mask
        input_ids = input_ids["input_ids"]
    if input_ids is None:
        raise ValueError("generate needs input_ids (a [batch, seq_len] tensor of token ids)")
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be a non-empty [batch, seq_len] integer tensor, got "
                         f"{tuple(input_ids.shape)} {input_ids.dtype}")
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask, device=input_ids.device)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must have the shape of input_ids "
                             f"{tuple(input_ids.shape)}")
    return input_ids.long(), attention_mask


def _settings(model, explicit: dict, extra: dict) -> dict:
    for name, neutral in _UNSUPPORTED.items():
        if name in extra and extra.pop(name) not in (neutral, None):
            raise ValueError(f"generate: {name} is not supported by llama_fast (greedy and sampling only; beam "
                             f"search is not implemented)")
    for name in ("output_attentions", "output_hidden_states"):
        if extra.pop(name, False):
            raise ValueError(f"generate: {name}=True is not supported (scores and logits are: output_scores, "
                             f"output_logits)")
    if extra:
        raise TypeError(f"generate got unexpected arguments: {sorted(extra)}")
    gen_config = getattr(model, "generation_config", None) or {}
    if not isinstance(gen_config, dict):
        gen_config = gen_config.to_dict() if hasattr(gen_config, "to_dict") else vars(gen_config)
    settings = {}
    for name, value in explicit.items():
        if value is None and name in _CONFIG_SETTINGS:
            value = gen_config.get(name)
        if value is None and name in ("eos_token_id", "pad_token_id"):
            value = getattr(model.config, name, None)
        if value is None:
            value = _DEFAULTS.get(name)
        settings[name] = value
    return settings


def _as_id_tensor(ids, device):
    if ids is None or (isinstance(ids, (list, tuple)) and not ids):
        return None
    ids = [ids] if isinstance(ids, int) else list(ids)
    return torch.tensor(ids, dtype=torch.long, device=device)


def _infer_attention_mask(input_ids, pad, eos):
    """No mask given: pads are the pad tokens, unless pad is also eos (then nothing can be told apart)."""
    if pad is not None and (eos is None or pad not in eos.tolist()) and bool((input_ids == pad).any()):
        return (input_ids != pad).long()
    return torch.ones_like(input_ids)


def _prepare_cache(model, cache, batch, total):
    if cache is None:
        base = model if hasattr(model, "new_cache") else model.model
        return base.new_cache(batch, total)
    if not hasattr(cache, "max_len"):
        raise TypeError("generate: past_key_values must be a llama_fast StaticCache (or None to allocate one)")
    if cache.batch_size != batch:
        raise ValueError(f"past_key_values holds {cache.batch_size} sequences, input_ids has {batch}")
    if total > cache.max_len:
        raise ValueError(f"prompt + max_new_tokens = {total} tokens do not fit the given cache of "
                         f"{cache.max_len}; allocate a larger one or generate fewer tokens")
    return cache


def _stopping_criteria(stop_strings, tokenizer, custom) -> list:
    criteria = []
    if stop_strings is not None:
        criteria.append(StopStrings(stop_strings, tokenizer))
    if custom is not None:
        if not all(callable(c) for c in custom):
            raise TypeError("stopping_criteria must be a list of callables (input_ids, scores) -> bool per row")
        criteria.extend(custom)
    return criteria


def _as_row_flags(done, batch: int, device) -> torch.Tensor:
    """A criterion's answer (a bool, or a [B] tensor) as a [B] bool tensor."""
    done = torch.as_tensor(done, device=device).to(torch.bool)
    if done.dim() == 0:
        done = done.expand(batch)
    if done.shape != (batch,):
        raise ValueError(f"a stopping criterion returned shape {tuple(done.shape)}; expected a bool or [{batch}]")
    return done


def _make_chooser(do_sample: bool, generator, seed, device):
    """A function scores [B, V] -> next token ids [B]: argmax, or a multinomial draw from `generator` (seeded
    from `seed` if given) over softmax(scores); the scores are already warped by the processors."""
    if not do_sample:
        return _cuda_graphs.greedy_choice   # the decode loop may take it from inside the CUDA graph
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(seed))

    def sample(scores):
        probs = scores.float().softmax(dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)

    return sample


def warp_logits(logits, temperature=1.0, top_k=None, top_p=1.0, min_p=None):
    """transformers' sampling warpers in their order (temperature, top-k, top-p, min-p) on logits [..., V];
    dropped tokens get -inf. See llama_fast.logits_process."""
    return logits_process.warp_logits(logits, temperature, top_k, top_p, min_p)
