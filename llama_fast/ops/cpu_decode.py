"""The decoder stack of a decode step in one C++ call (llama_fast::cpu_decode_step) for models on the CPU.

A decode step is a few tokens against a big cache; run layer by layer from Python it costs ~12 op calls per
layer (qkv, rotary, store_kv, attention, o_proj, two norms, gate_up, silu_and_mul, down), several microseconds
each, which for a small model weighs as much as the weights' memory traffic. LlamaModel.forward hands such
steps here (see `can_run`); prefill and everything else keep the op-by-op path.

Every weight form of llama_fast.linear.Linear runs there with the kernel the op-by-op path uses: dense, affine
int4 / int8 (with GPTQ act-order's input permutation, gathered in the plan) and ggml blocks (K-quants, Q5_0 /
Q5_1). The weights are gathered once per model into a C++ plan (llama_fast.CpuDecodePlan, which validates them and
keeps the scratch buffers), one `add_layer` per decoder layer with the named fields that
LlamaDecoderLayer.decode_fields builds, and reused; it is rebuilt when that model's weights change
(llama_fast.weights_version).
"""
from __future__ import annotations

import functools
import weakref

import torch

from llama_fast import _native, weights_version

# model -> (WeightsVersion watching it, its count at build time, layers, CpuDecodePlan). Kept outside the module so
# that copy.deepcopy and pickling of a model never meet the C++ object (a copy builds its own plan on its first
# step).
_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@functools.cache
def max_rows() -> int:
    """Batch x new tokens the GEMV kernels take in one pass over the weights (the C++ constant kMaxGemvRows)."""
    return int(torch.ops.llama_fast.cpu_max_gemv_rows())


def _plan(model):
    """The model's llama_fast.CpuDecodePlan: its weights validated once, rebuilt when they change (see
    llama_fast.weights_version; the plan itself re-validates when a tensor it holds changes in place).
    Every layer form runs there (decode_fields names them); an invalid weight is an error from add_layer or
    the first step."""
    cached = _PLANS.get(model)
    layers = tuple(model.layers)
    if cached is not None and cached[1] == cached[0].count and cached[2] == layers:
        return cached[3]
    version = cached[0] if cached is not None else weights_version.WeightsVersion()
    version.watch(model)
    attn = layers[0].self_attn
    plan = torch.classes.llama_fast.CpuDecodePlan(model.norm.weight, attn.num_heads, attn.num_kv_heads,
                                                  attn.head_dim, float(model.norm.eps))
    for layer in layers:
        # The module's own tensors (not detached copies): a plan holding them sees in-place changes
        plan.add_layer(*layer.decode_fields())
    _PLANS[model] = (version, version.count, layers, plan)
    return plan


def can_run(model, hidden: torch.Tensor, *, output_attentions=False, output_hidden_states=False, step=None) -> bool:
    """Whether this forward call of `model` (a LlamaModel) is a decode step the fused C++ stack can run: at most
    max_rows() tokens, pads not counted (the stack skips them; `step`: the call's slots, -1 for a pad)."""
    if hidden.device.type != "cpu" or hidden.dtype not in (torch.float32, torch.bfloat16):
        return False
    if output_attentions or output_hidden_states or len(model.layers) == 0:
        return False
    tensor_parallel = getattr(model, "tensor_parallel", None)
    if tensor_parallel is not None and tensor_parallel.world > 1:
        # The C++ stack runs every layer in one call, with no place for the all-reduces after o_proj and
        # down_proj: a tensor-parallel rank decodes op by op (llama_fast.parallel).
        return False
    if _native.extension() is None:
        return False
    if hidden.shape[0] * hidden.shape[1] > max_rows() and (step is None or int((step.slots >= 0).sum()) > max_rows()):
        return False
    if any(getattr(m, "backend", None) not in (None, "cpu") for m in (model, model.layers[0])):
        return False
    cfg = model.config
    return getattr(cfg, "hidden_act", "silu") == "silu" and _plan(model) is not None


def run(model, hidden: torch.Tensor, step, cache) -> torch.Tensor:
    """The final-normed hidden states of the decoder stack for `hidden` (the embeddings), writing this step's
    keys/values into `cache`. `step` carries positions, slots, kv_lens, kv_span, cos, sin (LlamaModel._prepare)."""
    kv_lens = step.kv_lens
    if kv_lens.dtype != torch.int32:
        kv_lens = kv_lens.to(torch.int32)
    k_scales = [] if cache.k_scale[0] is None else cache.k_scale      # int8 kv_cache_dtype: per-layer scales
    v_scales = [] if cache.v_scale[0] is None else cache.v_scale
    return torch.ops.llama_fast.cpu_decode_step(
        _plan(model), hidden.contiguous(), cache.k, cache.v, step.positions.contiguous(), step.slots.contiguous(),
        kv_lens.contiguous(), int(step.kv_span), step.cos.contiguous(), step.sin.contiguous(), k_scales, v_scales)


if _native.extension() is not None:
    @torch.library.register_fake("llama_fast::cpu_decode_step")
    def _cpu_decode_step_fake(plan, hidden, k_caches, v_caches, positions, slots, kv_lens, kv_span, cos, sin,
                              k_scales, v_scales):
        return torch.empty_like(hidden)
