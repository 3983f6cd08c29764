"""The "cpu" backend: the C++ kernels of llama_fast._C (csrc/cpu) for CPU tensors.

AVX-512 / AVX2 / portable code paths are picked at run time (LLAMA_FAST_CPU_ISA lowers the choice, `set_isa`
does the same within a process, for tests). Besides the core ops of csrc/bindings.cpp this backend declares
CPU-only extra ops (cpu_linear, cpu_argmax, cpu_isa, cpu_max_gemv_rows, cpu_attention / cpu_store_kv_ for a KV
cache of any kv_cache_dtype; the decode step in cpu_decode.py).
"""
from __future__ import annotations

import torch

from llama_fast import _native

# The C++ kernels take fp32 and bf16 activations; backend=None sends other dtypes (fp16) to the reference.
DTYPES = (torch.float32, torch.bfloat16)


def unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"it runs on CPU tensors only, not {device.type}"
    return _native.missing_reason()


def rms_norm(x, weight, eps):
    return torch.ops.llama_fast.rms_norm(x, weight, eps)


def fused_add_rms_norm(x, residual, weight, eps):
    return torch.ops.llama_fast.fused_add_rms_norm(x, residual, weight, eps)


def rotary(q, k, positions, cos, sin):
    torch.ops.llama_fast.rotary_(q, k, positions, cos, sin)
    return q, k


def attention(q, k, v, causal=True, kv_lens=None, scale=None):
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return torch.ops.llama_fast.attention(q, k, v, causal, kv_lens, float(scale))


def attention_any_cache(q, k, v, causal=True, kv_lens=None, scale=None, k_scale=None, v_scale=None):
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return torch.ops.llama_fast.cpu_attention(q, k, v, causal, kv_lens, float(scale), k_scale, v_scale)


def silu_and_mul(gate_up):
    return torch.ops.llama_fast.silu_and_mul(gate_up)


def linear(x, weight, bias=None):
    return torch.ops.llama_fast.cpu_linear(x, weight, bias)


def quant_linear(x, qweight, bias=None):
    x, qweight = qweight.kernel_input(x)      # act-order weights: gather x's features first
    return torch.ops.llama_fast.quant_linear(x, qweight.qweight, qweight.scale, qweight.offset, qweight.bits,
                                             qweight.group_size, bias)


def kquant_linear(x, weight, bias=None):
    from llama_fast.kquants import TYPE_IDS
    return torch.ops.llama_fast.kquant_linear(x, [s.blocks for s in weight.segments],
                                              [TYPE_IDS[s.kind] for s in weight.segments], bias)


def store_kv(k_cache, v_cache, k, v, slots):
    torch.ops.llama_fast.store_kv_(k_cache, v_cache, k, v, slots)


def store_kv_any_cache(k_cache, v_cache, k, v, slots, k_scale=None, v_scale=None):
    torch.ops.llama_fast.cpu_store_kv_(k_cache, v_cache, k, v, slots, k_scale, v_scale)


def set_isa(name: str = "") -> str:
    """Lowers the instruction set of the CPU kernels to `name` ("portable", "avx2", "avx512", "avx512_vnni",
    "avx512_bf16"; never above what this CPU has) and returns the one in effect; "" only reports it."""
    return torch.ops.llama_fast.cpu_isa(name)


def tuning() -> dict:
    """The CPU kernels' machine-dependent choices, made at run time from this CPU's caches (csrc/cpu/tuning.h):
    the cache sizes they were derived from, the weight streams' software prefetch distance in bytes and whether the
    dense GEMVs prefetch weights on huge pages too and whether the int4 GEMV prefetches into L2 (by CPU vendor,
    tuning.h); and from
    how many activation rows the quantized linears run the prefill GEMM instead of their GEMV kernels, at the
    instruction set in effect (int4, int8, ggml K-quant super-blocks, ggml blocks of 32); and from how many rows a
    bf16 dense linear runs the AMX GEMM, and the quantized ones the exact quantized AMX GEMM (0: never, no AMX or a
    lower instruction set in effect)."""
    (l1d, l2, l3, prefetch, int4_rows, int8_rows, super_rows, block32_rows,
     huge_page_prefetch, int4_prefetch_l2) = torch.ops.llama_fast.cpu_tuning()
    return {"l1d_bytes": l1d, "l2_bytes": l2, "l3_bytes": l3, "prefetch_bytes": prefetch,
            "prefetch_on_huge_pages": bool(huge_page_prefetch), "int4_prefetch_into_l2": bool(int4_prefetch_l2),
            "gemm_from_rows": {"int4": int4_rows, "int8": int8_rows, "ggml_super_blocks": super_rows,
                               "ggml_blocks_of_32": block32_rows},
            "amx_bf16_from_rows": torch.ops.llama_fast.cpu_amx_bf16_rows(),
            "amx_quant_from_rows": dict(zip(("int_fp32", "int_bf16", "ggml_blocks_of_32", "ggml_super_blocks"),
                                            torch.ops.llama_fast.cpu_amx_quant_rows()))}


if _native.extension() is not None:
    @torch.library.register_fake("llama_fast::cpu_linear")
    def _cpu_linear_fake(x, weight, bias):
        return x.new_empty(x.shape[:-1] + (weight.shape[0],))

    @torch.library.register_fake("llama_fast::cpu_argmax")
    def _cpu_argmax_fake(scores):
        return scores.new_empty(scores.shape[:1], dtype=torch.long)

    @torch.library.register_fake("llama_fast::cpu_attention")
    def _cpu_attention_fake(q, k, v, causal, kv_lens, scale, k_scale, v_scale):
        return q.new_empty(q.shape)

    @torch.library.register_fake("llama_fast::cpu_store_kv_")
    def _cpu_store_kv_fake(k_cache, v_cache, k, v, slots, k_scale, v_scale):
        return None

