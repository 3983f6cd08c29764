"""The "cuda" backend: hand-written CUDA kernels of llama_fast._C (csrc/cuda) for CUDA tensors.

The C++ side checks every argument; this module only adapts the Python-level calling convention (defaults,
QuantizedWeight fields) and copies inputs whose layout a kernel cannot take (the attention kernels take the
model's strided q and cache prefixes as they are).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llama_fast import _native

# The kernels' namespace (llama_fast._C registers them); looked up per call, replaceable in tests.
_kernels = torch.ops.llama_fast


def unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"it runs on CUDA tensors only, not {device.type}"
    if _native.missing_reason():
        return _native.missing_reason()
    if not _native.has_cuda_kernels():
        return "llama_fast._C was built without CUDA kernels (rebuild with CUDA_HOME set and LLAMA_FAST_CUDA=1)"
    return None


def rms_norm(x, weight, eps):
    return _kernels.rms_norm(x, weight, eps)


def fused_add_rms_norm(x, residual, weight, eps):
    return _kernels.fused_add_rms_norm(x, residual, weight, eps)


def rotary(q, k, positions, cos, sin):
    # The kernel indexes positions densely; the model's may be an expand() of [1, T] over the batch.
    _kernels.rotary_(q, k, positions.contiguous(), cos, sin)  # strided q/k views rotated in place
    return q, k


def _heads_contiguous(t):
    """The kernels take any batch / token strides (a slice of the fused qkv output, a prefix of the static
    cache: no copy) as long as each token's heads are contiguous; anything else is copied."""
    if t.dim() == 4 and t.stride(3) == 1 and (t.shape[2] == 1 or t.stride(2) == t.shape[3]):
        return t
    return t.contiguous()


# The head dims the CUDA attention kernels are compiled for.
ATTENTION_HEAD_DIMS = (64, 128)


def unsupported_attention(q, k, v, causal=True, kv_lens=None, scale=None) -> str | None:
    """The shapes the kernels do not cover (ops.attention then raises for backend="cuda", and backend=None
    runs the next backend in line, warning once)."""
    if q.shape[-1] not in ATTENTION_HEAD_DIMS:
        dims = " or ".join(map(str, ATTENTION_HEAD_DIMS))
        return f"the CUDA attention kernels take head_dim {dims}, not {q.shape[-1]}"
    return None


def attention(q, k, v, causal=True, kv_lens=None, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if kv_lens is not None:
        kv_lens = kv_lens.to(q.device)
        # More valid keys than keys given is a caller's bug; checked on the device (no host sync, capturable) and
        # in the given dtype, before narrowing (2^32 + 2 must not act as 2): a bad length stops the process with
        # this message instead of producing NaN rows.
        torch._assert_async(((kv_lens >= 0) & (kv_lens <= k.shape[1])).all(),
                            f"llama_fast attention: kv_lens must lie in [0, {k.shape[1]}] (the keys given)")
        kv_lens = kv_lens.to(torch.int32)
    k, v = _heads_contiguous(k), _heads_contiguous(v)
    if k.stride()[:2] != v.stride()[:2]:  # the kernels take one set of strides for both
        k, v = k.contiguous(), v.contiguous()
    return _kernels.attention(_heads_contiguous(q), k, v, causal, kv_lens, scale)


def silu_and_mul(gate_up):
    return _kernels.silu_and_mul(gate_up.contiguous())


def linear(x, weight, bias=None):
    # Dense matmuls are cuBLAS's job; this backend adds nothing there.
    return F.linear(x, weight, bias)


def quant_linear(x, qweight, bias=None):
    x, qweight = qweight.kernel_input(x)      # act-order weights: gather x's features first
    # The kernels read scales, offsets and bias in the activation dtype. A checkpoint's scales may come in
    # another one (GGUF stores fp16): converted once per dtype and kept with the weight (QuantizedWeight.like),
    # not on every call.
    scale, offset = qweight.scales_like(x.dtype)
    if bias is not None and bias.dtype != x.dtype:
        bias = qweight.cached(("bias", x.dtype), lambda: bias.to(x.dtype))
    return _kernels.quant_linear(x.contiguous(), qweight.qweight, scale, offset, qweight.bits,
                                             qweight.group_size, bias)


def kquant_linear(x, weight, bias=None):
    from llama_fast.kquants import TYPE_IDS
    return torch.ops.llama_fast.kquant_linear(x, [s.blocks for s in weight.segments],
                                              [TYPE_IDS[s.kind] for s in weight.segments],
                                              None if bias is None else bias.to(x.dtype))


def store_kv(k_cache, v_cache, k, v, slots):
    _kernels.store_kv_(k_cache, v_cache, k.contiguous(), v.contiguous(), slots.contiguous())
