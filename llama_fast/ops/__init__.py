"""The fused ops of a Llama forward pass: the stable entry points that the model (and users) call.

Each op picks its implementation through `backend`: "torch" (the pure-PyTorch reference in reference.py),
"cpu" (C++ kernels), "triton", "cuda", or None for the fastest one that runs on the input's device. Every
implementation follows the contract documented here and is tested against the reference.

The fallback rule (see _backend.py): a backend asked for by name runs or raises BackendUnavailableError
saying why; backend=None may fall back to a slower backend but warns once (BackendFallbackWarning) naming
the backend it passed over and why.
"""
from __future__ import annotations

import torch

from llama_fast.ops._backend import (
    BACKENDS,
    BackendFallbackWarning,
    BackendUnavailableError,
    default_backend,
    resolve,
    resolve_for,
    unavailable_reason,
)

__all__ = [
    "BACKENDS", "BackendUnavailableError", "BackendFallbackWarning", "default_backend", "unavailable_reason",
    "rms_norm", "fused_add_rms_norm", "rotary", "attention", "silu_and_mul", "linear", "quant_linear",
    "kquant_linear", "store_kv",
]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, backend: str | None = None) -> torch.Tensor:
    """x [..., H] -> x * rsqrt(mean(x^2) + eps) * weight, computed in fp32."""
    return resolve("rms_norm", backend, x.device, x.dtype)(x, weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                       backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (rms_norm(x + residual), x + residual)."""
    return resolve("fused_add_rms_norm", backend, x.device, x.dtype)(x, residual, weight, eps)


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding in place (HF rotate_half convention). q [B,T,Hq,D], k [B,T,Hkv,D], positions [B,T],
    cos/sin [max_pos, D//2] fp32. Returns (q, k)."""
    return resolve("rotary", backend, q.device, q.dtype)(q, k, positions, cos, sin)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              kv_lens: torch.Tensor | None = None, scale: float | None = None,
              backend: str | None = None, *, k_scale: torch.Tensor | None = None,
              v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Causal GQA/MQA/MHA attention. q [B,Tq,Hq,D], k/v [B,Tk,Hkv,D] with Hq % Hkv == 0; kv_lens [B] int32
    (None = Tk): keys 0..kv_lens[b]-1 are valid and query i sits at position kv_lens[b]-Tq+i (bottom-right
    causal, as flash_attn_with_kvcache). A query row with no valid key (left padding) gives zeros.
    -> [B,Tq,Hq,D] in q's dtype, softmax accumulated in fp32.
    k/v may be a KV cache of another kv_cache_dtype (llama_fast.cache): a float dtype other than q's, or int8
    with k_scale / v_scale fp32 [B,Tk,Hkv] (key = code x scale); the "torch" and "cpu" backends read those."""
    if k.dtype == q.dtype and k_scale is None and v_scale is None:
        return resolve_for("attention", backend, q.device, q.dtype, q, k, v, causal, kv_lens, scale)(
            q, k, v, causal, kv_lens, scale)
    fn = _any_cache_op("attention_any_cache", backend, q, k)
    return fn(q, k, v, causal, kv_lens, scale, k_scale, v_scale)


def _any_cache_op(op: str, backend: str | None, x: torch.Tensor, cache: torch.Tensor):
    """The backend function reading / writing a KV cache whose dtype is not the activations' (kv_cache_dtype).
    Only the C++ CPU kernels read such caches at speed: off the CPU, backend=None raises instead of running the
    reference (a silent slow path); backend="torch" runs it when asked for."""
    if backend is None and x.device.type != "cpu":
        raise BackendUnavailableError(
            f"a KV cache in {cache.dtype} with {x.dtype} activations (kv_cache_dtype) has kernels on the CPU only; "
            f"on {x.device.type} keep kv_cache_dtype=None (the model dtype) or pass backend='torch' (the slow "
            f"reference)")
    try:
        return resolve(op, backend, x.device, x.dtype)
    except BackendUnavailableError as e:
        raise BackendUnavailableError(
            f"a KV cache in {cache.dtype} with {x.dtype} activations (kv_cache_dtype) is read by the 'cpu' and "
            f"'torch' backends only: {e}") from None
def silu_and_mul(gate_up: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """[..., 2I] = [gate | up] -> silu(gate) * up, [..., I]."""
    return resolve("silu_and_mul", backend, gate_up.device, gate_up.dtype)(gate_up)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           backend: str | None = None) -> torch.Tensor:
    """Dense x @ weight.T (+ bias), weight [N, K]."""
    return resolve("linear", backend, x.device, x.dtype)(x, weight, bias)


def quant_linear(x: torch.Tensor, qweight, bias: torch.Tensor | None = None,
                 backend: str | None = None) -> torch.Tensor:
    """x @ qweight.dequantize().T (+ bias) for a llama_fast.quant.QuantizedWeight, fp32 accumulation."""
    return resolve("quant_linear", backend, x.device, x.dtype)(x, qweight, bias)


def kquant_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None,
                  backend: str | None = None) -> torch.Tensor:
    """x @ weight.dequantize().T (+ bias) for a llama_fast.kquants.KQuantWeight (ggml K-quant / Q5_0 / Q5_1
    blocks read as stored), fp32 accumulation."""
    return resolve("kquant_linear", backend, x.device, x.dtype)(x, weight, bias)


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slots: torch.Tensor, backend: str | None = None, *, k_scale: torch.Tensor | None = None,
             v_scale: torch.Tensor | None = None) -> None:
    """k_cache[b, slots[b, t]] = k[b, t] (same for v); caches [B,S,Hkv,D], k/v [B,T,Hkv,D], slots [B,T];
    negative slots (left padding) are skipped. A cache of another kv_cache_dtype takes k/v rounded once to its
    float dtype, or for int8 (with k_scale / v_scale fp32 [B,S,Hkv]) quantized per (token, kv head) row:
    scale = max|x| / 127, code = round(x / scale) (reference.quantize_kv_rows)."""
    if k_cache.dtype == k.dtype and k_scale is None and v_scale is None:
        resolve("store_kv", backend, k.device, k.dtype)(k_cache, v_cache, k, v, slots)
        return
    _any_cache_op("store_kv_any_cache", backend, k, k_cache)(k_cache, v_cache, k, v, slots, k_scale, v_scale)
