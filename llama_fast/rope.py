"""Rotary position embedding tables: inv_freq for the rope types of LlamaConfig, and cos/sin lookup tables.

The math is transformers 5.23's modeling_rope_utils (default, linear, dynamic NTK, llama3), computed in fp32
exactly as there, so the tables hold the same numbers transformers computes on the fly. ops.rotary takes
cos/sin [n_positions, head_dim // 2] and looks rows up by position, so nothing rope-related is computed per
token: the tables are built once and grown (by doubling) only when a position past their end shows up.
"""
from __future__ import annotations

import math

import torch

from llama_fast.config import LlamaConfig


def inv_freq(config: LlamaConfig, seq_len: int | None = None, device=None) -> torch.Tensor:
    """The inverse frequencies [head_dim // 2] fp32. `seq_len` matters only to dynamic NTK scaling."""
    dim = config.head_dim
    base = float(config.rope_theta)
    kind = config.rope_type
    s = config.rope_scaling or {}
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
    if kind == "dynamic":
        factor = s["factor"]
        max_pos = config.max_position_embeddings
        # transformers computes this in Python floats at init (seq_len None) and, once positions grow past
        # max_position_embeddings, from a 0-d int64 tensor, i.e. in fp32: mirror both to match its rounding.
        if seq_len is None:
            seq_len = max_pos
        else:
            seq_len = torch.maximum(torch.tensor(seq_len, device=device), torch.tensor(max_pos, device=device))
        base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    freq = 1.0 / (base ** exponents)
    if kind == "linear":
        freq /= s["factor"]
    elif kind == "llama3":
        freq = _llama3_scale(freq, s, config.max_position_embeddings)
    factors = getattr(config, "rope_freq_factors", None)
    if factors is not None:  # a GGUF's rope_freqs.weight (Llama 3.1+ scaling as llama.cpp stores it)
        if len(factors) != dim // 2:
            raise ValueError(f"rope_freq_factors has {len(factors)} values; head_dim {dim} needs {dim // 2}")
        freq = freq / torch.tensor(factors, dtype=torch.float32, device=freq.device)
    return freq


def _llama3_scale(freq: torch.Tensor, s: dict, max_position_embeddings: int) -> torch.Tensor:
    """Llama 3.1: low frequencies divided by factor, high ones kept, a smooth ramp in between."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context = s.get("original_max_position_embeddings", max_position_embeddings)
    low_freq_wavelen = old_context / low
    high_freq_wavelen = old_context / high
    wavelen = 2 * math.pi / freq
    scaled = torch.where(wavelen > low_freq_wavelen, freq / factor, freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def cos_sin(freq: torch.Tensor, n_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [n_positions, D/2] fp32 of position * inv_freq (the product in fp32, as transformers)."""
    angles = torch.arange(n_positions, device=freq.device, dtype=torch.int64).float()[:, None] * freq[None, :]
    return angles.cos(), angles.sin()


# Positions past max_position_embeddings work (transformers allows them; dynamic NTK is made for them) up to
# this multiple of it: far beyond, a model has no meaningful output and the position is a corrupt input.
_POSITION_LIMIT_FACTOR = 16


class RotaryTables:
    """cos/sin lookup tables for one model, per device.

    Dynamic NTK scaling depends on the longest position seen so far; `update(seq_len)` reproduces
    transformers' dynamic_rope_update state machine: it recomputes the frequencies when seq_len grows past
    the longest seen, and resets them to the original ones when a call fits in max_position_embeddings again.
    """

    def __init__(self, config: LlamaConfig):
        self.config = config
        self.dynamic = config.rope_type == "dynamic"
        self.original_max = config.max_position_embeddings
        self.max_seq_len_cached = self.original_max
        self._freq_seq_len: int | None = None      # the seq_len the current frequencies were computed for
        self._tables: dict = {}                    # device -> (cos, sin)

    def update(self, seq_len: int) -> None:
        """Dynamic rope only: called with max(position) + 1 of each forward call."""
        if not self.dynamic:
            return
        if seq_len > self.max_seq_len_cached:              # growth
            self._set_freq_seq_len(seq_len)
            self.max_seq_len_cached = seq_len
        elif seq_len < self.original_max < self.max_seq_len_cached:   # back within the original length
            self._set_freq_seq_len(None)
            self.max_seq_len_cached = self.original_max

    def _set_freq_seq_len(self, seq_len: int | None) -> None:
        if seq_len != self._freq_seq_len:
            self._freq_seq_len = seq_len
            self._tables.clear()

    def get(self, device: torch.device, n_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables covering at least positions 0..n_positions-1 on `device`. The kept tables grow up to
        max_position_embeddings (rounded up to a power of two); a call past that gets tables of its own,
        not kept, and positions past `position_limit` are refused (a corrupt position_ids of 2^24 would
        otherwise build and keep 2 GiB of tables)."""
        if n_positions > self.position_limit:
            raise ValueError(f"position {n_positions - 1} is past the limit of {self.position_limit} positions "
                             f"(max_position_embeddings {self.original_max} x {_POSITION_LIMIT_FACTOR})")
        tables = self._tables.get(device)
        if tables is None or tables[0].shape[0] < n_positions:
            size = 256
            while size < n_positions:
                size *= 2
            freq = inv_freq(self.config, self._freq_seq_len, device=device)
            if size > self.kept_limit:
                return cos_sin(freq, n_positions)
            tables = cos_sin(freq, size)
            self._tables[device] = tables
        return tables

    @property
    def kept_limit(self) -> int:
        return max(256, 1 << (self.original_max - 1).bit_length())

    @property
    def position_limit(self) -> int:
        return max(self.kept_limit, self.original_max * _POSITION_LIMIT_FACTOR)
