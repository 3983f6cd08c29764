"""The "cuda" backend: hand-written CUDA kernels of llama_fast._C (csrc/cuda) for CUDA tensors.

The C++ side checks every argument; this module only adapts the Python-level calling convention (defaults,
QuantizedWeight fields) and copies inputs whose layout a kernel cannot take (the attention kernels take the
model's strided q and cache prefixes as they are).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llama_fast import _native


def unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"it runs on CUDA tensors only, not {device.type}"
    if _native.missing_reason():
        return _native.missing_reason()
    if not _native.has_cuda_kernels():
        return "llama_fast._C was built without CUDA kernels (rebuild with CUDA_HOME set and LLAMA_FAST_CUDA=1)"
    return None


def rms_norm(x, weight, eps):
    return torch.ops.llama_fast.rms_norm(x, weight, eps)


def fused_add_rms_norm(x, residual, weight, eps):
    return torch.ops.llama_fast.fused_add_rms_norm(x, residual, weight, eps)


def rotary(q, k, positions, cos, sin):
    torch.ops.llama_fast.rotary_(q, k, positions, cos, sin)  # strided q/k views are rotated in place
    return q, k


def _heads_contiguous(t):
    """The kernels take any batch / token strides (a slice of the fused qkv output, a prefix of the static
    cache: no copy) as long as each token's heads are contiguous; anything else is copied."""
    if t.dim() == 4 and t.stride(3) == 1 and (t.shape[2] == 1 or t.stride(2) == t.shape[3]):
        return t
    return t.contiguous()


# The head dims the CUDA attention kernels are compiled for.
ATTENTION_HEAD_DIMS = (64, 128)


def _fallback(op: str, device: torch.device):
    """The next backend in line (Triton, else the reference) for shapes the CUDA kernels do not cover, so a
    model with another head_dim still runs on the GPU rather than failing."""
    from llama_fast.ops import _backend

    for name in ("triton", "torch"):
        try:
            return _backend.resolve(op, name, device)
        except _backend.BackendUnavailableError:
            continue
    raise _backend.BackendUnavailableError(f"no backend can run {op} on {device}")


def attention(q, k, v, causal=True, kv_lens=None, scale=None):
    if q.shape[-1] not in ATTENTION_HEAD_DIMS:
        return _fallback("attention", q.device)(q, k, v, causal, kv_lens, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if kv_lens is not None:
        kv_lens = kv_lens.to(device=q.device, dtype=torch.int32)
    k, v = _heads_contiguous(k), _heads_contiguous(v)
    if k.stride()[:2] != v.stride()[:2]:  # the kernels take one set of strides for both
        k, v = k.contiguous(), v.contiguous()
    return torch.ops.llama_fast.attention(_heads_contiguous(q), k, v, causal, kv_lens, scale)


def silu_and_mul(gate_up):
    return torch.ops.llama_fast.silu_and_mul(gate_up.contiguous())


def linear(x, weight, bias=None):
    # Dense matmuls are cuBLAS's job; this backend adds nothing there.
    return F.linear(x, weight, bias)


def quant_linear(x, qweight, bias=None):
    # The kernels read scales, offsets and bias in the activation dtype. A checkpoint's scales may come in
    # another one (GGUF stores fp16); converting these small [N, K/g] tensors is cheap next to the GEMV.
    def like_x(t):
        return None if t is None else t.to(x.dtype)

    return torch.ops.llama_fast.quant_linear(x.contiguous(), qweight.qweight, like_x(qweight.scale),
                                             like_x(qweight.offset), qweight.bits, qweight.group_size, like_x(bias))


def kquant_linear(x, weight, bias=None):
    from llama_fast.kquants import TYPE_IDS
    return torch.ops.llama_fast.kquant_linear(x, [s.blocks for s in weight.segments],
                                              [TYPE_IDS[s.kind] for s in weight.segments],
                                              None if bias is None else bias.to(x.dtype))


def store_kv(k_cache, v_cache, k, v, slots):
    torch.ops.llama_fast.store_kv_(k_cache, v_cache, k.contiguous(), v.contiguous(), slots.contiguous())
