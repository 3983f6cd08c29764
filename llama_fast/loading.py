"""Loading and saving checkpoints: HF directories (config.json + safetensors) and GGUF files.

    model = LlamaForCausalLM.from_pretrained(path, dtype="auto", device="cpu", backend=None,
                                             quantize=None | "int8" | "int4", group_size=128)
    model.save_pretrained(directory)

Memory: the model is built on the meta device and each parameter is materialized when its tensors arrive,
read one at a time (llama_fast.formats.safetensors), straight into the parameter when its dtype matches, so
the weights never exist twice: the peak is the model plus one tensor being converted.
With `quantize`, each linear layer is quantized as soon as its weight is complete (a fused one after all
its parts), so the peak is about the quantized model plus one layer. A layer whose input size K is not a
multiple of group_size gets the largest power-of-two fraction of group_size (>= 32) that divides K.
Embeddings and the heads (the model's head_modules: lm_head, score) stay dense. Pickles (.bin / .pt) are
refused: loading never unpickles.

Quantized checkpoints: save_pretrained writes a quantized linear `x` as x.qweight, x.scales and (if it has
offsets) x.offsets (and x.input_perm for act-order weights) in the format of llama_fast.quant (bits and group
size follow from the tensors' dtypes and shapes), and config.json gets a quantization_config
{"quant_method": "llama_fast", "bits", "group_size", ...}; from_pretrained reads them back unchanged.
Checkpoints quantized by GPTQ, AWQ or compressed-tensors (their quantization_config says which) are read
natively by the readers in llama_fast.formats (formats.quantized_checkpoints picks one): their linears keep
the file's codes and run on the quantized kernels. GGUF files are read by llama_fast.formats.gguf.
A path that does not exist locally is a Hugging Face repo id (llama_fast.hub).

Which checkpoint names go where is the model's declaration, not this module's: the model class says which
transformers linears are stacked in a fused one's rows (packed_modules_mapping, with each fused Linear's
output_sizes), which modules are heads (head_modules), which weights are tied (tied_weights), where the base
model sits (base_model_prefix) and which checkpoint entries it does not need (unused_checkpoint_suffixes).
The format readers (llama_fast.formats) know the files and no model; this module joins the two.

The interface other formats use (GGUF does):

    load_tensors(model, named_tensors, source, quantize=None, group_size=128)

`model` is a model on the meta device (`meta_model(cls, config, dtype)`); `named_tensors` yields
(transformers name, value) pairs, value a torch.Tensor or a llama_fast.quant.QuantizedWeight; `source`
(a file name) is named in every error. Each value lands in its (fused) parameter, converted to the model's
dtype (default: the dtype meta_model built it in) and device (default "cpu"); its shape is checked; names
the model does not have, and parameters nothing was given for, raise an error naming `source` and the
tensors. A QuantizedWeight makes its linear layer quantized, keeping
its format (quantize= does not re-quantize it); the parts of a fused layer are joined with
quant.concat_rows. If the parts of a fused layer differ in format (say q_proj Q4_0 and v_proj Q8_0, or one
part dense), all of them are dequantized to a dense weight in the model dtype: correct, but not native. The
exception: ggml blocks (KQuantWeight) next to Q8_0 parts, which join them as Q8_0 blocks (kquants.from_q8_0).
A quantized value for a parameter that is not a linear weight (embeddings, norms) is dequantized.
`TensorLoader` is the same thing in steps, for sources spread over several files (sharded checkpoints).
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from llama_fast import hub, kquants, quant, weight_arena
from llama_fast.config import LlamaConfig, dtype_from_name
from llama_fast.embedding import Embedding
from llama_fast.formats import gguf as gguf_format
from llama_fast.formats import quantized_checkpoints
from llama_fast.formats import safetensors as safetensors_format
from llama_fast.formats.quantized_checkpoints import LlamaFastFormat
from llama_fast.formats.safetensors import SafetensorsError, SafetensorsFile
from llama_fast.kquants import KQuantWeight
from llama_fast.linear import Linear
from llama_fast.model_files import model_file
from llama_fast.ops._backend import check_backend_name
from llama_fast.parallel.sharded_load import ShardedLoad
from llama_fast.quant import QuantizedWeight

# Weights a file may hand over in a native quantized form, kept as they are by linear layers.
_NATIVE = (QuantizedWeight, KQuantWeight)

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_QUANTIZE_BITS = {"int8": 8, "int4": 4}


class CheckpointError(ValueError):
    """A checkpoint file is missing, malformed, or does not fit the model."""


# ---- the names ------------------------------------------------------------------------------------------

@dataclass
class _Target:
    """One parameter of the model and the checkpoint tensors (row ranges) it is made of."""
    module: nn.Module
    attr: str                                   # "weight" or "bias"
    shape: tuple
    parts: list[str]                            # transformers names, in row order
    rows: list[tuple[int, int]]
    quantizable: bool                           # a Linear weight that quantize= applies to
    received: dict = field(default_factory=dict)   # part index -> QuantizedWeight, or True when copied
    buffer: torch.Tensor | None = None


def _fused_parts(model: nn.Module) -> dict[str, list[tuple[str, int]]]:
    """Fused parameter name -> [(transformers name, rows)], from the model's packed_modules_mapping (which
    checkpoint linears are stacked in a fused linear's rows, in order) and each fused Linear's output_sizes."""
    mapping = getattr(model, "packed_modules_mapping", {})
    out = {}
    for name, module in model.named_modules():
        prefix, _, last = name.rpartition(".")
        if last not in mapping or not isinstance(module, Linear):
            continue
        parts = mapping[last]
        if len(parts) != len(module.output_sizes):
            raise ValueError(f"{name}: packed_modules_mapping names {len(parts)} parts {parts}, the layer has "
                             f"{len(module.output_sizes)} output_sizes {module.output_sizes}")
        base = f"{prefix}." if prefix else ""
        for attr in ("weight", "bias"):
            if getattr(module, attr, None) is not None or (attr == "weight" and module.quantized):
                out[f"{name}.{attr}"] = [(f"{base}{part}.{attr}", rows)
                                         for part, rows in zip(parts, module.output_sizes)]
    return out


def _targets(model: nn.Module) -> tuple[dict[str, _Target], dict[str, tuple[str, int]]]:
    """(parameter name -> _Target, transformers name -> (parameter name, part index))."""
    modules = dict(model.named_modules())
    fused = _fused_parts(model)
    heads = set(getattr(model, "head_modules", ()))
    targets, by_hf = {}, {}
    # Parameters (tied ones appear once), and the weights of quantized linears, which are buffers.
    weights = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    weights += [(f"{prefix}.weight", (m.out_features, m.in_features)) for prefix, m in modules.items()
                if isinstance(m, Linear) and m.quantized]
    weights += [(f"{prefix}.weight", (m.num_embeddings, m.embedding_dim)) for prefix, m in modules.items()
                if isinstance(m, Embedding) and m.native]
    for name, shape in weights:
        owner_name, _, attr = name.rpartition(".")
        owner = modules[owner_name]
        parts = fused.get(name, [(name, shape[0])])
        rows, start = [], 0
        for _, n in parts:
            rows.append((start, start + n))
            start += n
        quantizable = isinstance(owner, Linear) and attr == "weight" and owner_name not in heads
        targets[name] = _Target(owner, attr, shape, [p for p, _ in parts], rows, quantizable)
        for i, (hf, _) in enumerate(parts):
            by_hf[hf] = (name, i)
    return targets, by_hf


# ---- putting tensors into the model ---------------------------------------------------------------------

class TensorLoader:
    """Fills a meta-device model from (transformers name, tensor) pairs: `add` each, then `finish`."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, device, quantize: str | None = None,
                 group_size: int = 128, group_basis: dict[str, int] | None = None):
        if quantize is not None and quantize not in _QUANTIZE_BITS:
            raise ValueError(f"quantize must be None, 'int8' or 'int4', got {quantize!r}")
        _check_group_size(group_size)
        self.model = model
        self.dtype = dtype
        self.device = torch.device(device)
        self.bits = _QUANTIZE_BITS.get(quantize)
        self.group_size = group_size
        # Parameter -> the input size quantize= picks the group size for, where a tensor-parallel rank holds
        # only some input columns (llama_fast.parallel): the group the one-process model would use.
        self.group_basis = group_basis or {}
        self.targets, self.by_hf = _targets(model)
        tie = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
        self.tied: dict[str, str] = dict(getattr(model, "tied_weights", {})) if tie else {}
        self.native_tied: set[str] = set()  # tied weights given their own quantized copy (add)
        self.stored_tied: dict[str, torch.Tensor] = {}  # tied weights a checkpoint stores anyway (finish)
        self.heads = tuple(getattr(model, "head_modules", ()))
        self.unused_suffixes = tuple(getattr(model, "unused_checkpoint_suffixes", ()))
        base = getattr(model, "base_model_prefix", "")
        # A bare base model (LlamaModel) has no submodule of that name: its own names lack the prefix that
        # a checkpoint of a model with heads has, and the other way round.
        self.bare = bool(base) and not isinstance(getattr(model, base, None), nn.Module)
        self.prefix = f"{base}." if base else ""

    def _resolve(self, name: str):
        if name in self.by_hf:
            return self.by_hf[name]
        if not self.prefix:
            return None
        if self.bare:
            return self.by_hf.get(name[len(self.prefix):]) if name.startswith(self.prefix) else None
        return self.by_hf.get(self.prefix + name)

    def _ignored(self, name: str) -> bool:
        if self.unused_suffixes and name.endswith(self.unused_suffixes):
            return True
        # A tied weight is the one it is tied to: a stored copy is redundant (transformers ignores it too).
        # A bare base model ignores the heads of a checkpoint with heads (ForCausalLM, ...).
        return name in self.tied or (self.bare and name.partition(".")[0] in self.heads)

    def slot(self, name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor | None:
        """The memory a dense tensor `name` will end up in, when a reader can fill it directly (a CPU model
        of the same dtype): passing the filled slot to `add` then costs no copy. None otherwise."""
        found = self._resolve(name)
        if found is None or dtype != self.dtype or self.device.type != "cpu":
            return None
        target = self.targets[found[0]]
        r0, r1 = target.rows[found[1]]
        if tuple(shape) != (r1 - r0,) + target.shape[1:] or any(
                isinstance(v, _NATIVE) for v in target.received.values()):
            return None
        if target.buffer is None:
            target.buffer = torch.empty(target.shape, dtype=self.dtype, device=self.device)
        return target.buffer[r0:r1] if len(target.parts) > 1 else target.buffer

    def share(self, name: str, tensor: torch.Tensor) -> None:
        """Makes `tensor` itself the memory of the parameter `name` when that needs no conversion (an unfused
        parameter of the model's dtype and device): the `add` of it that follows copies nothing. Used by
        llama_fast.from_transformers to share a live model's weights."""
        found = self._resolve(name)
        if found is None:
            return
        target = self.targets[found[0]]
        if (len(target.parts) == 1 and target.buffer is None and tuple(tensor.shape) == target.shape
                and tensor.dtype == self.dtype and tensor.device == self.device and tensor.is_contiguous()):
            target.buffer = tensor

    def completed_fusion(self, name: str) -> tuple[torch.Tensor, list[tuple[str, tuple[int, int]]]] | None:
        """(the fused dense weight, [(part name, rows)]) of the fused parameter `name` belongs to, once all
        its parts have arrived; None otherwise (unfused, incomplete or quantized)."""
        found = self._resolve(name)
        if found is None:
            return None
        target = self.targets[found[0]]
        weight = getattr(target.module, target.attr, None)
        if len(target.parts) == 1 or len(target.received) != len(target.parts) or not isinstance(weight, torch.Tensor):
            return None
        return weight, list(zip(target.parts, target.rows))

    def add(self, name: str, value, source: str) -> None:
        if name in self.tied and isinstance(value, _NATIVE):
            owner_name, _, attr = name.rpartition(".")
            owner = self.model.get_submodule(owner_name)
            if attr == "weight" and isinstance(owner, Linear):
                # A tied model whose file holds the table quantized (GGUF): the head multiplies by the native
                # blocks, the embedding lookup uses its dense copy (see llama_fast.formats.gguf).
                if name in self.native_tied:
                    raise CheckpointError(f"{source}: tensor {name!r} appears twice")
                if isinstance(value, KQuantWeight):
                    owner.set_kquant(value.to(self.device))
                else:
                    owner.set_quantized(value.to(self.device))
                self.native_tied.add(name)
                return
        found = self._resolve(name)
        if found is None:
            if name in self.tied and isinstance(value, torch.Tensor):
                self.stored_tied[name] = value     # checked against the weight it is tied to in finish()
            if self._ignored(name):
                return
            raise CheckpointError(f"{source}: unexpected tensor {name!r}: the model has no such parameter "
                                  f"(is this a Llama checkpoint of the same architecture?)")
        pname, part = found
        target = self.targets[pname]
        if part in target.received:
            raise CheckpointError(f"{source}: tensor {name!r} appears twice")
        r0, r1 = target.rows[part]
        expected = (r1 - r0,) + target.shape[1:]
        shape = tuple(value.shape)
        if shape != expected:
            raise CheckpointError(f"{source}: tensor {name!r} has shape {list(shape)}, the model expects "
                                  f"{list(expected)} (check config.json against the weights)")
        if isinstance(value, _NATIVE):
            target.received[part] = value.to(self.device)
        else:
            if not value.is_floating_point():
                raise CheckpointError(f"{source}: tensor {name!r} has dtype {value.dtype}; expected floating point")
            if target.buffer is None:
                target.buffer = torch.empty(target.shape, dtype=self.dtype, device=self.device)
            destination = target.buffer[r0:r1] if len(target.parts) > 1 else target.buffer
            if not _same_memory(value, destination):     # else a reader filled the slot already
                destination.copy_(value)
            target.received[part] = True
        if len(target.received) == len(target.parts):
            self._materialize(pname, target)

    def _materialize(self, pname: str, target: _Target) -> None:
        owner, attr = target.module, target.attr
        values = [target.received[i] for i in range(len(target.parts))]
        quantized = [v for v in values if isinstance(v, _NATIVE)]
        if quantized and isinstance(owner, Embedding) and attr == "weight" and len(values) == 1:
            owner.set_native(values[0], pname)    # a quantized token table stays as stored (a GGUF's)
            target.received = dict.fromkeys(target.received, True)
            return
        if any(isinstance(v, KQuantWeight) for v in values) and isinstance(owner, Linear) and attr == "weight":
            # a Q8_0 part next to ggml blocks (SmolLM2 Q4_K_M: q/k Q5_0, v Q8_0) joins them as Q8_0 blocks
            repacked = [kquants.from_q8_0(v, pname) if isinstance(v, QuantizedWeight) else v for v in values]
            if all(isinstance(v, KQuantWeight) for v in repacked):
                values = repacked
        if all(isinstance(v, KQuantWeight) for v in values) and isinstance(owner, Linear) and attr == "weight":
            # ggml blocks: parts of different types (Q4_K_M's q/k in Q4_K, v in Q6_K) stay row segments
            owner.set_kquant(kquants.concat_rows(values), pname)
            target.received = dict.fromkeys(target.received, True)
            return
        if quantized and all(isinstance(v, QuantizedWeight) for v in values) and isinstance(owner, Linear) \
                and attr == "weight":
            try:
                qw = values[0] if len(values) == 1 else quant.concat_rows(values)
            except quant.InputPermMismatch as e:
                raise CheckpointError(f"{pname}: {e}; llama_fast fuses {', '.join(target.parts)} into one "
                                      "layer and needs them to share one") from None
            except ValueError:
                qw = None     # the parts differ in format: dequantized below
            if qw is not None:
                owner.set_quantized(qw)
                target.received = dict.fromkeys(target.received, True)   # drop the parts
                return
        if quantized:         # mixed formats, or not a linear weight: dense in the model dtype
            if target.buffer is None:
                target.buffer = torch.empty(target.shape, dtype=self.dtype, device=self.device)
            for (r0, r1), v in zip(target.rows, values):
                if isinstance(v, _NATIVE):
                    target.buffer[r0:r1].copy_(v.dequantize(torch.float32))
            target.received = dict.fromkeys(target.received, True)
        dense, target.buffer = target.buffer, None
        if self.bits is not None and target.quantizable:
            k = dense.shape[1]
            group_size = _group_size_for(self.group_basis.get(pname, k), self.group_size, pname)
            if k % group_size:
                raise CheckpointError(f"{pname}: this rank's {k} input columns are not a whole number of "
                                      f"quantization groups of {group_size}; pass a group_size that divides {k}")
            owner.set_quantized(quant.quantize(dense, self.bits, group_size, name=pname))
            return
        setattr(owner, attr, nn.Parameter(dense, requires_grad=False))

    def finish(self, source: str) -> None:
        """Checks that every parameter got its tensors and ties the tied weights (lm_head to the embeddings)."""
        missing = [hf for t in self.targets.values() if len(t.received) != len(t.parts)
                   for i, hf in enumerate(t.parts) if i not in t.received]
        if missing:
            shown = ", ".join(repr(m) for m in missing[:8]) + (", ..." if len(missing) > 8 else "")
            raise CheckpointError(f"{source}: {len(missing)} tensor(s) missing: {shown}")
        for name, source_name in self.tied.items():
            if name not in self.native_tied:
                owner_name, _, attr = name.rpartition(".")
                table = self.model.get_submodule(source_name.rpartition(".")[0])
                if isinstance(table, Embedding) and table.native:
                    # a quantized token table (saved once for both, see hf_state_items): the head shares it
                    native = table.native_weight()
                    head = self.model.get_submodule(owner_name)
                    if isinstance(native, KQuantWeight):
                        head.set_kquant(native)
                    else:
                        head.set_quantized(native)
                    continue
                tied_to = self.model.get_parameter(source_name)
                stored = self.stored_tied.pop(name, None)
                if stored is not None and not torch.equal(stored.to(tied_to), tied_to):
                    # transformers would silently use the tied weight; the file says two different things.
                    raise CheckpointError(f"{source}: config.json has tie_word_embeddings=true but the checkpoint's "
                                          f"{name} differs from {source_name}")
                setattr(self.model.get_submodule(owner_name), attr, tied_to)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.dtype == b.dtype


def _check_group_size(group_size) -> None:
    if group_size not in (-1, None) and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                         or group_size <= 0):
        raise ValueError(f"group_size must be a positive integer (or -1 for one group per row), got {group_size!r}")


def _group_size_for(k: int, requested: int, name: str) -> int:
    """`requested`, or for a layer whose K it does not divide (SmolLM2's K=576 with 128), the largest
    power-of-two fraction of it that does, down to 32 (smaller groups: a little more accurate and larger)."""
    if requested in (-1, None):
        return k
    group = requested
    while k % group != 0 and group % 2 == 0 and group > 32:
        group //= 2
    if k % group != 0:
        raise ValueError(f"{name}: group_size {requested} does not divide K={k}, and no power-of-two fraction "
                         f"of it down to 32 does either; pass a group_size that divides {k}")
    return group


def load_tensors(model: nn.Module, named_tensors: Iterable, source: str, quantize: str | None = None,
                 group_size: int = 128, dtype: torch.dtype | None = None, device="cpu",
                 group_basis: dict[str, int] | None = None) -> nn.Module:
    """Fills the meta-device `model` from (transformers name, Tensor | QuantizedWeight) pairs (see the
    module docstring), in `dtype` (default: the dtype of its meta parameters, the one meta_model built it
    in) on `device`. group_basis: see TensorLoader (tensor-parallel ranks)."""
    if dtype is None:
        dtype = next(model.parameters()).dtype
    loader = TensorLoader(model, dtype, device, quantize, group_size, group_basis)
    for name, value in named_tensors:
        loader.add(name, value, source)
    loader.finish(source)
    return model


def meta_model(cls, config: LlamaConfig, dtype: torch.dtype) -> nn.Module:
    """An instance of `cls` whose parameters (of `dtype`) live on the meta device (no memory), ready for
    load_tensors."""
    with torch.device("meta"):
        return cls(config, dtype=dtype)


# ---- from_pretrained ------------------------------------------------------------------------------------

def from_pretrained(cls, path, dtype="auto", device="cpu", backend=None, quantize=None, group_size=128,
                    torch_dtype=None, device_map=None, dequantize=False, revision=None, cache_dir=None,
                    local_files_only=False, token=None, tp_plan=None, tp_group=None, tp_vocab="sharded"):
    """`cls` (LlamaModel, LlamaForCausalLM, LlamaForSequenceClassification) from an HF directory or a GGUF
    file. dtype: "auto" (config's torch_dtype, float32 if absent), "float32", "bfloat16", "float16" or a
    torch.dtype. backend: the ops backend (None: the best one for each op on the tensors' device).
    transformers' spellings work too: torch_dtype= for dtype, device_map="cpu" / "cuda:0" for device (one
    device; the model is not split). dequantize: load a GGUF file's quantized tensors as dense weights
    instead of natively (llama_fast.formats.gguf). A `path` that does not exist locally is a Hub repo id,
    found in the Hugging Face cache (or downloaded) at `revision` as transformers does (llama_fast.hub).
    tp_plan="auto": this process is one rank of a tensor-parallel model over `tp_group` (default: the
    torch.distributed world, initialized from torchrun's environment if need be) and loads only its shard;
    tp_vocab="sharded" | "replicated" splits the embedding and lm_head over the ranks or not
    (llama_fast.parallel). model.config is then the rank's config (its heads, its intermediate size)."""
    if torch_dtype is not None:
        if dtype not in ("auto", None):
            raise ValueError("pass dtype or torch_dtype, not both")
        dtype = torch_dtype
    if device_map is not None:
        if not isinstance(device_map, (str, torch.device)) or str(device_map) in ("auto", "balanced", "sequential"):
            raise ValueError(f"device_map={device_map!r}: llama_fast loads a model onto one device; pass "
                             "device='cpu' or device='cuda'")
        device = device_map
    check_backend_name(backend)
    if quantize is not None and quantize not in _QUANTIZE_BITS:
        raise ValueError(f"quantize must be None, 'int8' or 'int4', got {quantize!r}")
    _check_group_size(group_size)
    shard = None
    if tp_plan is not None:
        shard = ShardedLoad.start(tp_plan, tp_group, tp_vocab, device)
        device = shard.device

    def load():
        resolved = hub.resolve(path, hub.MODEL_FILES, revision, cache_dir, local_files_only, token)
        gguf = _gguf_path(resolved)
        if gguf is not None:
            model = _load_gguf(cls, gguf, dtype, device, dequantize, quantize, group_size, shard)
        else:
            model = _load_hf_directory(cls, resolved, dtype, device, quantize, group_size, shard)
        if _float16_for_cpu_kernels(model, device, backend):
            _float16_parameters_to_float32(model)
        model.set_backend(backend)
        if torch.device(device).type == "cpu":
            weight_arena.pack_weights(model)     # one huge-page buffer: the decode's weight stream runs faster
        _return_freed_heap_to_the_os()
        return model.eval()

    return load() if shard is None else shard.run(load)


def read_config(path: str) -> LlamaConfig:
    """The config of the model at a local `path` (an HF directory or a .gguf file), reading no weights."""
    gguf = _gguf_path(path)
    if gguf is not None:
        return LlamaConfig.from_dict(gguf_format.gguf_config(gguf_format.open_gguf(gguf), gguf))
    return LlamaConfig.from_pretrained(model_file(path, "config.json", "config"))


def _return_freed_heap_to_the_os() -> None:
    """glibc keeps freed heap memory mapped: the load's transient buffers (file reads, repacked blocks, converted
    tensors) would stay resident next to the model, ~40% of the demo GGUF's size. malloc_trim(0) hands it back,
    so the resident memory after a load is the model's (issue 14: <= 1.15x a quantized GGUF's file size)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        trim = ctypes.CDLL(None).malloc_trim   # glibc only (musl has none)
    except (OSError, AttributeError):
        return
    trim(0)


class Float16OnCpuWarning(UserWarning):
    """A float16 model bound for the CPU kernels was given float32 parameters (they take float32 and bfloat16)."""


def _float16_for_cpu_kernels(model: nn.Module, device, backend: str | None) -> bool:
    """Whether `model` is float16 and bound for the CPU kernels (device cpu, backend None or "cpu"), which take
    float32 and bfloat16 activations only (llama_fast.ops.cpu.DTYPES): it would otherwise run every op on the
    slow reference ops. Says so in one notice. backend="torch" keeps float16 as asked."""
    if model.dtype != torch.float16 or torch.device(device).type != "cpu" or backend not in (None, "cpu"):
        return False
    from llama_fast.ops import _backend, cpu
    if torch.float16 in cpu.DTYPES or _backend.unavailable_reason("cpu", torch.device("cpu")) is not None:
        return False
    warnings.warn("llama_fast: float16 weights run as float32 on the CPU kernels (exact; they take float32 and "
                  "bfloat16): dtype='bfloat16' halves the memory, backend='torch' keeps float16",
                  Float16OnCpuWarning, stacklevel=5)  # the caller of LlamaForCausalLM.from_pretrained
    return True


def _float16_parameters_to_float32(model: nn.Module) -> None:
    """Every float16 parameter as float32, one at a time (tied ones stay one tensor). Exact: each float16 value
    is a float32 value, so the model computes the float16 model's own weights. Quantized weights keep their
    codes and scales (buffers, not parameters; the kernels take float16 scales)."""
    converted: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or param.dtype != torch.float16:
                continue
            if id(param) not in converted:
                converted[id(param)] = nn.Parameter(param.detach().float(), requires_grad=param.requires_grad)
            setattr(module, name, converted[id(param)])


def _resolve_dtype(dtype, config: LlamaConfig) -> torch.dtype:
    if dtype in ("auto", None):
        return dtype_from_name(config.dtype or "float32", "config torch_dtype")
    return dtype_from_name(dtype)


def _gguf_path(path: str) -> str | None:
    if os.path.isfile(path):
        return path if path.lower().endswith(".gguf") else None
    if os.path.exists(os.path.join(path, "config.json")):
        return None
    ggufs = sorted(f for f in os.listdir(path) if f.lower().endswith(".gguf"))
    if len(ggufs) == 1:
        return os.path.join(path, ggufs[0])
    if len(ggufs) > 1:
        raise CheckpointError(f"{path}: holds several .gguf files ({', '.join(ggufs)}); pass the one to load")
    return None


def _refuse_pickles(path: str) -> None:
    if os.path.isfile(path):
        names = [os.path.basename(path)]
    else:
        names = [f for f in os.listdir(path) if f.endswith(_PICKLE_SUFFIXES)]
    if any(n.endswith(_PICKLE_SUFFIXES) for n in names):
        raise CheckpointError(
            f"{path}: holds PyTorch pickle weights ({', '.join(sorted(names)[:3])}); llama_fast never unpickles "
            "(a pickle can run arbitrary code). Convert them to safetensors once with transformers: "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(new_dir, safe_serialization=True)")


def _load_gguf(cls, path: str, dtype, device, dequantize: bool, quantize, group_size, shard=None):
    """`cls` from a Llama GGUF file. dtype "auto" is float32 (GGUF records no compute dtype; its norms are
    F32). Q8_0 / Q4_0 / Q4_1 linear weights stay quantized (exact) unless dequantize=True; `quantize`
    applies to dense ones only. shard: a tensor-parallel rank's load (llama_fast.parallel.sharded_load)."""
    reader = gguf_format.open_gguf(path)
    config_dict = gguf_format.gguf_config(reader, path)
    torch_dtype = dtype_from_name("float32" if dtype in ("auto", None) else dtype)
    config = LlamaConfig.from_dict(config_dict)
    if shard is None:
        model, select, group_basis = meta_model(cls, config, torch_dtype), None, None
    else:
        model = shard.meta_model(cls, config, torch_dtype)
        select, group_basis = shard.split, shard.group_basis(model)
    tensors = gguf_format.gguf_tensors(reader, config_dict, dequantize, torch_dtype, path, select)
    return load_tensors(model, tensors, path, quantize, group_size, torch_dtype, device, group_basis)


def _load_hf_directory(cls, path: str, dtype, device, quantize, group_size, shard=None):
    if os.path.isfile(path):
        _refuse_pickles(path)
        raise CheckpointError(f"{path}: expected a directory with config.json and *.safetensors, or a .gguf file")
    config = LlamaConfig.from_pretrained(model_file(path, "config.json", "config"))
    files = _safetensors_files(path)
    _check_layer_count(config, files, path)
    torch_dtype = _resolve_dtype(dtype, config)
    try:   # llama_fast's own quantized format, GPTQ, AWQ or compressed-tensors
        reader = quantized_checkpoints.reader_for(quantized_checkpoints.checkpoint_quantization(
            path, getattr(config, "quantization_config", None)))
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if shard is None:
        model = meta_model(cls, config, torch_dtype)
        loader = TensorLoader(model, torch_dtype, device, quantize, group_size)
    else:
        model = shard.meta_model(cls, config, torch_dtype)
        loader = TensorLoader(model, torch_dtype, device, quantize, group_size, shard.group_basis(model))
    source = files[0][0] if len(files) == 1 else os.path.join(path, SAFE_INDEX)
    quant_parts: dict[str, dict[str, torch.Tensor]] = {}
    # A progress bar on terminals only (tqdm's disable=None), for big checkpoints.
    with tqdm(total=len(loader.by_hf), desc="Loading weights", unit="tensor", disable=None, leave=False) as bar:
        for file, names in files:
            _load_safetensors_file(loader, file, names, bar, quant_parts, reader.parts, shard)
    _add_quantized(loader, quant_parts, source, reader, shard)
    loader.finish(source)
    model.generation_config = _read_generation_config(path)
    return model


def _safetensors_files(path: str) -> list[tuple[str, list[str] | None]]:
    """[(file, tensor names it should hold or None for all)] of a checkpoint directory. Every file is
    checked to lie inside the directory (llama_fast.model_files): an index naming '../x' or '/etc/x', or a
    shard that is a symlink out of the directory, is refused before it is opened."""
    single, index = os.path.join(path, SAFE_WEIGHTS), os.path.join(path, SAFE_INDEX)
    if os.path.exists(index):
        model_file(path, SAFE_INDEX, "index")
        by_file: dict[str, list[str]] = {}
        for name, file in _weight_map(index).items():
            by_file.setdefault(file, []).append(name)
        out = []
        for file, names in by_file.items():
            full = model_file(path, file, "shard")
            if not os.path.isfile(full):
                raise CheckpointError(f"{index}: names shard {file!r}, which does not exist "
                                      f"(needed for {names[0]!r})")
            out.append((full, names))
        return out
    if os.path.exists(single):
        return [(model_file(path, SAFE_WEIGHTS, "weights file"), None)]
    others = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if len(others) == 1:
        return [(model_file(path, others[0], "weights file"), None)]
    _refuse_pickles(path)
    raise CheckpointError(f"{path}: no {SAFE_WEIGHTS} or {SAFE_INDEX} found")


def _check_layer_count(config: LlamaConfig, files: list[tuple[str, list[str] | None]], path: str) -> None:
    """config.json's num_hidden_layers must be the number of layers the checkpoint holds, checked before
    the model is built (a corrupt count would build layers until memory runs out)."""
    names = []
    for file, listed in files:
        if listed is None:
            try:
                listed = SafetensorsFile(file).keys()
            except SafetensorsError as e:
                raise CheckpointError(str(e)) from None
        names += listed
    layers = {int(m.group(1)) for m in map(_LAYER_NAME.match, names) if m is not None}
    if layers != set(range(config.num_hidden_layers)):
        present = f"0..{max(layers)}" if layers else "none"
        raise CheckpointError(f"{path}: config.json has num_hidden_layers={config.num_hidden_layers} but the "
                              f"checkpoint's layers are {present} ({len(layers)} distinct)")


_LAYER_NAME = re.compile(r"(?:model\.)?layers\.(\d+)\.")


def _weight_map(index: str) -> dict[str, str]:
    """The index's weight_map: tensor name -> shard file name, both strings."""
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{index}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except (AttributeError, UnicodeDecodeError, RecursionError):
        raise CheckpointError(f"{index}: not a JSON object in UTF-8") from None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index}: 'weight_map' must be an object mapping tensor names to file names")
    return weight_map


def _load_safetensors_file(loader: TensorLoader, file: str, names: list[str] | None, bar=None,
                           quant_parts: dict | None = None, part_names=LlamaFastFormat.parts, shard=None) -> None:
    """Adds the file's tensors to `loader`; the parts of quantized linears (x.<part> for a part in
    `part_names`: x.qweight / x.scales / x.offsets in llama_fast's format) are collected in `quant_parts`
    instead (they may sit in different shards; a tensor-parallel `shard` collects where they are and reads
    its part of them once all are known)."""
    try:
        st = SafetensorsFile(file)
    except SafetensorsError as e:
        raise CheckpointError(str(e)) from None
    for name in names if names is not None else sorted(st.keys()):
        if name not in st.entries:
            raise CheckpointError(f"{file}: tensor {name!r} listed in the index is not in the file")
        base, _, part = name.rpartition(".")
        if part in part_names and quant_parts is not None:
            try:
                quant_parts.setdefault(base, {})[part] = st.read(name) if shard is None else (st, name)
            except SafetensorsError as e:
                raise CheckpointError(str(e)) from None
            continue
        try:
            if shard is not None:
                tensor = shard.read_dense(st, name)
            else:   # read straight into the parameter when no conversion is needed; else into a temporary
                tensor = st.read(name, loader.slot(name, st.shape(name), st.dtype(name)))
        except SafetensorsError as e:
            raise CheckpointError(str(e)) from None
        loader.add(name, tensor, file)
        if bar is not None:
            bar.update()


def _add_quantized(loader: TensorLoader, quant_parts: dict, source: str, reader=None, shard=None) -> None:
    """Each quantized linear's parts -> one QuantizedWeight for `loader`, by the checkpoint format's reader
    (llama_fast.formats.quantized_checkpoints; default llama_fast's own format). With a tensor-parallel `shard`
    the parts are (file, name) handles, read here for this rank."""
    reader = reader or LlamaFastFormat()
    for base in list(quant_parts):
        parts = quant_parts.pop(base)        # the packed parts go as soon as their weight exists
        if shard is not None:
            try:
                parts = shard.read_quantized(base, parts, reader)
            except SafetensorsError as e:
                raise CheckpointError(str(e)) from None
        for needed in reader.required:
            if needed not in parts:
                raise CheckpointError(f"{source}: tensor {base}.{needed!s} is missing (the other parts of the "
                                      f"quantized weight {base!r} are there)")
        try:
            value = reader.weight(base, parts)
        except ValueError as e:
            raise CheckpointError(f"{source}: {e}") from None
        loader.add(f"{base}.weight", value, source)


def _read_generation_config(path: str) -> dict:
    file = os.path.join(path, "generation_config.json")
    if not os.path.exists(file):
        return {}
    try:
        with open(file, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    return d if isinstance(d, dict) else {}


# ---- save_pretrained ------------------------------------------------------------------------------------

# A quantized linear `x` is stored as x.qweight, x.scales and (when it has offsets) x.offsets, in the format
# of llama_fast.quant; config.json's quantization_config says so (quant_method "llama_fast").
QUANT_METHOD = quantized_checkpoints.LLAMA_FAST_METHOD


def hf_state_items(model: nn.Module):
    """(transformers name, tensor view) of every parameter, fused weights split, a tied lm_head omitted;
    a quantized linear `x` gives x.qweight, x.scales (and x.offsets)."""
    kquant = [name for name, m in model.named_modules() if isinstance(m, Linear) and m.kquant]
    if kquant:
        raise ValueError(f"{len(kquant)} linear layer(s) hold ggml K-quant blocks ({kquant[0]}, ...), which HF "
                         "checkpoints cannot store; dequantize them first (llama_fast.linear.dequantize_linears_)")
    targets, _ = _targets(model)
    shared_head = _head_sharing_the_token_table(model)
    for target in targets.values():
        owner = target.module
        if owner is shared_head:
            continue      # tied: the loader gives it the embedding's table again (TensorLoader.finish)
        if target.attr == "weight" and (isinstance(owner, Linear) and owner.quantized or
                                        shared_head is not None and isinstance(owner, Embedding)):
            qw = owner.quantized_weight() if isinstance(owner, Linear) else owner.native_weight()
            for hf, (r0, r1) in zip(target.parts, target.rows):
                part = quant.slice_rows(qw, r0, r1)
                base = hf.removesuffix(".weight")
                yield f"{base}.qweight", part.qweight
                yield f"{base}.scales", part.scale
                if part.offset is not None:
                    yield f"{base}.offsets", part.offset
                if part.input_perm is not None:
                    yield f"{base}.input_perm", part.input_perm
            continue
        # any other native token table is saved dense (the HF layout; the reloaded lookup gives the same rows)
        tensor = owner.dequantized() if isinstance(owner, Embedding) else getattr(owner, target.attr)
        for hf, (r0, r1) in zip(target.parts, target.rows):
            yield hf, tensor[r0:r1] if len(target.parts) > 1 else tensor


def _head_sharing_the_token_table(model: nn.Module) -> Linear | None:
    """The tied head whose int4 / int8 codes are the embedding's native table (a GGUF's Q8_0 token table), or
    None. Such a table is saved once, quantized, under the embedding's name."""
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return None
    for name, source_name in getattr(model, "tied_weights", {}).items():
        head = model.get_submodule(name.rpartition(".")[0])
        table = model.get_submodule(source_name.rpartition(".")[0])
        if (isinstance(table, Embedding) and table.bits is not None and isinstance(head, Linear) and head.quantized
                and head.qweight.data_ptr() == table.qweight.data_ptr()):
            return head
    return None


def save_pretrained(model: nn.Module, directory, max_shard_size: int | str = "50GB") -> None:
    """config.json, the weights and generation_config.json: a directory transformers loads. The weights go to
    model.safetensors, or, past max_shard_size (bytes, or "500MB" / "5GB" / "2GiB" as transformers spells it),
    to model-0000i-of-0000n.safetensors shards with model.safetensors.index.json."""
    if getattr(model, "tensor_parallel", None) is not None:
        raise ValueError("save_pretrained of a tensor-parallel rank would write one shard as if it were the model; "
                         "save the one-process model instead")
    items = list(hf_state_items(model))     # views; raises before anything is written
    shards = _shard(items, _size_in_bytes(max_shard_size))
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    config = model.config
    config.dtype = str(model.dtype).removeprefix("torch.")
    config.quantization_config = quantization_config(model)
    if config.quantization_config is None:
        del config.quantization_config
    config.save_pretrained(directory)
    names = ([SAFE_WEIGHTS] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    _remove_stale_weights(directory, keep=names)
    for name, shard in zip(names, shards):
        safetensors_format.write(os.path.join(directory, name), shard)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for _, t in items)},
                 "weight_map": {tensor: name for name, shard in zip(names, shards) for tensor, _ in shard}}
        with open(os.path.join(directory, SAFE_INDEX), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    if config.pad_token_id is not None:
        gen["pad_token_id"] = config.pad_token_id
    gen.update(getattr(model, "generation_config", None) or {})
    with open(os.path.join(directory, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(gen, f, indent=2, sort_keys=True)
        f.write("\n")


def _size_in_bytes(size: int | str) -> int:
    """500 / "500MB" / "5GB" / "2GiB" -> bytes (KB/MB/GB decimal, KiB/MiB/GiB binary, as transformers)."""
    if isinstance(size, int) and size > 0:
        return size
    units = {"GIB": 2 ** 30, "MIB": 2 ** 20, "KIB": 2 ** 10, "GB": 10 ** 9, "MB": 10 ** 6, "KB": 10 ** 3, "B": 1}
    text = str(size).strip().upper()
    for unit, scale in units.items():
        if text.endswith(unit) and text[:-len(unit)].strip().isdigit() and int(text[:-len(unit)]) > 0:
            return int(text[:-len(unit)]) * scale
    raise ValueError(f"max_shard_size must be a positive number of bytes or a size like '5GB', got {size!r}")


def _shard(items: list, limit: int) -> list[list]:
    """Consecutive groups of (name, tensor) of at most `limit` bytes each (a bigger tensor alone)."""
    shards, current, size = [], [], 0
    for name, t in items:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append((name, t))
        size += nbytes
    return shards + [current] if current else shards or [[]]


def _remove_stale_weights(directory: str, keep: list[str]) -> None:
    """Weight files of an earlier save that the new one does not overwrite would confuse a loader."""
    for name in os.listdir(directory):
        stale = name == SAFE_INDEX or name == SAFE_WEIGHTS or (
            name.startswith("model-") and "-of-" in name and name.endswith(".safetensors"))
        if stale and name not in keep:
            os.remove(os.path.join(directory, name))


def quantization_config(model: nn.Module) -> dict | None:
    """config.json's quantization_config for a model with quantized linears (None if it has none): the
    format, and which bits / group sizes occur (each layer's own are read back from its tensors)."""
    layers = [m for m in model.modules() if isinstance(m, Linear) and m.quantized]
    if not layers:
        return None
    dense = sorted({name.rpartition(".")[2] for name, m in model.named_modules()
                    if isinstance(m, Linear) and not m.quantized})
    formats = sorted({(m.bits, m.group_size) for m in layers})
    bits, group_size = max(formats, key=[(m.bits, m.group_size) for m in layers].count)
    return {"quant_method": QUANT_METHOD, "bits": bits, "group_size": group_size,
            "formats": [{"bits": b, "group_size": g} for b, g in formats],
            "scale_dtype": str(layers[0].scales.dtype).removeprefix("torch."),
            "modules_not_converted": dense}
