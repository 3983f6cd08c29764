"""A validated reader of GGUF headers: metadata and tensor directory, checked before anything is allocated.

The layout (little-endian; https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):
    "GGUF", version u32 (2 or 3), tensor count u64, metadata count u64,
    metadata: key (string), value type u32, value        string = length u64 + UTF-8 bytes
                                                          array  = element type u32, count u64, elements
    tensor infos: name (string), n_dims u32, dims u64 x n_dims (innermost first), type u32, offset u64
    padding to `general.alignment` (default 32), then the data section; each tensor's offset is relative to it.

Every count and length read from the file is checked against the bytes left before anything is built from
it, so a header claiming 2^40 array items or a 2^31-byte string fails at once with GGUFFormatError instead
of allocating. The tensor directory is checked the way llama.cpp checks it: a known type, 1..4 dims, a row
length that is a whole number of blocks, element counts that do not overflow, and offsets that tile the data
section in directory order (each tensor starts where the previous one ended, rounded up to the alignment;
no overlap, no gap, nothing past the end of the file). A file that passes cannot make a tensor read
another tensor's bytes or bytes outside the file.

Speed: the 98K-token vocabulary of SmolLM2 is one array of strings; it is read with a tight loop over one
bytes object (the lengths) and decoded lazily, on first access of that key (the gguf package's reader builds
several numpy objects per string and takes seconds). Tensor data is read with pread into a buffer the caller
owns (`read_tensor`), so the file's pages are never part of the process's resident memory.
"""
from __future__ import annotations

import functools
import math
import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4                     # GGML_MAX_DIMS
MAX_ARRAY_NESTING = 2            # an array of arrays at most (no writer we know nests deeper)
MAX_KEY_BYTES = 65535
MAX_ELEMENTS = 2 ** 53           # no real tensor comes near; keeps byte counts exact in every dtype

# Metadata value types -> (name, struct format) for the scalar ones.
_SCALARS = {0: ("UINT8", "<B"), 1: ("INT8", "<b"), 2: ("UINT16", "<H"), 3: ("INT16", "<h"),
            4: ("UINT32", "<I"), 5: ("INT32", "<i"), 6: ("FLOAT32", "<f"), 7: ("BOOL", "<?"),
            10: ("UINT64", "<Q"), 11: ("INT64", "<q"), 12: ("FLOAT64", "<d")}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
          10: "<u8", 11: "<i8", 12: "<f8"}
STRING, ARRAY = 8, 9


class GGUFFormatError(ValueError):
    """A GGUF file whose header is malformed, truncated or inconsistent."""


@functools.cache
def ggml_type_sizes() -> dict[int, tuple[str, int, int]]:
    """GGML tensor type id -> (name, elements per block, bytes per block), from the gguf package's table."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    return {int(t): (t.name, *GGML_QUANT_SIZES[t]) for t in GGMLQuantizationType if t in GGML_QUANT_SIZES}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]        # as stored: innermost (contiguous) dimension first
    type_id: int
    type_name: str
    offset: int                  # absolute byte offset in the file
    n_bytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """torch order (outermost first)."""
        return tuple(reversed(self.dims))

    @property
    def n_elements(self) -> int:
        return math.prod(self.dims)


class _StringArray:
    """An array of strings located in the file but not decoded yet: (start, end) byte spans."""

    def __init__(self, raw: bytes, spans: np.ndarray):
        self._raw, self._spans = raw, spans

    def __len__(self) -> int:
        return len(self._spans)

    def rebase(self, raw: bytes) -> None:
        """Reads from `raw` (a copy of the header holding the same bytes at the same positions) from now on."""
        self._raw = raw

    def decode(self, what: str) -> list[str]:
        raw = self._raw
        try:
            return [raw[s:e].decode("utf-8") for s, e in self._spans.tolist()]
        except UnicodeDecodeError as e:
            raise GGUFFormatError(f"{what}: a string is not valid UTF-8 ({e.reason})") from None


class _Cursor:
    """Reads the header from a bytes object, every length checked against what is left."""

    def __init__(self, raw: bytes, path: str):
        self.raw, self.pos, self.path = raw, 0, path

    def fail(self, message: str):
        raise GGUFFormatError(f"{self.path}: {message} (at byte {self.pos})")

    def left(self) -> int:
        return len(self.raw) - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > self.left():
            self.fail(f"truncated or corrupt: {what} needs {n} bytes, {self.left()} are left")
        out = self.raw[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, self.take(size, what))[0]

    def u32(self, what: str) -> int:
        return self.unpack("<I", what)

    def u64(self, what: str) -> int:
        return self.unpack("<Q", what)

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.u64(f"the length of {what}")
        if limit is not None and n > limit:
            self.fail(f"{what} is {n} bytes long (at most {limit} allowed)")
        try:
            return self.take(n, what).decode("utf-8")
        except UnicodeDecodeError as e:
            self.fail(f"{what} is not valid UTF-8 ({e.reason})")

    def value(self, kind: int, what: str, depth: int = 0):
        if kind in _SCALARS:
            value = self.unpack(_SCALARS[kind][1], what)
            return bool(value) if kind == 7 else value
        if kind == STRING:
            return self.string(what)
        if kind == ARRAY:
            return self.array(what, depth)
        self.fail(f"{what} has unknown value type {kind}")

    def array(self, what: str, depth: int):
        if depth >= MAX_ARRAY_NESTING:
            self.fail(f"{what}: arrays nested more than {MAX_ARRAY_NESTING} deep")
        kind = self.u32(f"the element type of {what}")
        count = self.u64(f"the length of {what}")
        if kind in _NUMPY:
            itemsize = struct.calcsize(_SCALARS[kind][1])
            if count > self.left() // itemsize:
                self.fail(f"{what} claims {count} items of {itemsize} bytes, only {self.left()} bytes are left")
            values = np.frombuffer(self.take(count * itemsize, what), dtype=_NUMPY[kind])
            return values.astype(bool) if kind == 7 else values
        if kind == STRING:
            # Each string takes at least its 8-byte length: a count beyond that cannot be real.
            if count > self.left() // 8:
                self.fail(f"{what} claims {count} strings, only {self.left()} bytes are left")
            return self.string_array(count, what)
        if kind == ARRAY:
            if count > self.left() // 12:
                self.fail(f"{what} claims {count} arrays, only {self.left()} bytes are left")
            return [self.array(f"{what}[{i}]", depth + 1) for i in range(count)]
        self.fail(f"{what} has unknown element type {kind}")

    def string_array(self, count: int, what: str) -> _StringArray:
        raw, pos, end = self.raw, self.pos, len(self.raw)
        spans = np.empty((count, 2), dtype=np.int64)
        read_length = struct.Struct("<Q").unpack_from
        for i in range(count):
            if pos + 8 > end:
                self.pos = pos
                self.fail(f"truncated or corrupt: {what}[{i}] has no length")
            (n,) = read_length(raw, pos)
            pos += 8
            if n > end - pos:
                self.pos = pos
                self.fail(f"{what}[{i}] is {n} bytes long, only {end - pos} bytes are left")
            spans[i] = pos, pos + n
            pos += n
        self.pos = pos
        return _StringArray(raw, spans)


class GGUFReader:
    """The validated header of a GGUF file: `metadata` (key -> value; arrays as lists) and `tensors`
    (TensorInfo in directory order); `read_tensor` reads one tensor's bytes."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        self.file_size = os.path.getsize(self.path)
        if self.file_size < 24:
            raise GGUFFormatError(f"{self.path}: not a readable GGUF file, truncated or corrupt "
                                  f"({self.file_size} bytes, too short for a header)")
        # The header is parsed from a read-only memory map, so only its own pages are touched; it is copied
        # out at the end (string arrays are decoded from the copy later) and the map is closed.
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as raw:
            cur = _Cursor(raw, self.path)
            self._parse(cur)
            header = bytes(raw[:cur.pos])
        for value in self._values.values():
            for item in (value if isinstance(value, list) else [value]):
                if isinstance(item, _StringArray):
                    item.rebase(header)

    def _parse(self, cur: "_Cursor") -> None:
        if cur.take(4, "the magic number") != MAGIC:
            raise GGUFFormatError(f"{self.path}: not a readable GGUF file (no GGUF magic number)")
        self.version = cur.u32("the version")
        if self.version not in SUPPORTED_VERSIONS:
            # A big-endian file reads its version byte-swapped (e.g. 0x03000000): also refused here.
            cur.fail(f"GGUF version {self.version} is not supported (supported: 2, 3; little-endian)")
        n_tensors = cur.u64("the tensor count")
        n_kv = cur.u64("the metadata count")
        # A tensor info takes at least 8 (name) + 4 + 8 + 4 + 8 bytes, a metadata entry 8 + 4 + 1.
        if n_tensors > cur.left() // 32 or n_kv > cur.left() // 13:
            cur.fail(f"truncated or corrupt: the header claims {n_tensors} tensors and {n_kv} metadata "
                     f"entries, more than {self.file_size} bytes can hold")
        self._values: dict = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}", MAX_KEY_BYTES)
            if key in self._values:
                cur.fail(f"metadata key {key!r} appears twice")
            kind = cur.u32(f"the type of metadata {key!r}")
            self._values[key] = cur.value(kind, f"metadata {key!r}")
        self.alignment = self._alignment(cur)
        infos = [self._tensor_info(cur, i) for i in range(n_tensors)]
        self.data_start = _align(cur.pos, self.alignment)
        self.tensors = self._place(infos, cur)
        self._by_name = {t.name: t for t in self.tensors}
        if len(self._by_name) != len(self.tensors):
            raise GGUFFormatError(f"{self.path}: two tensors have the same name")

    # ---- metadata -------------------------------------------------------------------------------------

    def keys(self) -> list[str]:
        return list(self._values)

    def get(self, key: str, default=None):
        """The value of metadata `key`: int / float / bool / str, or a list for arrays."""
        if key not in self._values:
            return default
        value = self._values[key]
        if isinstance(value, _StringArray):
            value = self._values[key] = value.decode(f"{self.path}: metadata {key!r}")
        elif isinstance(value, np.ndarray):
            value = self._values[key] = value.tolist()
        elif isinstance(value, list):
            value = self._values[key] = [v.decode(key) if isinstance(v, _StringArray) else
                                         v.tolist() if isinstance(v, np.ndarray) else v for v in value]
        return value

    def array_length(self, key: str) -> int | None:
        """The number of items of array `key` (None if absent or not an array), without decoding it."""
        value = self._values.get(key)
        return len(value) if isinstance(value, (_StringArray, np.ndarray, list)) else None

    @property
    def metadata(self) -> dict:
        return {key: self.get(key) for key in self._values}

    # ---- tensors --------------------------------------------------------------------------------------

    def tensor(self, name: str) -> TensorInfo | None:
        return self._by_name.get(name)

    def read_tensor(self, info: TensorInfo) -> np.ndarray:
        """The tensor's bytes (uint8, a new array the caller owns), read with pread: no memory map stays
        resident."""
        out = np.empty(info.n_bytes, dtype=np.uint8)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(info.offset)
            got = f.readinto(memoryview(out))
        if got != info.n_bytes:     # the file shrank after it was opened
            raise GGUFFormatError(f"{self.path}: truncated while reading tensor {info.name}")
        return out

    # ---- checks ---------------------------------------------------------------------------------------

    def _alignment(self, cur: _Cursor) -> int:
        value = self._values.get("general.alignment", DEFAULT_ALIGNMENT)
        if isinstance(value, (bool, np.ndarray, list, str, _StringArray, float)) or not 0 < value <= 2 ** 16 \
                or value & (value - 1):
            cur.fail(f"general.alignment must be a power of two up to 65536, got {value!r}")
        return int(value)

    def _tensor_info(self, cur: _Cursor, index: int):
        name = cur.string(f"the name of tensor #{index}", MAX_KEY_BYTES)
        n_dims = cur.u32(f"the number of dims of tensor {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            cur.fail(f"tensor {name} has {n_dims} dims (1 to {MAX_DIMS} allowed)")
        dims = tuple(cur.u64(f"a dim of tensor {name}") for _ in range(n_dims))
        type_id = cur.u32(f"the type of tensor {name}")
        offset = cur.u64(f"the offset of tensor {name}")
        types = ggml_type_sizes()
        if type_id not in types:
            cur.fail(f"tensor {name} has unknown type {type_id}")
        type_name, block, block_bytes = types[type_id]
        if any(d == 0 for d in dims) or math.prod(dims) > MAX_ELEMENTS:
            cur.fail(f"tensor {name} has dims {list(dims)}: each must be >= 1 and the product at most 2^53")
        if dims[0] % block:
            cur.fail(f"tensor {name} of type {type_name} has a row of {dims[0]} elements, not a multiple of "
                     f"its block size {block}")
        n_bytes = math.prod(dims) // block * block_bytes
        return name, dims, type_id, type_name, offset, n_bytes

    def _place(self, infos, cur: _Cursor) -> list[TensorInfo]:
        """The offsets must tile the data section in directory order, as llama.cpp requires."""
        data_size = self.file_size - self.data_start
        if not infos:      # a vocabulary-only file: no data section, the header may end unpadded
            return []
        if data_size < 0:
            cur.fail("truncated: the file ends before its data section")
        expected, out = 0, []
        for name, dims, type_id, type_name, offset, n_bytes in infos:
            if offset != expected:
                raise GGUFFormatError(f"{self.path}: tensor {name} has offset {offset}, expected {expected} "
                                      "(tensors must follow each other in the data section, aligned)")
            if n_bytes > data_size - offset:
                raise GGUFFormatError(f"{self.path}: truncated: tensor {name} needs bytes {offset}..."
                                      f"{offset + n_bytes} of a data section of {data_size}")
            out.append(TensorInfo(name, dims, type_id, type_name, self.data_start + offset, n_bytes))
            expected = _align(offset + n_bytes, self.alignment)
        if data_size - expected >= self.alignment:   # writers pad the last tensor, nothing more
            raise GGUFFormatError(f"{self.path}: {data_size - expected} bytes after the last tensor "
                                  "belong to no tensor")
        return out


def _align(n: int, alignment: int) -> int:
    return n + (-n % alignment)
