"""StaticCache: the preallocated key/value cache of a batch of sequences.

Per layer k/v [B, S, Hkv, D] in the model dtype, or in the model's `config.kv_cache_dtype` (bfloat16, float16,
or int8 with one fp32 scale per token per kv head: k_scale / v_scale [B, S, Hkv], key = code x scale; like
llama.cpp's `-ctk/-ctv q8_0` with one block per head vector). The ops read and write those natively
(llama_fast.ops.store_kv / attention with k_scale, v_scale).
Each sequence's REAL tokens are stored compactly from slot 0 (left padding never takes a slot), `lengths[b]`
(int32, on the cache's device) counts them, and slot i holds the token at rotary position i. So the attention
of row b reads keys 0..lengths[b]-1 and nothing else.

`seen_tokens` counts the columns of all input chunks so far (a host int, an upper bound of every length):
capacity checks use it, so the forward pass never syncs with the device to decide whether the cache fits.
A cache made by generate() is sized exactly up front; one made implicitly by forward(use_cache=True)
is `growable` and doubles its capacity when a chunk does not fit (so a long conversation works).

past_key_values given in transformers' forms (a tuple of (k, v) per layer with k/v [B, Hkv, T, D], or a
DynamicCache-like object) is converted by `as_static_cache`.
"""
from __future__ import annotations

import torch

# kv_cache_dtype names -> the storage dtype of the cache's k / v (torch.int8: codes, with fp32 scales).
KV_CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                   "int8": torch.int8}


def kv_cache_dtype_name(value) -> str | None:
    """The canonical name of a kv_cache_dtype setting: None (the model dtype), torch.bfloat16 / "bfloat16",
    torch.float16 / "float16", torch.float32 / "float32" or torch.int8 / "int8"; anything else is a ValueError."""
    if value is None:
        return None
    for name, dtype in KV_CACHE_DTYPES.items():
        if value is dtype or (isinstance(value, str) and value.removeprefix("torch.") == name):
            return name
    raise ValueError(f"kv_cache_dtype must be None (the model dtype), 'bfloat16', 'float16', 'float32' or 'int8' "
                     f"(or the torch dtype), got {value!r}")


class CacheOverflowError(ValueError):
    """A chunk does not fit in a fixed-size cache."""


class StaticCache:
    def __init__(self, num_layers: int, batch_size: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device=None, growable: bool = False):
        if min(num_layers, batch_size, max_len, num_kv_heads, head_dim) <= 0:
            raise ValueError("StaticCache sizes must be positive: "
                             f"layers={num_layers} batch={batch_size} max_len={max_len} "
                             f"kv_heads={num_kv_heads} head_dim={head_dim}")
        dtype = KV_CACHE_DTYPES[kv_cache_dtype_name(dtype)]
        shape = (batch_size, max_len, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        # int8: one fp32 scale per (row, slot, kv head); None per layer for a float cache.
        scales = dtype == torch.int8
        self.k_scale = [torch.zeros(shape[:3], device=device) if scales else None for _ in range(num_layers)]
        self.v_scale = [torch.zeros(shape[:3], device=device) if scales else None for _ in range(num_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.seen_tokens = 0
        self.growable = growable

    @classmethod
    def for_model(cls, config, batch_size: int, max_len: int, dtype: torch.dtype, device=None,
                  growable: bool = False) -> "StaticCache":
        """A cache for a model of `config` whose activations are `dtype`: stored in config.kv_cache_dtype when
        that is set, else in `dtype`."""
        kv_dtype = getattr(config, "kv_cache_dtype", None)
        return cls(config.num_hidden_layers, batch_size, max_len, config.num_key_value_heads, config.head_dim,
                   dtype=dtype if kv_dtype is None else kv_dtype, device=device, growable=growable)

    # ---- sizes --------------------------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def dtype(self) -> torch.dtype:
        """The storage dtype of keys and values (torch.int8 for a quantized cache)."""
        return self.k[0].dtype

    def scales(self, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(k_scale, v_scale) [B, S, Hkv] of an int8 cache's layer; (None, None) for a float cache."""
        return self.k_scale[layer_idx], self.v_scale[layer_idx]

    def dequantized(self, layer_idx: int, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer keys / values of slots [0, span) as fp32 for an int8 cache, else as stored (views)."""
        k, v = self.k[layer_idx][:, :span], self.v[layer_idx][:, :span]
        if self.dtype != torch.int8:
            return k, v
        from llama_fast.ops.reference import dequantize_kv
        return (dequantize_kv(k, self.k_scale[layer_idx][:, :span]),
                dequantize_kv(v, self.v_scale[layer_idx][:, :span]))

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Columns consumed so far (transformers' name; with left padding, >= every row's real length)."""
        return self.seen_tokens

    def __len__(self) -> int:
        return self.num_layers

    def reserve(self, new_tokens: int) -> None:
        """Makes room for a chunk of `new_tokens` columns: grows a growable cache, else raises."""
        needed = self.seen_tokens + new_tokens
        if needed <= self.max_len:
            return
        if not self.growable:
            raise CacheOverflowError(
                f"the KV cache is full: it holds {self.max_len} tokens per sequence, {self.seen_tokens} are "
                f"used and the input adds {new_tokens} (needs {needed}); allocate a larger cache")
        new_len = self.max_len
        while new_len < needed:
            new_len *= 2
        self.k = [_grow(t, new_len) for t in self.k]
        self.v = [_grow(t, new_len) for t in self.v]
        self.k_scale = [None if t is None else _grow(t, new_len) for t in self.k_scale]
        self.v_scale = [None if t is None else _grow(t, new_len) for t in self.v_scale]

    def reset(self) -> None:
        self.lengths.zero_()
        self.seen_tokens = 0

    def rows(self, start: int, stop: int) -> "StaticCache":
        """Rows [start, stop) as a cache of their own that shares this one's storage: keys, values and lengths
        a forward pass writes through it land here (the batch dimension is outermost, so each slice is a
        contiguous view). Its seen_tokens starts at this cache's; a caller running rows of different lengths
        (the server's continuous batch) sets it to their longest before each call. A view never grows."""
        if not 0 <= start < stop <= self.batch_size:
            raise ValueError(f"rows [{start}, {stop}) are not inside the cache's {self.batch_size} rows")
        view = StaticCache.__new__(StaticCache)
        view.k = [t[start:stop] for t in self.k]
        view.v = [t[start:stop] for t in self.v]
        view.k_scale = [None if t is None else t[start:stop] for t in self.k_scale]
        view.v_scale = [None if t is None else t[start:stop] for t in self.v_scale]
        view.lengths = self.lengths[start:stop]
        view.seen_tokens = self.seen_tokens
        view.growable = False
        return view

    # ---- transformers interop -----------------------------------------------------------------------------

    def to_legacy_cache(self) -> tuple:
        """((k, v) per layer), k/v [B, Hkv, T, D] with T = max(lengths); row b's tokens are left-aligned
        (slot i = position i), rows shorter than T are zero beyond their length. An int8 cache gives its
        dequantized values in fp32."""
        t = int(self.lengths.max()) if self.batch_size else 0
        layers = (self.dequantized(i, t) for i in range(self.num_layers))
        return tuple((k.transpose(1, 2), v.transpose(1, 2)) for k, v in layers)

    def __getitem__(self, layer_idx: int):
        return self.to_legacy_cache()[layer_idx]

    def __iter__(self):
        return iter(self.to_legacy_cache())

    def __repr__(self) -> str:
        return (f"StaticCache(layers={self.num_layers}, batch={self.batch_size}, max_len={self.max_len}, "
                f"kv_heads={self.k[0].shape[2]}, head_dim={self.k[0].shape[3]}, dtype={self.dtype}, "
                f"seen_tokens={self.seen_tokens})")


def _grow(t: torch.Tensor, new_len: int) -> torch.Tensor:
    bigger = t.new_zeros((t.shape[0], new_len) + tuple(t.shape[2:]))
    bigger[:, :t.shape[1]] = t
    return bigger


def _legacy_layers(past) -> list:
    """[(k, v)] per layer from a legacy tuple or a DynamicCache-like object (duck-typed)."""
    if hasattr(past, "to_legacy_cache"):
        past = past.to_legacy_cache()
    elif hasattr(past, "layers"):                          # transformers 5 Cache: .layers[i].keys / .values
        past = [(layer.keys, layer.values) for layer in past.layers]
    elif hasattr(past, "key_cache") and hasattr(past, "value_cache"):
        past = list(zip(past.key_cache, past.value_cache))
    if not isinstance(past, (tuple, list)):
        raise TypeError(f"past_key_values must be a llama_fast StaticCache, a tuple of (key, value) per layer or "
                        f"a transformers Cache, got {type(past).__name__}")
    layers = []
    for i, layer in enumerate(past):
        if not isinstance(layer, (tuple, list)) or len(layer) < 2:
            raise TypeError(f"past_key_values[{i}] must be a (key, value) pair")
        layers.append((layer[0], layer[1]))
    return layers


def as_static_cache(past, config, past_mask: torch.Tensor | None = None, dtype=None,
                    device=None) -> StaticCache | None:
    """Converts transformers' cache forms (k/v [B, Hkv, T, D] per layer, T = past columns) into a growable
    StaticCache (None for an empty one). `past_mask` [B, T] (the first T columns of a transformers-style
    attention_mask) tells which columns were left padding; their slots are dropped so the real tokens sit
    compactly from slot 0."""
    if isinstance(past, StaticCache):
        return past
    layers = _legacy_layers(past)
    if not layers or any(k is None or k.numel() == 0 for k, _ in layers):
        return None            # an empty cache (e.g. a fresh transformers DynamicCache()): nothing to convert
    if len(layers) != config.num_hidden_layers:
        raise ValueError(f"past_key_values has {len(layers)} layers, the model has {config.num_hidden_layers}")
    k0 = layers[0][0]
    expected = (config.num_key_value_heads, config.head_dim)
    for i, (k, v) in enumerate(layers):
        if k.dim() != 4 or k.shape != v.shape or (k.shape[1], k.shape[3]) != expected or k.shape != k0.shape:
            raise ValueError(f"past_key_values[{i}]: key/value must be [batch, {expected[0]}, past_len, "
                             f"{expected[1]}] and alike, got {tuple(k.shape)} and {tuple(v.shape)}")
    batch, _, past_len, _ = k0.shape
    dtype = dtype or k0.dtype
    device = device or k0.device
    cache = StaticCache.for_model(config, batch, max(2 * past_len, 16), dtype, device, growable=True)
    from llama_fast.ops.reference import store_kv_any_cache  # rounds / quantizes into the cache's dtype
    if past_mask is None:
        pads = torch.zeros(batch, dtype=torch.long, device=device)
    else:
        pads = left_padding(past_mask.to(device))
    # column j of row b is real token j - pads[b]; pads go to slot -1 and are dropped.
    slots = torch.arange(past_len, device=device)[None, :] - pads[:, None]
    for layer, (k, v) in enumerate(layers):
        store_kv_any_cache(cache.k[layer], cache.v[layer], k.transpose(1, 2).to(device, dtype),
                           v.transpose(1, 2).to(device, dtype), slots, *cache.scales(layer))
    cache.lengths.copy_((past_len - pads).to(torch.int32))
    cache.seen_tokens = past_len
    return cache


def left_padding(mask: torch.Tensor) -> torch.Tensor:
    """Per-row count of leading zeros of a [B, T] 0/1 attention mask; raises unless every row is some zeros
    followed by ones (left padding is the only padding the compact cache supports)."""
    if mask.dim() != 2:
        raise ValueError(f"attention_mask must be 2-D [batch, seq_len] (0 = padding); got {mask.dim()}-D "
                         f"shape {tuple(mask.shape)} (custom 4-D masks are not supported)")
    # Checked in the mask's own dtype: casting first would turn 0.5 (or nan) into 0, a silent pad.
    not_binary = ((mask != 0) & (mask != 1)).any()
    m = mask.to(torch.int32)
    holes = (m[:, 1:] < m[:, :-1]).any() if m.shape[1] > 1 else torch.zeros((), dtype=torch.bool)
    not_binary, holes = torch.stack((not_binary, holes.to(not_binary.device))).tolist()   # one device sync
    if not_binary:
        raise ValueError("attention_mask must contain only 0 and 1")
    if holes:
        raise ValueError("attention_mask has zeros after ones: only left padding is supported (pad tokens "
                         "before the text, as tokenizers do with padding_side='left'); holes and right padding "
                         "are not")
    return (m.shape[1] - m.sum(dim=1)).long()
