"""LlamaModel, LlamaForCausalLM, LlamaForSequenceClassification on llama_fast.ops.

Same class names, forward arguments, outputs and numbers as transformers' Llama classes; every computation
goes through llama_fast.ops (or llama_fast.linear.Linear, which calls ops.linear / ops.quant_linear), with the
backend each module carries (`model.set_backend(...)`).

Weights are fused: `self_attn.qkv_proj` holds the rows [q; k; v] and `mlp.gate_up_proj` the rows [gate; up]
(one matmul each). The classes declare how transformers' checkpoint names map onto them (the
"checkpoint mapping" attributes of LlamaPreTrainedModel: which names are stacked in which fused rows, which
modules are heads, which weights are tied); llama_fast.loading reads that declaration, in both directions.

Padding and the cache. The KV cache stores each sequence's real tokens compactly from slot 0. In a chunk of T
tokens whose row b starts with p_b pad tokens (attention_mask zeros, left padding only), the token in column
i >= p_b goes to slot lengths[b] + i - p_b (pads to slot -1, which ops.store_kv skips), the keys valid for
row b are then kv_lens[b] = lengths[b] + T - p_b, and ops.attention's bottom-right causal rule puts query i
at position kv_lens[b] - T + i: exactly its slot. The rotary position of a real token is its slot (what transformers'
generate computes as cumsum(attention_mask) - 1) unless position_ids says otherwise. (transformers' forward
called without position_ids counts the pads as positions; pass position_ids to get that.) Pad rows output zeros
from attention; their hidden states and logits are meaningless, as in transformers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llama_fast import generation, kquants, loading, ops
from llama_fast.cache import StaticCache, as_static_cache, kv_cache_dtype_name, left_padding
from llama_fast.config import LlamaConfig
from llama_fast.embedding import Embedding
from llama_fast.linear import Linear
from llama_fast.ops import cpu_decode
from llama_fast.ops._backend import check_backend_name
from llama_fast.ops.reference import attention_mask as _reference_attention_mask
from llama_fast.outputs import BaseModelOutputWithPast, CausalLMOutputWithPast, SequenceClassifierOutputWithPast
from llama_fast.rope import RotaryTables
from llama_fast.weights_version import TracksWeights

# Capacity granularity of the cache forward(use_cache=True) creates on its own (it grows by doubling later).
_IMPLICIT_CACHE_BLOCK = 256


@dataclass
class _Step:
    """Where the tokens of one forward call go: shared by every layer."""
    positions: torch.Tensor    # [B, T] rotary positions
    slots: torch.Tensor        # [B, T] cache slots, -1 for padding
    kv_lens: torch.Tensor      # [B] int32 valid keys per row after this chunk
    kv_span: int               # attention reads cache slots [0, kv_span): the capacity off the CPU (static shapes)
    cos: torch.Tensor          # [n, D/2] fp32
    sin: torch.Tensor
    columns: int = 0           # host bound of kv_lens (seen + T): the key span output_attentions reports


class LlamaAttention(TracksWeights):
    def __init__(self, config: LlamaConfig, layer_idx: int, dtype=None, device=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim ** -0.5
        self.backend: str | None = None
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, q_size + 2 * kv_size, bias=config.attention_bias,
                               dtype=dtype, device=device, output_sizes=(q_size, kv_size, kv_size))
        self.o_proj = Linear(q_size, config.hidden_size, bias=config.attention_bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, step: _Step, cache: StaticCache, output_attentions: bool = False):
        b, t, _ = x.shape
        qkv = self.qkv_proj(x).view(b, t, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=2)
        ops.rotary(q, k, step.positions, step.cos, step.sin, backend=self.backend)
        k_cache, v_cache = cache.k[self.layer_idx], cache.v[self.layer_idx]
        k_scale, v_scale = cache.scales(self.layer_idx)          # int8 kv_cache_dtype; else None
        ops.store_kv(k_cache, v_cache, k, v, step.slots, backend=self.backend, k_scale=k_scale, v_scale=v_scale)
        span = step.kv_span
        out = ops.attention(q, k_cache[:, :span], v_cache[:, :span], causal=True, kv_lens=step.kv_lens,
                            scale=self.scale, backend=self.backend,
                            k_scale=None if k_scale is None else k_scale[:, :span],
                            v_scale=None if v_scale is None else v_scale[:, :span])
        probs = None
        if output_attentions:
            keys = cache.dequantized(self.layer_idx, step.columns)[0]
            probs = attention_probs(q, keys, step.kv_lens, self.scale)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), probs


def attention_probs(q: torch.Tensor, k: torch.Tensor, kv_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """The attention probabilities [B, Hq, Tq, Tk] (materialized, like transformers' eager path; only for
    output_attentions). Key j is cache slot j; rows with no valid key are zeros."""
    b, tq, hq, _ = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    qf = q.float().transpose(1, 2)
    kf = k.float().transpose(1, 2).repeat_interleave(hq // hkv, dim=1)
    scores = (qf @ kf.transpose(-1, -2)) * scale
    mask = _reference_attention_mask(b, tq, tk, True, kv_lens, q.device)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.where(mask.any(-1, keepdim=True), probs, torch.zeros_like(probs)).to(q.dtype)


class LlamaMLP(TracksWeights):
    def __init__(self, config: LlamaConfig, dtype=None, device=None):
        super().__init__()
        self.backend: str | None = None
        h, i = config.hidden_size, config.intermediate_size
        self.gate_up_proj = Linear(h, 2 * i, bias=config.mlp_bias, dtype=dtype, device=device, output_sizes=(i, i))
        self.down_proj = Linear(i, h, bias=config.mlp_bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x), backend=self.backend))


class LlamaRMSNorm(TracksWeights):
    """Holds the weight; the layers call ops.rms_norm / ops.fused_add_rms_norm with it."""

    def __init__(self, hidden_size: int, eps: float, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class LlamaDecoderLayer(TracksWeights):
    def __init__(self, config: LlamaConfig, layer_idx: int, dtype=None, device=None):
        super().__init__()
        self.backend: str | None = None
        self.self_attn = LlamaAttention(config, layer_idx, dtype, device)
        self.mlp = LlamaMLP(config, dtype, device)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)

    def forward(self, x, residual, step: _Step, cache: StaticCache, output_attentions: bool = False):
        """x: the previous layer's MLP output (or the embeddings, with residual None). The residual add of
        the previous layer is fused into this layer's input norm; returns (mlp_out, residual, probs), the
        layer's output being mlp_out + residual."""
        norm = self.input_layernorm
        if residual is None:
            residual, h = x, ops.rms_norm(x, norm.weight, norm.eps, backend=self.backend)
        else:
            h, residual = ops.fused_add_rms_norm(x, residual, norm.weight, norm.eps, backend=self.backend)
        attn_out, probs = self.self_attn(h, step, cache, output_attentions)
        norm = self.post_attention_layernorm
        h, residual = ops.fused_add_rms_norm(attn_out, residual, norm.weight, norm.eps, backend=self.backend)
        return self.mlp(h), residual, probs

    def decode_fields(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """This layer's weights as the CPU decode plan takes them (csrc/cpu/decode_step.cpp, add_layer): named
        tensors and ints, the names being the attribute paths below the layer. The module's own tensors, not
        copies, so that the plan sees in-place changes."""
        tensors = {"input_layernorm": self.input_layernorm.weight,
                   "post_attention_layernorm": self.post_attention_layernorm.weight}
        ints = {}
        for name, linear in (("qkv_proj", self.self_attn.qkv_proj), ("o_proj", self.self_attn.o_proj),
                             ("gate_up_proj", self.mlp.gate_up_proj), ("down_proj", self.mlp.down_proj)):
            if linear.kquant:   # ggml blocks: one tensor and type id per row segment (llama_fast.kquants)
                parts = {}
                for i, kind in enumerate(linear.kquant_kinds):
                    parts[f"blocks.{i}"] = linear.get_buffer(f"kquant_blocks_{i}")
                    ints[f"{name}.block_type.{i}"] = kquants.TYPE_IDS[kind]
            elif linear.quantized:
                parts = {"qweight": linear.qweight, "scales": linear.scales, "offsets": linear.offsets,
                         "input_perm": linear.input_perm}     # act-order: the plan gathers x[:, input_perm]
                ints[f"{name}.bits"], ints[f"{name}.group_size"] = linear.bits, linear.group_size
            else:
                parts = {"weight": linear.weight}
                ints[f"{name}.bits"] = 0
            parts["bias"] = linear.bias
            tensors.update({f"{name}.{field}": t for field, t in parts.items() if t is not None})
        return tensors, ints


class LlamaPreTrainedModel(TracksWeights):
    """from_pretrained / save_pretrained / set_backend, shared by the three model classes."""

    config_class = LlamaConfig

    # ---- the checkpoint mapping, read by llama_fast.loading (docs/DESIGN.md, "The checkpoint mapping") ----
    # The submodule that holds the base model; a LlamaModel has none, so its checkpoint names lack the prefix.
    base_model_prefix = "model"
    # Fused linear -> the transformers linears stacked in its rows, in row order (as vLLM's
    # packed_modules_mapping); each part's row count is the fused Linear's output_sizes entry.
    packed_modules_mapping = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    # The output heads on top of the base model, in any class of the family. They stay dense under
    # quantize= (not the decode bottleneck, their accuracy matters most, and lm_head may share the
    # embedding table); a bare LlamaModel skips them in a checkpoint.
    head_modules = ("lm_head", "score")
    # Parameter -> the parameter it is, when config.tie_word_embeddings (a stored copy is redundant).
    tied_weights: dict[str, str] = {}
    # Checkpoint entries the model does not need (old checkpoints saved the rotary table).
    unused_checkpoint_suffixes = ("rotary_emb.inv_freq",)
    # This rank's share of a tensor-parallel model (llama_fast.parallel.runtime.TensorParallel), else None.
    tensor_parallel = None

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.backend: str | None = None
        self.generation_config: dict = {}

    @classmethod
    def from_pretrained(cls, path, dtype="auto", device="cpu", backend=None, quantize=None, group_size=128,
                        kv_cache_dtype=None, **kwargs):
        """Loads an HF directory (config.json + safetensors, single or sharded) or a .gguf file; see
        llama_fast.loading.from_pretrained. tp_plan="auto" inside a torch.distributed process group loads this
        rank's shard of a tensor-parallel model (llama_fast.parallel). kv_cache_dtype: see the property."""
        kv_cache_dtype = kv_cache_dtype_name(kv_cache_dtype)         # a bad value fails before loading
        model = loading.from_pretrained(cls, path, dtype=dtype, device=device, backend=backend, quantize=quantize,
                                        group_size=group_size, **kwargs)
        if kv_cache_dtype is not None:
            model.kv_cache_dtype = kv_cache_dtype
        return model

    @property
    def kv_cache_dtype(self) -> str | None:
        """How the KV caches this model makes store keys and values (config.kv_cache_dtype): None = the model
        dtype, "bfloat16", "float16", "float32", or "int8" (symmetric, one fp32 scale per token per kv head).
        Set it here, in the config or with from_pretrained(..., kv_cache_dtype=...)."""
        return getattr(self.config, "kv_cache_dtype", None)

    @kv_cache_dtype.setter
    def kv_cache_dtype(self, value) -> None:
        self.config.kv_cache_dtype = kv_cache_dtype_name(value)

    @classmethod
    def from_transformers(cls, hf_model, backend=None):
        """The same model from a loaded transformers Llama, sharing its weights' memory (no disk, no second
        copy); see llama_fast.from_transformers."""
        from llama_fast.from_transformers import from_transformers
        return from_transformers(cls, hf_model, backend=backend)

    def save_pretrained(self, directory, max_shard_size: int | str = "50GB") -> None:
        """Writes config.json, model.safetensors (transformers' names; sharded past max_shard_size) and
        generation_config.json."""
        loading.save_pretrained(self, directory, max_shard_size)

    def set_backend(self, backend: str | None):
        """The ops backend of every layer: "torch", "cpu", "triton", "cuda" or None (best for the device)."""
        check_backend_name(backend)
        for module in self.modules():
            if hasattr(module, "backend"):
                module.backend = backend
        return self

    @property
    def dtype(self) -> torch.dtype:
        table = self.get_input_embeddings()     # ours (maybe a quantized table) or a tensor-parallel shard
        return table.dtype if isinstance(table, Embedding) else table.weight.dtype

    @property
    def device(self) -> torch.device:
        table = self.get_input_embeddings()
        return table.device if isinstance(table, Embedding) else table.weight.device

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def new_cache(self, batch_size: int, max_len: int, growable: bool = False) -> StaticCache:
        """A KV cache for `batch_size` sequences of up to `max_len` tokens (prompt, left padding included, plus
        new tokens), on the model's device and dtype; pass it as past_key_values."""
        return StaticCache.for_model(self.config, batch_size, max_len, self.dtype, self.device, growable)

    def init_weights(self) -> None:
        """Random weights as transformers initializes them: normal(0, initializer_range), zero biases,
        unit norms."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (Linear, nn.Embedding)) and getattr(module, "weight", None) is not None:
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, LlamaRMSNorm):
                nn.init.ones_(module.weight)


class LlamaModel(LlamaPreTrainedModel):
    def __init__(self, config: LlamaConfig, dtype: torch.dtype | None = None, device=None):
        super().__init__(config)
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, dtype, device)
                                    for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.rotary = RotaryTables(config)
        if self.embed_tokens.weight.device.type != "meta":
            self.init_weights()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, cache_position=None, **kwargs):
        """Arguments as transformers' LlamaModel.forward. cache_position is accepted and ignored (each row's
        cache position is known from the cache). Returns BaseModelOutputWithPast, or its tuple."""
        _reject_unknown(kwargs)
        if output_attentions and self.tensor_parallel is not None:
            raise ValueError("output_attentions is not available under tensor parallelism: each rank holds the "
                             "attention of its own heads only")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        hidden, cache, step = self._prepare(input_ids, attention_mask, position_ids, past_key_values,
                                            inputs_embeds, use_cache)
        all_hidden = [] if output_hidden_states else None
        all_attn = [] if output_attentions else None
        if cpu_decode.can_run(self, hidden, output_attentions=output_attentions,
                              output_hidden_states=output_hidden_states, step=step):
            # A decode step on the CPU: the whole decoder stack and the final norm in one C++ call.
            hidden = cpu_decode.run(self, hidden, step, cache)
        else:
            hidden = self._stack(hidden, step, cache, all_hidden, all_attn)
        if all_hidden is not None:
            all_hidden.append(hidden)   # transformers' last entry is the normed output
        cache.lengths.copy_(step.kv_lens)
        cache.seen_tokens += hidden.shape[1]
        out = BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=cache if use_cache else None,
                                      hidden_states=_tuple_or_none(all_hidden), attentions=_tuple_or_none(all_attn))
        return out if return_dict in (None, True) else out.to_tuple()

    def _stack(self, hidden, step: _Step, cache: StaticCache, all_hidden=None, all_attn=None) -> torch.Tensor:
        """The decoder layers op by op, then the final norm (the residual add of each layer fused into the next
        norm)."""
        residual = None
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden if residual is None else hidden + residual)
            hidden, residual, probs = layer(hidden, residual, step, cache, all_attn is not None)
            if all_attn is not None:
                all_attn.append(probs)
        if residual is None:   # no layers
            return ops.rms_norm(hidden, self.norm.weight, self.norm.eps, backend=self.backend)
        hidden, _ = ops.fused_add_rms_norm(hidden, residual, self.norm.weight, self.norm.eps, backend=self.backend)
        return hidden

    def rope_tables(self, cache: StaticCache) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin covering every position `cache` can hold, made once per capacity (what decode_step takes)."""
        if self.rotary.dynamic:
            raise NotImplementedError("decode_step does not take dynamic NTK rope (its tables change with the "
                                      "longest position); use forward")
        return self.rotary.get(cache.device, cache.max_len)

    def decode_step(self, input_ids: torch.Tensor, cache: StaticCache, cos: torch.Tensor,
                    sin: torch.Tensor) -> torch.Tensor:
        """One token per row against `cache`, with static shapes and no host synchronization: what CUDA graphs
        capture and torch.compile(fullgraph=True) compiles. -> the final-normed hidden states [B, 1, H].

        Every shape depends on the cache's capacity only: row b's token takes slot (and position) lengths[b],
        attention reads the whole cache with kv_lens = lengths + 1 (a device tensor) deciding which keys are
        valid, cos/sin are `rope_tables(cache)`. lengths is advanced in place; the caller counts
        cache.seen_tokens (a host int) itself, outside whatever was compiled or captured. The ids are not
        checked: generate feeds the sampler's, in range by construction (forward checks what users pass)."""
        hidden = self.embed_tokens(input_ids)
        slots = cache.lengths[:, None]
        step = _Step(slots, slots, cache.lengths + 1, cache.max_len, cos, sin, cache.max_len)
        hidden = self._stack(hidden, step, cache)
        cache.lengths.copy_(step.kv_lens)
        return hidden

    def _prepare(self, input_ids, attention_mask, position_ids, past, inputs_embeds, use_cache):
        """Embeds the input and works out the cache, slots, positions and rotary tables of this call."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
            if input_ids.device != self.device:
                raise ValueError(f"input_ids are on {input_ids.device}, the model on {self.device}; move them "
                                 f"with .to({str(self.device)!r})")
            _check_token_ids(input_ids, self.config.vocab_size)
            hidden = self.embed_tokens(input_ids)
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
                raise ValueError(f"inputs_embeds must be [batch, seq_len, {self.config.hidden_size}], got "
                                 f"shape {tuple(inputs_embeds.shape)}")
            hidden = inputs_embeds.to(self.dtype)
        batch, t = hidden.shape[:2]
        if t == 0:
            raise ValueError("the input has no tokens (seq_len 0)")
        device = hidden.device

        cache = None
        if past is not None:
            past_mask = None
            if not isinstance(past, StaticCache) and attention_mask is not None and attention_mask.dim() == 2 \
                    and attention_mask.shape[1] > t:
                past_mask = attention_mask[:, :attention_mask.shape[1] - t]
            cache = as_static_cache(past, self.config, past_mask, self.dtype, device)
            use_cache = True
        if cache is None:
            # Without a cache, a temporary one holds this chunk's keys; use_cache keeps (and may grow) it.
            size = -(-(t + 1) // _IMPLICIT_CACHE_BLOCK) * _IMPLICIT_CACHE_BLOCK if use_cache else t
            cache = self.new_cache(batch, size, growable=bool(use_cache))
        if cache.batch_size != batch:
            raise ValueError(f"past_key_values holds {cache.batch_size} sequences, the input has {batch}")
        if cache.device != device:
            raise ValueError(f"past_key_values is on {cache.device}, the input on {device}")
        seen = cache.seen_tokens
        pads = self._chunk_padding(attention_mask, batch, t, seen)
        cache.reserve(t)

        kv_lens = cache.lengths + t
        if t == 1 and pads is None:
            # A decode step without a mask (generate's): each row's token takes its next slot, which is also
            # its position. One op instead of five: at ~3 us each they add up against a ~10 ms step.
            slots = cache.lengths[:, None].clone()
        else:
            offsets = torch.arange(t, device=device, dtype=torch.int32)
            slots = cache.lengths[:, None] + offsets[None, :]
        if pads is not None:
            slots = torch.where(offsets[None, :] < pads[:, None], -1, slots - pads[:, None].to(torch.int32))
            kv_lens = kv_lens - pads.to(torch.int32)
        if position_ids is None:
            positions = slots if pads is None else slots.clamp(min=0)
            max_position = seen + t - 1           # host bound, no sync
            if self.rotary.dynamic:                # dynamic NTK needs the exact longest position
                max_position = int(kv_lens.max()) - 1
        else:
            positions = _check_position_ids(position_ids, batch, t, device)
            max_position = int(positions.max())
        self.rotary.update(max_position + 1)
        # Tables for every position the cache can hold: made once per capacity, not grown step by step.
        cos, sin = self.rotary.get(device, max(max_position + 1, cache.max_len))
        # Off the CPU attention reads the whole cache (kv_lens, on the device, says which keys are valid): every
        # decode step then has the same shapes, for CUDA graphs and torch.compile. The CPU kernels loop over
        # the keys given, so there the host bound seen + t keeps short sequences cheap.
        kv_span = seen + t if device.type == "cpu" else cache.max_len
        step = _Step(positions, slots, kv_lens, kv_span, cos, sin, seen + t)
        return hidden, cache, step

    @staticmethod
    def _chunk_padding(attention_mask, batch: int, t: int, seen: int) -> torch.Tensor | None:
        """Leading pads [B] of this chunk from a [B, T] mask or a transformers-style [B, seen + T] one."""
        if attention_mask is None:
            return None
        if attention_mask.dim() != 2:
            left_padding(attention_mask)   # raises the 2-D message
        if attention_mask.shape[0] != batch or attention_mask.shape[1] not in (t, seen + t):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected [{batch}, {t}] "
                             f"(this chunk) or [{batch}, {seen + t}] (past and chunk)")
        pads = left_padding(attention_mask.to(device=attention_mask.device))
        if attention_mask.shape[1] != t:
            pads = (pads - seen).clamp(0, t)
        return pads


class LlamaForCausalLM(LlamaPreTrainedModel):
    tied_weights = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LlamaConfig, dtype: torch.dtype | None = None, device=None):
        super().__init__(config)
        self.model = LlamaModel(config, dtype, device)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype, device=device)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        elif self.lm_head.weight.device.type != "meta":
            nn.init.normal_(self.lm_head.weight, std=config.initializer_range)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, cache_position=None, logits_to_keep=0,
                num_logits_to_keep=None, **kwargs):
        """Arguments and outputs as transformers' LlamaForCausalLM.forward. logits_to_keep (or the older
        num_logits_to_keep): an int n > 0 computes the logits of the last n positions only, a 1-D tensor
        those of the given positions. labels: the loss is the mean cross entropy of predicting labels[:, 1:]
        from positions :-1, in fp32, positions labelled -100 ignored."""
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                         output_attentions, output_hidden_states, True, cache_position, **kwargs)
        if num_logits_to_keep is not None:
            logits_to_keep = num_logits_to_keep
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None if labels is None else causal_lm_loss(logits, labels, self.config.vocab_size)
        result = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                        hidden_states=out.hidden_states, attentions=out.attentions)
        return result if return_dict in (None, True) else result.to_tuple()

    def decode_step(self, input_ids: torch.Tensor, cache: StaticCache, cos: torch.Tensor,
                    sin: torch.Tensor) -> torch.Tensor:
        """LlamaModel.decode_step followed by the head: -> logits [B, V] of the one new token per row."""
        hidden = self.model.decode_step(input_ids, cache, cos, sin)
        return self.lm_head(hidden[:, -1])

    def rope_tables(self, cache: StaticCache) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.rope_tables(cache)

    def generate(self, *args, **kwargs):
        """Greedy or sampled generation: see llama_fast.generation.generate."""
        return generation.generate(self, *args, **kwargs)

    def get_output_embeddings(self) -> Linear:
        return self.lm_head


class LlamaForSequenceClassification(LlamaPreTrainedModel):
    """Scores the last non-pad token of each row (transformers' rule: the rightmost token that is not
    pad_token_id; without a pad_token_id only a batch of one is accepted).

    Right padding: the model's cache keeps only left-padded masks, but a classifier reads a single position
    and, attention being causal, the tokens before a right-padded row's pads never see them. So a right-padded
    attention_mask (zeros only at the end of rows, no past_key_values) is dropped, and the pooled logits are
    the same as transformers'. Hidden states at the pad positions then differ from transformers' (which are
    meaningless there anyway)."""

    def __init__(self, config: LlamaConfig, dtype: torch.dtype | None = None, device=None):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = LlamaModel(config, dtype, device)
        self.score = Linear(config.hidden_size, self.num_labels, bias=False, dtype=dtype, device=device)
        if self.score.weight.device.type != "meta":
            nn.init.normal_(self.score.weight, std=config.initializer_range)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, cache_position=None, **kwargs):
        if attention_mask is not None and past_key_values is None and _is_right_padded(attention_mask):
            attention_mask = None
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                         output_attentions, output_hidden_states, True, cache_position, **kwargs)
        logits = self.score(out.last_hidden_state)
        batch = logits.shape[0]
        pad = self.config.pad_token_id
        if pad is None and batch != 1:
            raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined "
                             "(set config.pad_token_id)")
        if pad is None or input_ids is None:
            last = torch.full((batch,), logits.shape[1] - 1, device=logits.device)
        else:
            non_pad = (input_ids != pad).to(torch.int32)
            last = (torch.arange(input_ids.shape[1], device=logits.device, dtype=torch.int32) * non_pad).argmax(-1)
        pooled = logits[torch.arange(batch, device=logits.device), last]
        loss = None if labels is None else sequence_classification_loss(pooled, labels, self.config)
        result = SequenceClassifierOutputWithPast(loss=loss, logits=pooled, past_key_values=out.past_key_values,
                                                  hidden_states=out.hidden_states, attentions=out.attentions)
        return result if return_dict in (None, True) else result.to_tuple()


# ---- losses ---------------------------------------------------------------------------------------------

def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Mean next-token cross entropy in fp32; labels == -100 are ignored (transformers' ForCausalLMLoss)."""
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must have shape {tuple(logits.shape[:2])} (one per logit position), "
                         f"got {tuple(labels.shape)}")
    shift_labels = F.pad(labels, (0, 1), value=-100)[:, 1:].to(logits.device)
    return F.cross_entropy(logits.float().reshape(-1, vocab_size), shift_labels.reshape(-1), ignore_index=-100)


def sequence_classification_loss(pooled: torch.Tensor, labels: torch.Tensor, config: LlamaConfig):
    """transformers' rule: regression for one label, single-label classification for integer labels,
    multi-label otherwise (or as config.problem_type says)."""
    num_labels = config.num_labels
    labels = labels.to(pooled.device)
    problem = getattr(config, "problem_type", None)
    if problem is None:
        if num_labels == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    if problem == "regression":
        if num_labels == 1:
            return F.mse_loss(pooled.squeeze(), labels.squeeze())
        return F.mse_loss(pooled, labels)
    if problem == "single_label_classification":
        return F.cross_entropy(pooled.view(-1, num_labels).float(), labels.view(-1), ignore_index=-100)
    if problem == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(pooled, labels)
    raise ValueError(f"unknown problem_type {problem!r}")


# ---- input checks ---------------------------------------------------------------------------------------

_IGNORED_KWARGS = ("token_type_ids", "num_items_in_batch")


def _reject_unknown(kwargs: dict) -> None:
    unknown = [k for k in kwargs if k not in _IGNORED_KWARGS]
    if unknown:
        raise TypeError(f"forward() got unexpected keyword arguments: {', '.join(unknown)}")


def _check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if input_ids.device.type != "cpu" and input_ids.shape[1] == 1:
        # A decode step off the CPU: checked on the device, so the step never waits for the host (a bad id
        # then stops the process with a device-side assert naming the problem, as the embedding lookup would).
        torch._assert_async(((input_ids >= 0) & (input_ids < vocab_size)).all(),
                            f"llama_fast: a token id is out of range for vocab_size {vocab_size}")
        return
    if input_ids.device.type == "cpu" and input_ids.numel() <= 64:
        # a decode step: one small copy to Python beats three tensor ops and a reduction
        ids = input_ids.flatten().tolist()
        if not ids or (min(ids) >= 0 and max(ids) < vocab_size):
            return
    bad = (input_ids < 0) | (input_ids >= vocab_size)
    if bool(bad.any()):
        value = int(input_ids[bad][0])
        raise ValueError(f"token id {value} is out of range for vocab_size {vocab_size} "
                         f"(valid ids are 0..{vocab_size - 1})")


def _check_position_ids(position_ids: torch.Tensor, batch: int, t: int, device) -> torch.Tensor:
    if position_ids.dim() == 1:
        position_ids = position_ids[None]
    if position_ids.dim() != 2 or position_ids.shape[1] != t or position_ids.shape[0] not in (1, batch):
        raise ValueError(f"position_ids must be [{batch}, {t}] or [1, {t}], got {tuple(position_ids.shape)}")
    if bool((position_ids < 0).any()):
        raise ValueError("position_ids must be non-negative")
    return position_ids.to(device).expand(batch, t)


def _is_right_padded(mask: torch.Tensor) -> bool:
    if mask.dim() != 2 or mask.shape[1] < 2:
        return False
    m = mask.to(torch.int32)
    return bool((m == 0).any() and (m[:, 1:] <= m[:, :-1]).all() and (m[:, 0] == 1).all())


def _tuple_or_none(items):
    return None if items is None else tuple(items)
