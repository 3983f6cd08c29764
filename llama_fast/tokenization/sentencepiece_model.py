"""Reading a sentencepiece `tokenizer.model` (a serialized ModelProto) without protobuf.

We need only the pieces (text, score, type), the model type (BPE or unigram) and two normalizer flags,
so a small wire-format reader does; it checks every length against the buffer, so a truncated or
corrupt file raises ValueError instead of reading past the end.

ModelProto fields used (sentencepiece_model.proto):
  1 pieces (repeated SentencePiece: 1 piece string, 2 score float, 3 type enum)
  2 trainer_spec (3 model_type enum: 1 UNIGRAM, 2 BPE, 3 WORD, 4 CHAR; 40 unk_id int32)
  3 normalizer_spec (3 add_dummy_prefix bool, 4 remove_extra_whitespaces bool)
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

# SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


@dataclass
class SentencePieceModel:
    pieces: list = field(default_factory=list)  # (text, score, type)
    model_type: str = "unigram"  # proto default
    unk_id: int = 0
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True


def _varint(buf, pos):
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf):
    """(field_number, value) for each field of one message; value is int, bytes or a 4/8-byte blob."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated field")
        yield number, value


def parse_sentencepiece_model(data: bytes) -> SentencePieceModel:
    model = SentencePieceModel()
    try:
        for number, value in _fields(data):
            if number == 1:
                text, score, kind = "", 0.0, NORMAL
                for n, v in _fields(value):
                    if n == 1:
                        text = bytes(v).decode("utf-8")
                    elif n == 2:
                        score = struct.unpack("<f", v)[0]
                    elif n == 3:
                        kind = v
                model.pieces.append((text, score, kind))
            elif number == 2:
                for n, v in _fields(value):
                    if n == 3:
                        model.model_type = MODEL_TYPES.get(v, str(v))
                    elif n == 40:
                        model.unk_id = v
            elif number == 3:
                for n, v in _fields(value):
                    if n == 3:
                        model.add_dummy_prefix = bool(v)
                    elif n == 4:
                        model.remove_extra_whitespaces = bool(v)
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise ValueError(f"not a valid sentencepiece model: {e}") from None
    if not model.pieces:
        raise ValueError("not a valid sentencepiece model: it has no pieces")
    return model


def load_sentencepiece_model(path: str) -> SentencePieceModel:
    with open(path, "rb") as f:
        return parse_sentencepiece_model(f.read())
