"""Pure-PyTorch reference of every op: the oracle each kernel is tested against, and the "torch" backend.

Written for clarity, not speed. In fp32 these reproduce transformers' LlamaForCausalLM to rounding; in
lower precision they compute in fp32 and round once, which is at least as accurate as transformers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def unavailable_reason(device: torch.device) -> str | None:
    return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    # transformers rounds the normalized activations to the input dtype before the weight multiply.
    return weight * normed.to(x.dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    new_residual = x + residual
    return rms_norm(new_residual, weight, eps), new_residual


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B,T,H,D]; cos/sin [B,T,1,D/2]. rotate_half: the first half pairs with the second half.
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    pos = positions.long()
    c = cos[pos].unsqueeze(2)
    s = sin[pos].unsqueeze(2)
    q.copy_(_rotate(q, c, s))
    k.copy_(_rotate(k, c, s))
    return q, k


def attention_mask(batch: int, tq: int, tk: int, causal: bool, kv_lens: torch.Tensor | None,
                   device: torch.device) -> torch.Tensor:
    """[B, 1, Tq, Tk] bool: which keys each query may attend to under the ops.attention contract."""
    lens = (torch.full((batch,), tk, device=device, dtype=torch.long) if kv_lens is None
            else kv_lens.to(device=device, dtype=torch.long))
    key = torch.arange(tk, device=device)
    mask = (key[None, None, :] < lens[:, None, None]).expand(batch, tq, tk)
    if causal:
        query_pos = lens[:, None] - tq + torch.arange(tq, device=device)[None, :]  # [B, Tq]
        mask = mask & (key[None, None, :] <= query_pos[:, :, None])
    return mask[:, None]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              kv_lens: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    qf = q.float().transpose(1, 2)
    kf = k.float().transpose(1, 2).repeat_interleave(group, dim=1)
    vf = v.float().transpose(1, 2).repeat_interleave(group, dim=1)
    scores = (qf @ kf.transpose(-1, -2)) * scale
    mask = attention_mask(b, tq, tk, causal, kv_lens, q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(mask.any(-1, keepdim=True), probs, torch.zeros_like(probs))  # no valid key -> 0
    return (probs @ vf).transpose(1, 2).to(q.dtype)


def attention_any_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                        kv_lens: torch.Tensor | None = None, scale: float | None = None,
                        k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """attention over keys / values as a KV cache of any kv_cache_dtype stores them: a float dtype other than
    q's, or int8 with k_scale / v_scale [B, Tk, Hkv] (value = q * scale, see quantize_kv_rows)."""
    return attention(q, dequantize_kv(k, k_scale), dequantize_kv(v, v_scale), causal, kv_lens, scale)
def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(gate_up.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def quant_linear(x: torch.Tensor, qweight, bias: torch.Tensor | None = None) -> torch.Tensor:
    out = x.float() @ qweight.dequantize(torch.float32).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def kquant_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T for a KQuantWeight W, dequantized exactly (gguf.quants' numbers) and multiplied in fp32."""
    out = F.linear(x.float(), weight.dequantize(torch.float32), None if bias is None else bias.float())
    return out.to(x.dtype)


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slots: torch.Tensor) -> None:
    store_kv_any_cache(k_cache, v_cache, k, v, slots)


def store_kv_any_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       slots: torch.Tensor, k_scale: torch.Tensor | None = None,
                       v_scale: torch.Tensor | None = None) -> None:
    """store_kv into a cache of any kv_cache_dtype: a float cache takes the values rounded once to its dtype, an
    int8 cache (with k_scale / v_scale [B, S, Hkv]) their quantize_kv_rows."""
    keep = slots >= 0
    rows = torch.arange(k.shape[0], device=k.device)[:, None].expand_as(slots)[keep]
    cols = slots[keep].long()
    for cache, scales, x in ((k_cache, k_scale, k), (v_cache, v_scale, v)):
        if cache.dtype == torch.int8:
            codes, row_scales = quantize_kv_rows(x[keep])
            cache[rows, cols] = codes
            scales[rows, cols] = row_scales
        else:
            cache[rows, cols] = x[keep].to(cache.dtype)


def quantize_kv_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., D] -> (int8 codes [..., D], fp32 scales [...]): symmetric int8 per row of D values (one token of one
    kv head), scale = max|x| / 127, code = round(x / scale) (half to even). An all-zero row gets scale 0; a row
    holding inf or NaN gets scale NaN (and codes 0), so attention over it is NaN as over a float cache."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    finite = torch.isfinite(xf).all(dim=-1)
    scale = amax / 127.0
    safe = torch.where(finite & (amax > 0), scale, torch.ones_like(scale))
    codes = torch.round(xf / safe[..., None]).clamp_(-127, 127)
    codes = torch.where((finite & (amax > 0))[..., None], codes, torch.zeros_like(codes)).to(torch.int8)
    scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    return codes, scale


def dequantize_kv(cache: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """A cache's keys or values as fp32 (int8: code x its row's scale; float dtypes: exact)."""
    if cache.dtype == torch.int8:
        if scale is None:
            raise ValueError("an int8 KV cache needs its scales (k_scale / v_scale)")
        return cache.float() * scale[..., None]
    return cache.float()
