"""Fake (meta) implementations of the llama_fast custom ops: shapes and dtypes only, so the ops trace under
torch.compile, FakeTensor and CUDA graphs. Registered when the extension is loaded."""
from __future__ import annotations

import torch


@torch.library.register_fake("llama_fast::rms_norm")
def _rms_norm(x, weight, eps):
    return torch.empty_like(x)


@torch.library.register_fake("llama_fast::fused_add_rms_norm")
def _fused_add_rms_norm(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.register_fake("llama_fast::rotary_")
def _rotary(q, k, positions, cos, sin):
    return None


@torch.library.register_fake("llama_fast::attention")
def _attention(q, k, v, causal, kv_lens, scale):
    return torch.empty_like(q)


@torch.library.register_fake("llama_fast::silu_and_mul")
def _silu_and_mul(gate_up):
    return gate_up.new_empty(gate_up.shape[:-1] + (gate_up.shape[-1] // 2,))


@torch.library.register_fake("llama_fast::quant_linear")
def _quant_linear(x, qweight, scale, offset, bits, group_size, bias):
    return x.new_empty(x.shape[:-1] + (qweight.shape[0],))


@torch.library.register_fake("llama_fast::store_kv_")
def _store_kv(k_cache, v_cache, k, v, slots):
    return None
