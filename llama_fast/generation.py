"""generate(): greedy and sampled decoding over a preallocated KV cache.

    ids = generate(model, input_ids, attention_mask=mask, max_new_tokens=64)                 # greedy
    ids = generate(model, input_ids, do_sample=True, temperature=0.7, top_p=0.9, seed=0)     # reproducible

Returns prompt + new tokens [B, T + n], like transformers; rows that reached an eos token continue with
pad_token_id until every row has finished (or max_new_tokens is reached). Batches are left padded (the
tokenizer's default): `attention_mask` marks the pads, which never enter the cache.

The cache is allocated once for prompt + max_new_tokens; the decode loop writes each step's token into a
preallocated output buffer and allocates nothing but the per-step logits.

On CUDA the decode loop never waits for the device: each step is the model's static `decode_step`, captured in
a CUDA graph per batch size (llama_fast.cuda_graphs; `cuda_graphs=False` runs it eagerly), "have all rows
finished?" and the streamer's tokens come back through asynchronous copies (llama_fast.decode_loop).

Any argument left as None is taken from the model's generation_config, then its config, then the
transformers defaults (max_length 20, top_k 50), as transformers does.
"""
from __future__ import annotations

import torch

from llama_fast import cuda_graphs as _cuda_graphs
from llama_fast.decode_loop import AsyncTokenStream, FinishWatch

_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "max_length": 20}
# transformers arguments that ask for something this loop does not do; a clear error beats ignoring them.
_UNSUPPORTED = {"num_beams": 1, "num_return_sequences": 1, "num_beam_groups": 1, "penalty_alpha": None,
                "assistant_model": None, "prompt_lookup_num_tokens": None}


@torch.inference_mode()
def generate(model, input_ids=None, attention_mask=None, max_new_tokens=None, max_length=None, do_sample=None,
             temperature=None, top_k=None, top_p=None, eos_token_id=None, pad_token_id=None, generator=None,
             seed=None, streamer=None, past_key_values=None, use_cache=True, cuda_graphs=None, **kwargs):
    input_ids, attention_mask = _unpack_inputs(input_ids, attention_mask)
    settings = _settings(model, dict(max_new_tokens=max_new_tokens, max_length=max_length, do_sample=do_sample,
                                     temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                                     pad_token_id=pad_token_id), kwargs)
    batch, prompt_len = input_ids.shape
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
    sampler = _make_sampler(settings, generator, seed, input_ids.device)

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
    unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
    stream = None
    if streamer is not None:
        streamer.put(input_ids.cpu())
        stream = AsyncTokenStream(streamer, input_ids.device)
    watch = FinishWatch(input_ids.device) if eos is not None else None
    decode = _decode_function(model, cache, graphed)

    out = model(new_input, attention_mask=attention_mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1, :]
    length = prompt_len
    for step in range(max_new):
        next_tokens = sampler(logits)
        if pad is not None:
            next_tokens = torch.where(unfinished, next_tokens, pad)
        output[:, length] = next_tokens
        length += 1
        stop = False
        if eos is not None:
            unfinished &= ~torch.isin(next_tokens, eos)
            stop = watch.update(unfinished, length)
        if stream is not None:
            stream.put(next_tokens, length, None if watch is None else watch.done_at)
        if stop:
            break
        if step + 1 < max_new:
            logits = decode(output[:, length - 1:length])
    if watch is not None:
        length = watch.final_length(length)    # on a GPU the loop may have run a few (pad-only) steps past it
    if stream is not None:
        stream.close()
    return output[:, :length]


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
            raise ValueError(f"generate: {name} is not supported by llama_fast (greedy and sampling only)")
    for name in ("output_scores", "return_dict_in_generate", "output_attentions", "output_hidden_states"):
        if extra.pop(name, False):
            raise ValueError(f"generate: {name}=True is not supported; generate returns the token ids")
    if extra:
        raise TypeError(f"generate got unexpected arguments: {sorted(extra)}")
    gen_config = getattr(model, "generation_config", None) or {}
    if not isinstance(gen_config, dict):
        gen_config = gen_config.to_dict() if hasattr(gen_config, "to_dict") else vars(gen_config)
    settings = {}
    for name, value in explicit.items():
        if value is None:
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


def _make_sampler(settings, generator, seed, device):
    """A function logits [B, V] -> next token ids [B]: argmax, or transformers' warpers (temperature, then
    top-k, then top-p) and a multinomial draw from `generator` (seeded from `seed` if given)."""
    if not settings["do_sample"]:
        # max().indices: the same first maximal index as argmax, ~3x faster on CPU (a 49K vocabulary: 20 us
        # instead of 60 per token)
        return lambda logits: logits.max(dim=-1).indices
    temperature, top_k, top_p = float(settings["temperature"]), settings["top_k"], float(settings["top_p"])
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling (got {temperature}); use do_sample=False for greedy")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(seed))

    def sample(logits):
        probs = warp_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)

    return sample


def warp_logits(logits, temperature=1.0, top_k=None, top_p=1.0):
    """transformers' sampling warpers in their order: divide by temperature, keep the top_k scores, keep the
    smallest set of tokens whose probability reaches top_p (at least one). Dropped tokens get -inf."""
    scores = logits.float()
    if temperature != 1.0:
        scores = scores / temperature
    if top_k:
        kth = torch.topk(scores, min(int(top_k), scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1 - top_p)
        drop_sorted[..., -1:] = False     # always keep the most likely token
        scores = scores.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return scores
