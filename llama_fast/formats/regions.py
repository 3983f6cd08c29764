"""Reading a rectangle of a row-major 2-D tensor stored in a file: rows [r0, r1) and a column range, without
reading the rest of the tensor (what a tensor-parallel rank needs: llama_fast.parallel).

A stored row is `row_bytes` bytes made of blocks of `block_elems` weights taking `block_bytes` bytes each:
dense weights are blocks of one element, packed int4 codes blocks of two weights in one byte, GGUF
Q4_0 / Q8_0 blocks of 32 and K-quants of 256. A column range that does not start and end on a block boundary
cannot be read without splitting a block: `block_columns` refuses it, naming the block.

The bytes come through a transient read-only memory map of the file, copied into memory the caller owns
(only the pages of the rectangle are touched; the map is closed on return, so nothing of the file stays
resident).
"""
from __future__ import annotations

import mmap

import numpy as np
import torch


class SplitsBlockError(ValueError):
    """A column range that starts or ends inside a block (a quantization group, a GGUF block, an int4 byte)."""


def block_columns(cols: tuple[int, int], block_elems: int, block_bytes: int, what: str) -> tuple[int, int]:
    """Weight columns [c0, c1) -> byte columns of a stored row. SplitsBlockError when c0 or c1 falls inside a
    block."""
    c0, c1 = cols
    for c in (c0, c1):
        if c % block_elems:
            raise SplitsBlockError(f"{what}: a shard boundary at input column {c} would split a block of {block_elems} "
                             f"weights (the shard's columns {c0}:{c1} must start and end on a block boundary)")
    return c0 // block_elems * block_bytes, c1 // block_elems * block_bytes


def read_rectangle(path: str, offset: int, n_rows: int, row_bytes: int, rows: tuple[int, int],
                   byte_cols: tuple[int, int]) -> torch.Tensor:
    """uint8 [r1 - r0, b1 - b0]: bytes [b0, b1) of rows [r0, r1) of the tensor of `n_rows` rows of `row_bytes`
    bytes starting at byte `offset` of the file at `path` (the caller checked that it lies inside the file)."""
    (r0, r1), (b0, b1) = rows, byte_cols
    if not (0 <= r0 <= r1 <= n_rows and 0 <= b0 <= b1 <= row_bytes):
        raise ValueError(f"{path}: rectangle rows {r0}:{r1}, bytes {b0}:{b1} is outside a tensor of {n_rows} rows "
                         f"of {row_bytes} bytes")
    out = torch.empty((r1 - r0, b1 - b0), dtype=torch.uint8)
    if out.numel() == 0:
        return out
    start = offset + r0 * row_bytes
    length = (r1 - r0) * row_bytes
    page = start - start % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as f, mmap.mmap(f.fileno(), length + start - page, access=mmap.ACCESS_READ,
                                          offset=page) as m:
        stored = np.frombuffer(m, dtype=np.uint8, count=length, offset=start - page).reshape(r1 - r0, row_bytes)
        np.copyto(out.numpy(), stored[:, b0:b1])
        del stored      # the map cannot close while a view of it is alive
    return out
