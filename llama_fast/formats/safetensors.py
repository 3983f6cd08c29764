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
import math
import os
import re
import struct
from collections.abc import Iterable

import numpy as np
import torch

from llama_fast.formats import regions

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2 ** 20   # safetensors' own limit


_MAX_DEPTH = 3                # {name: {"shape": [..]}}: deeper nesting is no safetensors header


class SafetensorsError(ValueError):
    """A malformed or truncated safetensors file."""


def _int_list(value, length: int | None = None) -> bool:
    return isinstance(value, list) and (length is None or len(value) == length) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value)


def _json_depth(raw: bytes) -> int:
    """The deepest nesting of objects and arrays in the JSON text `raw` (strings skipped), without parsing
    it: json.loads would recurse once per level first."""
    structure = np.frombuffer(_JSON_STRING.sub(b"", raw), dtype=np.uint8)
    steps = np.isin(structure, _OPENERS).astype(np.int64) - np.isin(structure, _CLOSERS)
    return int(np.cumsum(steps).max(initial=0))


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_OPENERS = np.frombuffer(b"[{", dtype=np.uint8)
_CLOSERS = np.frombuffer(b"]}", dtype=np.uint8)


def _parse_header(raw: bytes, path: str) -> dict:
    if _json_depth(raw) > _MAX_DEPTH:
        raise SafetensorsError(f"{path}: corrupt safetensors header (JSON nested deeper than {_MAX_DEPTH})")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SafetensorsError(f"{path}: corrupt safetensors header ({type(e).__name__} at byte "
                               f"{getattr(e, 'pos', getattr(e, 'start', '?'))})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: corrupt safetensors header (not a JSON object)")
    return header


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
            # The messages below do not print header_len: for a file that is not safetensors it is the
            # file's first 8 bytes, and errors never show a file's contents.
            if header_len > size - 8:
                raise SafetensorsError(f"{self.path}: truncated or not a safetensors file: the header length "
                                       f"exceeds the file's {size} bytes")
            if header_len > _MAX_HEADER:
                raise SafetensorsError(f"{self.path}: corrupt safetensors header (longer than {_MAX_HEADER} bytes)")
            raw = f.read(header_len)
        header = _parse_header(raw, self.path)
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise SafetensorsError(f"{self.path}: corrupt safetensors header (__metadata__ must map names to "
                                   "strings)")
        self.metadata = metadata
        self.data_start = 8 + header_len
        data_size = size - self.data_start
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            self.entries[name] = self._entry(name, info, data_size)
        self._check_tiling(data_size)

    def _entry(self, name: str, info, data_size: int):
        if not isinstance(info, dict) or not isinstance(info.get("dtype"), str) or info["dtype"] not in DTYPES \
                or not _int_list(info.get("shape")) \
                or not _int_list(info.get("data_offsets"), 2):
            raise SafetensorsError(f"{self.path}: corrupt safetensors header entry for tensor {name!r}: it needs "
                                   f"'dtype' (one of {', '.join(DTYPES)}), 'shape' (a list of integers) and "
                                   "'data_offsets' (two integers)")
        dtype = DTYPES[info["dtype"]]
        shape = tuple(info["shape"])
        begin, end = info["data_offsets"]
        if min(shape, default=0) < 0 or begin < 0 or end < begin:
            raise SafetensorsError(f"{self.path}: tensor {name!r}: negative size or offsets")
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes:
            raise SafetensorsError(f"{self.path}: tensor {name!r}: {end - begin} bytes of data for shape "
                                   f"{list(shape)} {info['dtype']} (needs {nbytes})")
        if end > data_size:
            raise SafetensorsError(f"{self.path}: truncated: tensor {name!r} ends at byte {end} of the data, which "
                                   f"has only {data_size} bytes")
        return dtype, shape, begin, end

    def _check_tiling(self, data_size: int) -> None:
        """The tensors' byte ranges must cover the data section exactly, one after the other (as the
        safetensors library requires): no two tensors share bytes, and no bytes belong to none."""
        expected = 0
        for name, (_, _, begin, end) in sorted(self.entries.items(), key=lambda item: item[1][2:]):
            if begin != expected:
                what = "overlaps the previous tensor" if begin < expected else "leaves a gap before it"
                raise SafetensorsError(f"{self.path}: corrupt header: tensor {name!r} starts at byte {begin} of "
                                       f"the data, expected {expected} (it {what})")
            expected = end
        if expected != data_size:
            raise SafetensorsError(f"{self.path}: corrupt header: the tensors cover {expected} bytes of data, the "
                                   f"file holds {data_size}")

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


    def read_rectangle(self, name: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None,
                       weights_per_element: int = 1) -> torch.Tensor:
        """Rows [r0, r1) and weight columns [c0, c1) of a 1-D (rows only) or 2-D tensor, reading only those bytes
        (llama_fast.formats.regions). A stored element may stand for several weights along a row
        (`weights_per_element`: 2 for packed int4 codes, the group size for the scales of a quantized weight):
        columns count weights, and must not split an element. None: the whole dimension."""
        dtype, shape, begin, _ = self.entries[name]
        if len(shape) not in (1, 2) or (cols is not None and len(shape) != 2):
            raise ValueError(f"{self.path}: tensor {name!r} has shape {list(shape)}; a rectangle needs a 2-D tensor "
                             "(or a 1-D one, by rows)")
        size = torch.empty((), dtype=dtype).element_size()
        n_rows, row_elems = shape[0], shape[1] if len(shape) == 2 else 1
        rows = (0, n_rows) if rows is None else rows
        cols = (0, row_elems * weights_per_element) if cols is None else cols
        byte_cols = regions.block_columns(cols, weights_per_element, size, f"{self.path}: tensor {name!r}")
        raw = regions.read_rectangle(self.path, self.data_start + begin, n_rows, row_elems * size, rows, byte_cols)
        out = raw.view(dtype)
        return out.reshape(-1) if len(shape) == 1 else out


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
