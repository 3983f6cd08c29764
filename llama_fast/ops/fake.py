"""The fake (meta) implementation of every llama_fast op: output shapes and dtypes only, so the ops trace under
torch.compile, FakeTensorMode and CUDA graphs. The one copy: the C++ ops (llama_fast::*, registered by
`register()` when the extension loads) and the Triton ops (llama_fast_triton::*, kernels/*.py) both use these.

The contract they encode (docs/KERNELS.md, "Fake contract"): an op's outputs have the activations' dtype and
device; every floating-point input that is not a quantized weight's scale / offset (norm weight, residual, k, v,
bias) has that same dtype, which the kernels check (a mixed-dtype call is an error in every kernel backend;
only the reference promotes, as transformers would). In-place ops return nothing; their Python wrappers return
the mutated inputs.
"""
from __future__ import annotations

import torch


def rms_norm(x, weight, eps=1e-6):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def fused_add_rms_norm(x, residual, weight, eps=1e-6):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


def rotary_(q, k, positions, cos, sin):
    return None


def attention(q, k, v, causal=True, kv_lens=None, scale=None):
    return q.new_empty(q.shape)


def silu_and_mul(gate_up):
    return gate_up.new_empty(gate_up.shape[:-1] + (gate_up.shape[-1] // 2,))


def quant_linear(x, qweight, scale, offset, bits, group_size, bias):
    return x.new_empty(x.shape[:-1] + (qweight.shape[0],))


def kquant_linear(x, blocks, types, bias):
    return x.new_empty(x.shape[:-1] + (sum(b.shape[0] for b in blocks),))


def store_kv_(k_cache, v_cache, k, v, slots):
    return None


OPS = {"rms_norm": rms_norm, "fused_add_rms_norm": fused_add_rms_norm, "rotary_": rotary_,
       "attention": attention, "silu_and_mul": silu_and_mul, "quant_linear": quant_linear,
       "kquant_linear": kquant_linear, "store_kv_": store_kv_}


def register(namespace: str = "llama_fast") -> None:
    """Registers the fakes for the core ops declared in csrc/bindings.cpp (once the extension is loaded)."""
    for name, fn in OPS.items():
        torch.library.register_fake(f"{namespace}::{name}")(fn)
