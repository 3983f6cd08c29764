"""Writes small sentencepiece ModelProto files (tokenizer.model) byte by byte, for the tests that corrupt them."""
from __future__ import annotations

import struct


def varint(n: int) -> bytes:
    """protobuf's base-128 varint."""
    out = b""
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            return out + bytes([low])
        out += bytes([low | 0x80])


def model_bytes(pieces, model_type: int = 2, unk_id: int | None = None) -> bytes:
    """A ModelProto: `pieces` as (text, score, type), trainer_spec (model_type: 1 unigram, 2 BPE; unk_id, field
    40, when given) and normalizer_spec (add_dummy_prefix and remove_extra_whitespaces on)."""
    out = b""
    for text, score, kind in pieces:
        raw = text.encode()
        piece = b"\x0a" + varint(len(raw)) + raw + b"\x15" + struct.pack("<f", score) + b"\x18" + varint(kind)
        out += b"\x0a" + varint(len(piece)) + piece
    trainer = b"\x18" + varint(model_type) + (b"" if unk_id is None else b"\xc0\x02" + varint(unk_id))
    normalizer = b"\x18\x01\x20\x01"
    return out + b"\x12" + varint(len(trainer)) + trainer + b"\x1a" + varint(len(normalizer)) + normalizer
