"""LlamaConfig: the model hyper-parameters, read from and written to a Hugging Face config.json.

Reads both rope forms:
  transformers 4.x  "rope_theta": 500000.0, "rope_scaling": {"type" | "rope_type": "linear", "factor": 2.0, ...}
  transformers 5.x  "rope_parameters": {"rope_type": "default" | "linear" | ..., "rope_theta": 500000.0, ...}
and writes both (rope_parameters for 5.x, rope_theta + rope_scaling for 4.x), so either version reads our
config.json back identically. Keys we do not know are kept as attributes and written back unchanged.
Values that cannot work raise a ValueError naming the field.
"""
from __future__ import annotations

import copy
import json
import math
import os
from typing import Any

import torch

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
_LLAMA3_KEYS = ("low_freq_factor", "high_freq_factor")

# Field -> default, in the order of transformers' LlamaConfig (4.37 plus mlp_bias and head_dim).
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,      # None -> num_attention_heads (MHA)
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "use_cache": True,
    "pad_token_id": None,
    "bos_token_id": 1,
    "eos_token_id": 2,                # an int or a list of ints
    "pretraining_tp": 1,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "head_dim": None,                 # None -> hidden_size // num_attention_heads
}
_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "max_position_embeddings", "head_dim")
# Upper bounds: sizes index int32 tensors in the kernels; a layer count past this is a corrupt config (the
# loaders also check it against the layers the checkpoint holds).
_MAX_SIZE = 2 ** 31 - 1
_BOOL_FIELDS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_cache")
_MAX_LAYERS = 2 ** 16
_DTYPE_NAMES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
                "float16": torch.float16, "half": torch.float16}


def _finite(value) -> bool:
    """A real number (not a bool) that is neither NaN nor infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int_not_bool(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def dtype_from_name(name, what: str = "dtype") -> torch.dtype:
    """'bfloat16' / 'torch.bfloat16' / torch.bfloat16 -> torch.bfloat16."""
    if isinstance(name, torch.dtype):
        if name not in _DTYPE_NAMES.values():
            raise ValueError(f"{what}: unsupported dtype {name}; expected float32, bfloat16 or float16")
        return name
    key = str(name).removeprefix("torch.")
    if key not in _DTYPE_NAMES:
        raise ValueError(f"{what}: unsupported dtype {name!r}; expected float32, bfloat16 or float16")
    return _DTYPE_NAMES[key]


class LlamaConfig:
    model_type = "llama"

    def __init__(self, **kwargs):
        kwargs = copy.deepcopy(kwargs)
        rope_parameters = kwargs.pop("rope_parameters", None)
        # transformers 5 writes "dtype", 4.x "torch_dtype"; we keep one attribute and write both.
        dtype = kwargs.pop("dtype", None)
        torch_dtype = kwargs.pop("torch_dtype", None)
        for name, default in _DEFAULTS.items():
            setattr(self, name, kwargs.pop(name, default))
        self.dtype = None if (dtype or torch_dtype) is None else str(dtype or torch_dtype).removeprefix("torch.")
        num_labels = kwargs.pop("num_labels", None)
        for name, value in kwargs.items():   # unknown keys round-trip unchanged
            setattr(self, name, value)
        if num_labels is not None and not getattr(self, "id2label", None):
            self.num_labels = num_labels

        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if rope_parameters is not None and self.rope_scaling is None:   # rope_scaling wins, as in transformers
            self._set_rope_parameters(rope_parameters)
        self._normalize_rope_scaling()
        self._validate()
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    # ---- rope ---------------------------------------------------------------------------------------------

    def _set_rope_parameters(self, params) -> None:
        """The transformers 5 form: one dict holding the type, theta and the scaling keys."""
        if not isinstance(params, dict):
            raise ValueError(f"rope_parameters must be a dict, got {type(params).__name__}")
        params = dict(params)
        if "rope_theta" in params:
            self.rope_theta = params.pop("rope_theta")
        kind = params.get("rope_type", params.get("type", "default"))
        self.rope_scaling = None if kind == "default" and set(params) <= {"rope_type", "type"} else params

    def _normalize_rope_scaling(self) -> None:
        scaling = self.rope_scaling
        if scaling is None:
            return
        if not isinstance(scaling, dict):
            raise ValueError(f"rope_scaling must be a dict or null, got {type(scaling).__name__}")
        scaling = dict(scaling)
        scaling.pop("rope_theta", None)  # belongs to rope_theta
        kinds = {scaling[k] for k in ("rope_type", "type") if k in scaling}
        if len(kinds) > 1:
            raise ValueError(f"rope_scaling: 'type' and 'rope_type' disagree: {scaling}")
        if not kinds:
            raise ValueError(f"rope_scaling needs a 'rope_type' (or 'type') key, got {scaling}")
        kind = kinds.pop()
        if kind not in ROPE_TYPES:
            raise ValueError(f"rope_scaling: unsupported rope type {kind!r}; supported: {', '.join(ROPE_TYPES)}")
        scaling.pop("type", None)
        scaling["rope_type"] = kind
        self.rope_scaling = None if kind == "default" and len(scaling) == 1 else scaling

    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else self.rope_scaling["rope_type"]

    @property
    def rope_parameters(self) -> dict:
        """The transformers 5 form of the rope settings."""
        params = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            params.update(self.rope_scaling)
            if self.rope_type == "llama3":
                params.setdefault("original_max_position_embeddings", self.max_position_embeddings)
        return params

    # ---- validation ---------------------------------------------------------------------------------------

    def _validate(self) -> None:
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if value is None and name == "head_dim":
                continue
            limit = _MAX_LAYERS if name == "num_hidden_layers" else _MAX_SIZE
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
                raise ValueError(f"{name} must be a positive integer up to {limit}, got {value!r}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                             f"({self.num_attention_heads}); set head_dim explicitly")
        head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) is not divisible by "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name} must be an integer or null, got {value!r}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; llama_fast implements 'silu'")
        if not _finite(self.rope_theta) or self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be a finite positive number, got {self.rope_theta!r}")
        if not _finite(self.rms_norm_eps) or self.rms_norm_eps < 0:
            raise ValueError(f"rms_norm_eps must be a finite non-negative number, got {self.rms_norm_eps!r}")
        quantization = getattr(self, "quantization_config", None)
        if quantization is not None and not isinstance(quantization, dict):
            raise ValueError(f"quantization_config must be an object, got {type(quantization).__name__}")
        if self.dtype is not None:
            dtype_from_name(self.dtype, "torch_dtype")
        if getattr(self, "kv_cache_dtype", None) is not None:     # set by the user, not by checkpoints
            from llama_fast.cache import kv_cache_dtype_name
            self.kv_cache_dtype = kv_cache_dtype_name(self.kv_cache_dtype)
        eos = self.eos_token_id
        if eos is not None and not _int_not_bool(eos) and not (
                isinstance(eos, list) and all(_int_not_bool(e) for e in eos)):
            raise ValueError(f"eos_token_id must be an int or a list of ints, got {eos!r}")
        self._validate_rope_scaling()

    def _validate_rope_scaling(self) -> None:
        s = self.rope_scaling
        if s is None or s["rope_type"] == "default":
            return
        kind = s["rope_type"]
        for key, value in s.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"rope_scaling {key} must be finite, got {value!r}")
        factor = s.get("factor")
        if factor is None:
            raise ValueError(f"rope_scaling of type {kind!r} needs a 'factor'")
        if not _finite(factor) or factor < 1:
            raise ValueError(f"rope_scaling factor must be a number >= 1, got {factor!r}")
        if kind == "llama3":
            missing = [k for k in _LLAMA3_KEYS if k not in s]
            if missing:
                raise ValueError(f"rope_scaling of type 'llama3' is missing {', '.join(missing)}")
            if not all(_finite(s[k]) and s[k] > 0 for k in _LLAMA3_KEYS):
                raise ValueError(f"rope_scaling: {' and '.join(_LLAMA3_KEYS)} must be positive numbers")
            if s["high_freq_factor"] <= s["low_freq_factor"]:
                raise ValueError(f"rope_scaling: high_freq_factor ({s['high_freq_factor']}) must be greater "
                                 f"than low_freq_factor ({s['low_freq_factor']})")
            original = s.get("original_max_position_embeddings", self.max_position_embeddings)
            if isinstance(original, bool) or not isinstance(original, int) or original <= 0:
                raise ValueError("rope_scaling: original_max_position_embeddings must be a positive integer, "
                                 f"got {original!r}")

    # ---- derived sizes ------------------------------------------------------------------------------------

    @property
    def num_labels(self) -> int:
        """Classes of LlamaForSequenceClassification (transformers: len(id2label), default 2)."""
        id2label = getattr(self, "id2label", None)
        return len(id2label) if id2label else self.__dict__.get("_num_labels", 2)

    @num_labels.setter
    def num_labels(self, n: int) -> None:
        self.__dict__["_num_labels"] = int(n)
        self.__dict__.pop("id2label", None)
        self.__dict__.pop("label2id", None)

    @property
    def torch_dtype(self) -> str | None:
        return self.dtype

    # ---- (de)serialization --------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a config must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        d.pop("transformers_version", None)
        model_type = d.pop("model_type", "llama")
        if model_type not in ("llama", None):
            raise ValueError(f"model_type is {model_type!r}; llama_fast loads 'llama' models")
        return cls(**d)

    def to_dict(self) -> dict:
        d = {}
        for name, value in self.__dict__.items():
            if name == "_num_labels":
                if value != 2 and not getattr(self, "id2label", None):
                    d["num_labels"] = value
                continue
            d[name] = copy.deepcopy(value)
        d.pop("dtype")
        if self.dtype is not None:
            d["dtype"] = d["torch_dtype"] = self.dtype
        d["rope_parameters"] = self.rope_parameters
        d["model_type"] = self.model_type
        return dict(sorted(d.items()))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "LlamaConfig":
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not UTF-8 text") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        except RecursionError:
            raise ValueError(f"{path}: invalid config: JSON nested too deeply") from None
        try:
            return cls.from_dict(d)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "LlamaConfig":
        """A directory holding config.json, or the path of a config JSON file."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        return cls.from_json_file(path)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    def __eq__(self, other) -> bool:
        return isinstance(other, LlamaConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"LlamaConfig {self.to_json_string()}"
