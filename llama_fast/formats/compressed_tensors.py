"""compressed-tensors checkpoints (quantization_config.quant_method "compressed-tensors", format
"pack-quantized": llm-compressor's W4A16 / W8A16), read from the format's definition (the compressed-tensors
project's PackedQuantizationCompressor), not with its code.

A quantized linear `x` [N out, K in] is stored as
    x.weight_packed      int32 [N, ceil(K * b / 32)]  codes packed along K: code k at bit k * b, stored
                                                      unsigned (the signed code q plus 2^(b-1))
    x.weight_scale       [N, K / group_size] (strategy "group"), [N, 1] ("channel") or [1] ("tensor")
    x.weight_zero_point  asymmetric only: signed zero points, packed along N the same way
                         (int32 [ceil(N * b / 32), G]; older files: int8 [N, G] unpacked)
    x.weight_shape       int64 [2] = (N, K)
    x.weight_g_idx       only from the removed actorder "group": the group of each input feature
and dequantizes as  w = scale * (q - zero)  with q, zero signed, i.e.  scale * (stored - (zero + 2^(b-1))).
Which modules are quantized follows from the tensors; their scheme is the config group whose `targets`
match ("Linear", "re:<regex>" or a module name) and `ignore` excludes. Supported: int weights of 4 or 8
bits, symmetric or not, strategies group / channel / tensor, static. Activation quantization (W4A8, W8A8,
FP8), other formats, sparse storage, transforms and KV-cache quantization raise an error naming them.
"""
from __future__ import annotations

import re

import torch

from llama_fast.formats.zero_point import PackedAxis, split_group_index, unpack_int32, zero_point_weight
from llama_fast.quant import QuantizedWeight

METHOD = "compressed-tensors"
FORMAT = "pack-quantized"
_STRATEGIES = ("group", "channel", "tensor")


class CompressedTensorsFormat:
    parts = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")
    required = ("weight_packed", "weight_scale", "weight_shape")

    def __init__(self, config: dict):
        if config.get("kv_cache_scheme"):
            raise ValueError("compressed-tensors kv_cache_scheme (a quantized KV cache) is not supported")
        sparsity = config.get("sparsity_config") or {}
        if sparsity.get("format", "dense") != "dense":
            raise ValueError(f"compressed-tensors sparsity format {sparsity.get('format')!r} is not supported "
                             "(llama_fast reads dense-stored weights)")
        if config.get("transform_config"):
            raise ValueError("compressed-tensors transform_config (rotations applied to weights and activations) "
                             "is not supported")
        groups = config.get("config_groups") or {}
        if not isinstance(groups, dict) or not groups:
            raise ValueError("compressed-tensors quantization_config has no config_groups")
        self.schemes = [self._scheme(name, g, config.get("format")) for name, g in groups.items()]
        self.ignore = list(config.get("ignore") or [])

    @staticmethod
    def _scheme(name: str, group: dict, default_format) -> dict:
        what = f"compressed-tensors config group {name!r}"
        fmt = group.get("format") or default_format
        if fmt != FORMAT:
            raise ValueError(f"{what}: format {fmt!r} is not supported: llama_fast reads {FORMAT!r} "
                             "(int4 / int8 weight-only)")
        for acts in ("input_activations", "output_activations"):
            if group.get(acts):
                raise ValueError(f"{what} quantizes {acts}: activation quantization is not supported "
                                 "(llama_fast reads weight-only schemes such as W4A16 / W8A16)")
        w = group.get("weights") or {}
        if w.get("type", "int") != "int" or w.get("num_bits") not in (4, 8):
            raise ValueError(f"{what}: {w.get('type', 'int')} weights of {w.get('num_bits')!r} bits are not "
                             "supported (int 4 and int 8 are)")
        if w.get("strategy") not in _STRATEGIES:
            raise ValueError(f"{what}: weight strategy {w.get('strategy')!r} is not supported "
                             f"({', '.join(_STRATEGIES)} are)")
        if w.get("dynamic"):
            raise ValueError(f"{what}: dynamic weight quantization is not supported")
        targets = group.get("targets") or []
        return {"targets": list(targets), "bits": w["num_bits"], "symmetric": w.get("symmetric", True),
                "strategy": w["strategy"], "group_size": w.get("group_size")}

    def scheme_for(self, module: str) -> dict:
        if any(_matches(t, module) for t in self.ignore):
            raise ValueError(f"{module}: stored quantized but listed in the config's ignore list")
        for scheme in self.schemes:
            if any(_matches(t, module) for t in scheme["targets"]):
                return scheme
        raise ValueError(f"{module}: stored quantized but no config group targets it")

    def shard_axes(self, base: str, part: str, dtype: torch.dtype) -> tuple[PackedAxis | None, PackedAxis | None]:
        """(N axis, K axis) of a stored part (formats.zero_point). Strategies channel / tensor have one group
        over K (read whole along K); tensor has one scale in all."""
        scheme = self.scheme_for(base)
        per = 32 // scheme["bits"]
        group = PackedAxis(1, scheme["group_size"]) if scheme["strategy"] == "group" else None
        rows = None if scheme["strategy"] == "tensor" else PackedAxis(0, 1)
        if part == "weight_packed":
            return PackedAxis(0, 1), PackedAxis(1, per)
        if part == "weight_scale":
            return rows, group
        if part == "weight_zero_point":     # packed along N (int32), or older files' unpacked int8
            return PackedAxis(0, per if dtype == torch.int32 else 1), group
        return None, None                   # weight_shape, weight_g_idx: see localize

    def localize(self, base: str, parts: dict[str, torch.Tensor], split_dim: int, size: int) -> None:
        """weight_shape becomes the slice's (N, K); weight_g_idx as GPTQ's g_idx."""
        shape = parts.get("weight_shape")
        if shape is not None and shape.numel() == 2 and not shape.is_floating_point():
            local = shape.clone().reshape(2)
            local[split_dim] = size
            parts["weight_shape"] = local
        if "weight_g_idx" in parts:
            g_idx = split_group_index(base, parts.pop("weight_g_idx"), split_dim,
                                      self.scheme_for(base)["group_size"])
            if g_idx is not None:
                parts["weight_g_idx"] = g_idx

    def weight(self, base: str, parts: dict[str, torch.Tensor]) -> QuantizedWeight:
        scheme = self.scheme_for(base)
        bits, offset = scheme["bits"], 1 << (scheme["bits"] - 1)
        shape = parts["weight_shape"]
        if shape.numel() != 2 or shape.is_floating_point():
            raise ValueError(f"{base}.weight_shape: expected two integers, got {shape.tolist()}")
        n, k = (int(v) for v in shape.tolist())
        packed, scale = parts["weight_packed"], parts["weight_scale"]
        if packed.dtype != torch.int32 or tuple(packed.shape) != (n, -(-k * bits // 32)):
            raise ValueError(f"{base}.weight_packed: expected int32 {(n, -(-k * bits // 32))} for a [{n}, {k}] "
                             f"int{bits} weight, got {packed.dtype} {tuple(packed.shape)}")
        codes = unpack_int32(packed, bits, dim=1)[:, :k]                 # unsigned: q + 2^(b-1)
        groups = {"group": k // (scheme["group_size"] or k), "channel": 1, "tensor": 1}[scheme["strategy"]]
        if scheme["strategy"] == "group" and (not scheme["group_size"] or k % scheme["group_size"]):
            raise ValueError(f"{base}: group_size {scheme['group_size']} does not divide K={k}")
        if scheme["strategy"] == "tensor" and scale.numel() == 1:
            scale = scale.reshape(1, 1).expand(n, 1)
        if tuple(scale.shape) != (n, groups):
            raise ValueError(f"{base}.weight_scale: expected shape {(n, groups)} for strategy "
                             f"{scheme['strategy']!r}, got {tuple(scale.shape)}")
        zero = self._zero_point(base, parts.get("weight_zero_point"), scheme, n, groups)
        return zero_point_weight(codes, scale, zero + offset, bits, parts.get("weight_g_idx"), name=base)

    @staticmethod
    def _zero_point(base, zp, scheme, n: int, groups: int) -> torch.Tensor:
        """The signed zero points [N, G] (zeros when symmetric)."""
        bits = scheme["bits"]
        if scheme["symmetric"]:
            if zp is not None and bool(zp.any()):
                raise ValueError(f"{base}: a symmetric scheme with nonzero weight_zero_point")
            return torch.zeros(n, groups, dtype=torch.int16)
        if zp is None:
            raise ValueError(f"{base}.weight_zero_point is missing (the scheme is asymmetric)")
        if zp.dtype == torch.int32 and tuple(zp.shape) == (-(-n * bits // 32), groups):
            return unpack_int32(zp, bits, dim=0)[:n].to(torch.int16) - (1 << (bits - 1))
        if not zp.is_floating_point() and zp.numel() == n * groups:
            return zp.reshape(n, groups).to(torch.int16)                 # older files: unpacked, signed
        raise ValueError(f"{base}.weight_zero_point: expected packed int32 {(-(-n * bits // 32), groups)} or "
                         f"integer {(n, groups)}, got {zp.dtype} {tuple(zp.shape)}")


def _matches(target: str, module: str) -> bool:
    """compressed-tensors' target spelling: a class name (every module here is a Linear), "re:<regex>", or
    a module name."""
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target in ("Linear", "LinearBase") or module == target or module.endswith("." + target)
