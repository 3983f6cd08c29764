"""Reading and writing safetensors files, one tensor at a time, straight into (or out of) its final memory.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N, N bytes of
JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the raw data,
offsets relative to its start. It holds no code, so reading it never runs any.

Why not safetensors.safe_open: its tensors are views of a memory map of the whole file, so the file's pages
stay resident while any of them is alive, and a converted copy sits next to them. Here `read(name, out=...)`
reads the bytes with readinto() into a tensor we own, usually the parameter itself, so loading holds the
model plus at most one tensor in a different dtype. The header is checked up front (a truncated file or a
tensor whose bytes do not match its shape raises an error naming the file and the tensor).
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2 ** 20   # safetensors' own limit


class SafetensorsError(ValueError):
    """A malformed or truncated safetensors file."""


class SafetensorsFile:
    """The header of one file, and `read` for its tensors."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise SafetensorsError(f"{self.path}: truncated safetensors file: the header claims {header_len} "
                                       f"bytes, the file has {size - 8} after the length")
            if header_len > _MAX_HEADER:
                raise SafetensorsError(f"{self.path}: corrupt safetensors header (length {header_len})")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SafetensorsError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + header_len
        data_size = size - self.data_start
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            self.entries[name] = self._entry(name, info, data_size)

    def _entry(self, name: str, info, data_size: int):
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{self.path}: corrupt safetensors header entry for tensor {name!r}: "
                                   f"{info!r}") from None
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if min(shape, default=0) < 0 or begin < 0 or end - begin != nbytes:
            raise SafetensorsError(f"{self.path}: tensor {name!r}: {end - begin} bytes of data for shape "
                                   f"{list(shape)} {info['dtype']} (needs {nbytes})")
        if end > data_size:
            raise SafetensorsError(f"{self.path}: truncated: tensor {name!r} ends at byte {end} of the data, which "
                                   f"has only {data_size} bytes")
        return dtype, shape, begin, end

    def keys(self) -> list[str]:
        return list(self.entries)

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor `name`, read into `out` when given (a contiguous CPU tensor of its dtype and shape),
        else into a new tensor."""
        dtype, shape, begin, end = self.entries[name]
        if out is None:
            out = torch.empty(shape, dtype=dtype)
        elif out.dtype != dtype or tuple(out.shape) != shape or not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError(f"read({name!r}): out must be a contiguous CPU {dtype} tensor of shape {list(shape)}")
        if end > begin:
            buffer = out.view(-1).view(torch.uint8).numpy()
            with open(self.path, "rb") as f:
                f.seek(self.data_start + begin)
                got = f.readinto(buffer)
            if got != end - begin:
                raise SafetensorsError(f"{self.path}: truncated while reading tensor {name!r}")
        return out


def write(path: str | os.PathLike, items: Iterable[tuple[str, torch.Tensor]],
          metadata: dict[str, str] | None = None) -> None:
    """Writes (name, tensor) pairs, one tensor at a time (no second copy of the model in memory). The file
    appears atomically (written under a temporary name, then renamed)."""
    path = os.fspath(path)
    items = list(items)
    header, offset = {}, 0
    for name, t in items:
        if t.dtype not in _NAMES:
            raise ValueError(f"{name}: cannot save dtype {t.dtype}")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = dict(metadata or {"format": "pt"})
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)     # the data starts 8-byte aligned, as safetensors writes it
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, t in items:
            if t.numel():
                f.write(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().data)
    os.replace(tmp, path)
