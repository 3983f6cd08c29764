"""Quantized checkpoints as GPTQ, AWQ and compressed-tensors write them, for the tests: a tiny random
transformers Llama, its linear weights quantized round-to-nearest here and packed by code written from each
format's definition (AutoGPTQ / AutoAWQ / compressed-tensors are not installed and not used).

    model = tiny_llama(seed)
    expected = write_checkpoint(directory, model, "gptq", bits=4, group_size=32, desc_act=True)

`expected` maps each quantized linear's transformers name ("model.layers.0.self_attn.q_proj.weight") to the
weight the format's dequantization formula gives, in fp64 (exact: small integers times fp16 scales).
"""
from __future__ import annotations

import json
import os

import torch

from llama_fast.formats import safetensors as safetensors_format

SMALL = dict(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
_INPUT_OF = {"self_attn.q_proj": 0, "self_attn.k_proj": 0, "self_attn.v_proj": 0, "self_attn.o_proj": 1,
             "mlp.gate_proj": 2, "mlp.up_proj": 2, "mlp.down_proj": 3}
AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]     # nibble p of a word holds column 8j + AWQ_PACK_ORDER[p]


def tiny_llama(seed: int = 0, **overrides):
    import transformers

    from conftest import randomize_  # tests/conftest.py (imported here: the Triton suite has its own conftest)
    config = transformers.LlamaConfig(**{**SMALL, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return randomize_(transformers.LlamaForCausalLM(config), seed).eval()


def rtn(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, scale_dtype=torch.float16):
    """Round-to-nearest over contiguous groups of K: (codes [N, K] int64 in 0..2^bits-1, scale [N, G] in
    scale_dtype, zero [N, G] int64), with w ~ scale * (codes - zero)."""
    n, k = w.shape
    g = k if group_size == -1 else group_size
    maxq = 2 ** bits - 1
    wg = w.double().reshape(n, k // g, g)
    if symmetric:
        scale = (wg.abs().amax(-1) / (maxq / 2)).clamp_min(1e-8)
        zero = torch.full_like(scale, (maxq + 1) // 2, dtype=torch.int64)
    else:
        lo, hi = wg.amin(-1).clamp_max(0), wg.amax(-1).clamp_min(0)
        scale = ((hi - lo) / maxq).clamp_min(1e-8)
        zero = torch.round(-lo / scale).to(torch.int64).clamp(0, maxq)
    scale = scale.to(scale_dtype)
    codes = torch.round(wg / scale.double().unsqueeze(-1)).to(torch.int64) + zero.unsqueeze(-1)
    return codes.clamp(0, maxq).reshape(n, k), scale, zero


def quantize_weight(w, bits, group_size, symmetric, act_order_seed=None, scale_dtype=torch.float16):
    """rtn, optionally in GPTQ's act-order: groups are formed over a random permutation of K, and g_idx [K]
    names each input feature's group. -> (codes [N, K], scale [N, G], zero [N, G], g_idx [K] int32)."""
    n, k = w.shape
    g = k if group_size == -1 else group_size
    if act_order_seed is None:
        codes, scale, zero = rtn(w, bits, group_size, symmetric, scale_dtype)
        return codes, scale, zero, (torch.arange(k) // g).to(torch.int32)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(act_order_seed))
    codes_p, scale, zero = rtn(w[:, perm], bits, group_size, symmetric, scale_dtype)
    codes = torch.empty_like(codes_p)
    codes[:, perm] = codes_p
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = (torch.arange(k) // g).to(torch.int32)
    return codes, scale, zero, g_idx


def formula(codes, scale, zero, g_idx) -> torch.Tensor:
    """scale[n, g_idx[k]] * (codes[n, k] - zero[n, g_idx[k]]) in fp64."""
    g = g_idx.long()
    return scale.double()[:, g] * (codes.double() - zero.double()[:, g])


def to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 values in 0..2^32-1 -> the int32 with the same bits."""
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def pack_rows(values: torch.Tensor, bits: int, order=None) -> torch.Tensor:
    """values [R, C] (0..2^bits-1) -> int32 [R, C * bits / 32] packed along C: value c = j * per + order[p]
    at bits [p * bits, (p + 1) * bits) of word j (order: identity unless given)."""
    per = 32 // bits
    r, c = values.shape
    order = order or list(range(per))
    grouped = values.to(torch.int64).reshape(r, c // per, per)
    words = torch.zeros(r, c // per, dtype=torch.int64)
    for p, col in enumerate(order):
        words |= grouped[:, :, col] << (p * bits)
    return to_int32(words)


def pack_gptq(codes, scale, zero, g_idx, bits, v1=True) -> tuple[dict, torch.Tensor]:
    """-> ({qweight [K / per, N] packed along K, qzeros [G, N / per] packed along N, scales [G, N], g_idx},
    the zero the format's formula then uses): v1 stores zero - 1 in `bits` bits and reads it back plus one."""
    maxq = 2 ** bits - 1
    stored = (zero - 1) & maxq if v1 else zero
    parts = {"qweight": pack_rows(codes, bits).t().contiguous(), "qzeros": pack_rows(stored.t().contiguous(), bits),
             "scales": scale.t().contiguous(), "g_idx": g_idx}
    return parts, stored + 1 if v1 else stored


def pack_awq(codes, scale, zero) -> dict:
    return {"qweight": pack_rows(codes.t().contiguous(), 4, AWQ_PACK_ORDER),
            "qzeros": pack_rows(zero.t().contiguous(), 4, AWQ_PACK_ORDER), "scales": scale.t().contiguous()}


def pack_compressed_tensors(codes, scale, zero, bits, symmetric, strategy) -> dict:
    """pack-quantized: codes are stored unsigned (signed q + 2^(bits-1), which is what `codes` already are),
    packed along K; asymmetric zero points (signed, stored the same way) packed along N."""
    n, k = codes.shape
    parts = {"weight_packed": pack_rows(codes, bits), "weight_scale": scale.contiguous(),
             "weight_shape": torch.tensor([n, k], dtype=torch.int64)}
    if not symmetric:
        parts["weight_zero_point"] = pack_rows(zero.t().contiguous(), bits).t().contiguous()
    return parts


def write_checkpoint(directory, model, fmt: str, bits: int = 4, group_size: int = 32, symmetric: bool = False,
                     desc_act: bool = False, v1: bool = True, strategy: str = "group", dense_modules=(),
                     awq_spelling: str = "transformers", scale_dtype=torch.float16, sidecar: bool = False,
                     act_order_seeds=None) -> dict:
    """Writes `model` (a transformers Llama) as a `fmt` ("gptq", "awq", "compressed-tensors") checkpoint into
    `directory`; returns {transformers weight name: the formula's dequantized weight, fp64} for the quantized
    linears. dense_modules: linear names (e.g. "model.layers.1.mlp.down_proj") stored dense, listed in
    modules_to_not_convert / ignore. act_order_seeds: {module name: seed} overriding desc_act's seeds."""
    os.makedirs(directory, exist_ok=True)
    tensors, expected = {}, {}
    state = {k: v.detach() for k, v in model.state_dict().items()}
    for i in range(model.config.num_hidden_layers):
        for linear in LINEARS:
            base = f"model.layers.{i}.{linear}"
            w = state.pop(f"{base}.weight")
            if base in dense_modules:
                tensors[f"{base}.weight"] = w
                continue
            seed = None
            if fmt == "gptq" and desc_act:
                # q/k/v share one input and gate/up another: GPTQ orders each input once, so they share g_idx
                seed = (act_order_seeds or {}).get(base, 100 * i + _INPUT_OF[linear])
            gs = -1 if strategy == "channel" else group_size
            codes, scale, zero, g_idx = quantize_weight(w, bits, gs, symmetric, seed, scale_dtype)
            if fmt == "gptq":
                parts, zero = pack_gptq(codes, scale, zero, g_idx, bits, v1)
            elif fmt == "awq":
                parts = pack_awq(codes, scale, zero)
            else:
                parts = pack_compressed_tensors(codes, scale, zero, bits, symmetric, strategy)
            tensors.update({f"{base}.{k}": v for k, v in parts.items()})
            expected[f"{base}.weight"] = formula(codes, scale, zero, g_idx)
    tensors.update(state)
    safetensors_format.write(os.path.join(directory, "model.safetensors"), sorted(tensors.items()))
    config = model.config.to_dict()
    config["torch_dtype"] = "float32"
    quantization = _quantization_config(fmt, bits, group_size, symmetric, desc_act, v1, strategy, dense_modules,
                                        awq_spelling)
    if sidecar:
        name = "quantize_config.json" if fmt == "gptq" else "quant_config.json"
        quantization.pop("quant_method")
        with open(os.path.join(directory, name), "w") as f:
            json.dump(quantization, f)
    else:
        config["quantization_config"] = quantization
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    return expected


def _quantization_config(fmt, bits, group_size, symmetric, desc_act, v1, strategy, dense_modules, awq_spelling):
    if fmt == "gptq":
        return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act,
                "sym": symmetric, "true_sequential": True, "damp_percent": 0.01, "static_groups": False,
                "checkpoint_format": "gptq" if v1 else "gptq_v2"}
    if fmt == "awq":
        if awq_spelling == "autoawq":
            return {"quant_method": "awq", "w_bit": bits, "q_group_size": group_size, "zero_point": True,
                    "version": "GEMM"}
        return {"quant_method": "awq", "bits": bits, "group_size": group_size, "zero_point": True,
                "version": "gemm", "modules_to_not_convert": [m.rpartition(".")[2] for m in dense_modules] or None}
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": strategy,
               "group_size": group_size if strategy == "group" else None, "dynamic": False, "observer": "minmax"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": "pack-quantized"}},
            "ignore": ["lm_head", *dense_modules], "kv_cache_scheme": None}
