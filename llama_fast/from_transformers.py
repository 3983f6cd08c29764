"""A live transformers Llama -> the llama_fast model, without going through disk:

    model = llama_fast.LlamaForCausalLM.from_transformers(hf_model)

Same config, dtype and device as `hf_model` (a transformers LlamaForCausalLM, LlamaModel or
LlamaForSequenceClassification). Memory: llama_fast's unfused parameters (embeddings, norms, o_proj,
down_proj, lm_head) ARE the transformers tensors (shared storage, no copy). The fused q/k/v and gate/up
weights need one new buffer each; as soon as a layer's fused buffer is filled, the transformers parameters
q/k/v_proj (gate/up_proj) are re-pointed at row views of it, so their old storage is freed: beyond the two
models sharing all their weights, the extra memory at any moment is one fused weight. `hf_model` keeps
working and computes the same numbers, but its weights now live in llama_fast's tensors (in-place changes to
either model show in both).

Quantized models that transformers holds packed are refused: transformers 5 needs gptqmodel to load GPTQ
and AWQ (and compressed_tensors for its format), none of which llama_fast depends on or was tested against,
and those packages keep the packed tensors in their kernels' own layouts (repacked for Marlin / ExLlama,
GPTQ v1 zeros converted to v2), so the memory does not say which format it holds. Load such a checkpoint
from its directory instead (LlamaForCausalLM.from_pretrained(path) reads GPTQ / AWQ / compressed-tensors
files natively). A quantized checkpoint that transformers decompressed to floating-point weights converts
like a dense model.
"""
from __future__ import annotations

import torch
from torch import nn

from llama_fast.config import LlamaConfig
from llama_fast.loading import TensorLoader, meta_model

SOURCE = "transformers model"


def from_transformers(cls, hf_model: nn.Module, backend: str | None = None) -> nn.Module:
    """`cls` (LlamaModel, LlamaForCausalLM, LlamaForSequenceClassification) from a loaded transformers model
    of the same kind, sharing its weights (see the module docstring)."""
    hf_config = getattr(hf_model, "config", None)
    if hf_config is None or getattr(hf_config, "model_type", None) != "llama":
        raise ValueError(f"from_transformers expects a transformers Llama model, got {type(hf_model).__name__} "
                         f"(model_type {getattr(hf_config, 'model_type', None)!r})")
    quantization = getattr(hf_config, "quantization_config", None)
    packed = any(not t.is_floating_point() for t in (*hf_model.parameters(), *hf_model.buffers()))
    if quantization is not None and packed:     # (a decompressed model, all floating point, loads as dense)
        method = quantization.get("quant_method") if isinstance(quantization, dict) else \
            getattr(quantization, "quant_method", quantization)
        raise ValueError(f"from_transformers: the model is quantized ({method}) by a transformers integration "
                         "whose in-memory layout is its kernels' own; load the checkpoint directory with "
                         "from_pretrained(path), which reads GPTQ / AWQ / compressed-tensors files natively")
    params = list(hf_model.parameters())
    if not params:
        raise ValueError("from_transformers: the model has no parameters")
    dtype, device = params[0].dtype, params[0].device
    if device.type == "meta" or any(p.dtype != dtype or p.device != device for p in params):
        raise ValueError("from_transformers: the model's parameters must all be materialized on one device in "
                         "one dtype (offloaded or mixed-dtype models are not supported)")
    del params
    config = LlamaConfig.from_dict(_config_dict(hf_config, dtype))
    model = meta_model(cls, config, dtype)
    loader = TensorLoader(model, dtype, device)
    hf_params = dict(hf_model.named_parameters())       # the Parameter objects, to re-point fused parts
    for name in list(hf_params):
        tensor = hf_params[name].detach()
        loader.share(name, tensor)
        loader.add(name, tensor, SOURCE)
        del tensor
        fusion = loader.completed_fusion(name)
        if fusion is not None:                          # a layer's fused weight is complete: free its parts
            weight, parts = fusion
            for part, (r0, r1) in parts:
                _hf_parameter(hf_params, part).data = weight[r0:r1]
    loader.finish(SOURCE)
    model.generation_config = _generation_config(hf_model)
    model.set_backend(backend)
    return model.eval()


def _hf_parameter(hf_params: dict, name: str) -> nn.Parameter:
    """The transformers parameter llama_fast calls `name` (the two differ by "model." when one of the models
    is a bare LlamaModel)."""
    for candidate in (name, f"model.{name}", name.removeprefix("model.")):
        if candidate in hf_params:
            return hf_params[candidate]
    raise KeyError(name)


def _config_dict(hf_config, dtype: torch.dtype) -> dict:
    """The config as its config.json would read (all of it: LlamaConfig keeps keys it does not use)."""
    d = hf_config.to_dict()
    for key in ("_name_or_path", "transformers_version", "torch_dtype", "quantization_config"):
        d.pop(key, None)
    d["dtype"] = str(dtype).removeprefix("torch.")
    return d


def _generation_config(hf_model) -> dict:
    gen = getattr(hf_model, "generation_config", None)
    if gen is None:
        return {}
    d = gen.to_diff_dict() if hasattr(gen, "to_diff_dict") else {}
    d.pop("transformers_version", None)
    return d
