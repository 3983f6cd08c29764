"""generate(stop_strings=..., tokenizer=...): stop a row once a stop string appears in its tokens' text and
overlaps the last token, transformers' StopStringCriteria rule.

The rule, stated on text: concatenate the surface text of the row's last tokens; a stop string s matches when
one of its occurrences ends inside the final token (so ["st", "op"], ["las", "topper"] and ["xstopx"] match
"stop", while ["stop", "at"] does not: that match was already reported one step earlier). transformers
evaluates this with precomputed tensor tables; here the same rule is a substring search over the few tokens
that can hold s (each token is at least one byte, so s spans at most len(s) tokens).

Surface text: byte-level vocabularies (GPT-2 style) and byte-fallback ones (`<0xNN>` tokens) compare raw UTF-8
bytes, so a stop string can end inside a multi-byte character; other vocabularies compare the text each
token decodes to after a fixed prefix (which keeps word-start markers such as "▁" as the space they stand
for), as transformers does.
"""
from __future__ import annotations

import json

import torch

_PREFIX = "abcdef"   # decoded in front of each token, then cut, so a leading space is kept


def _byte_level_alphabet() -> dict:
    """The GPT-2 byte-level map, inverted: the printable character that stands for each byte -> the byte.
    Bytes that print as themselves keep their character; the others take code points 256, 257, ... in order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    extra = 0
    alphabet = {}
    for byte in range(256):
        if byte in printable:
            alphabet[chr(byte)] = byte
        else:
            alphabet[chr(256 + extra)] = byte
            extra += 1
    return alphabet


def _decoder_kinds(tokenizer) -> set:
    """The `type` names inside the backend tokenizer's decoder (empty for a tokenizer without one)."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None:
        return set()
    kinds = {type(decoder).__name__}
    try:
        state = json.loads(decoder.__getstate__())
    except Exception:    # a decoder without a JSON state: its class name is all we know
        return kinds

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("type"), str):
                kinds.add(node["type"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(state)
    return kinds


def matching_mode(tokenizer) -> str | None:
    """"byte_fallback", "byte_level" (compare bytes) or None (compare text)."""
    kinds = _decoder_kinds(tokenizer)
    if "ByteFallback" in kinds:
        return "byte_fallback"
    if "ByteLevel" in kinds:
        return "byte_level"
    return None


def token_surfaces(tokenizer) -> tuple[list, str | None]:
    """(surface of every token id, matching mode): bytes in the byte modes, str otherwise."""
    mode = matching_mode(tokenizer)
    alphabet = _byte_level_alphabet() if mode == "byte_level" else None
    base = tokenizer.convert_ids_to_tokens(tokenizer(_PREFIX, add_special_tokens=False)["input_ids"])
    vocab = tokenizer.get_vocab()
    surfaces = [b"" if mode else ""] * (max(vocab.values()) + 1)
    for token, index in vocab.items():
        surface = None
        if mode == "byte_level" and all(ch in alphabet for ch in token):
            surface = bytes(alphabet[ch] for ch in token)
        elif mode == "byte_fallback" and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            try:
                surface = bytes([int(token[3:5], 16)])
            except ValueError:
                surface = None
        if surface is None:
            text = tokenizer.convert_tokens_to_string(list(base) + [token])
            text = text[text.index(_PREFIX) + len(_PREFIX):] if _PREFIX in text else text
            surface = text.encode("utf-8") if mode else text
        surfaces[index] = surface
    return surfaces, mode


class StopStrings:
    """A stopping criterion: `(input_ids [B, L], scores) -> bool [B]`, True where a row just completed one of
    the stop strings."""

    def __init__(self, stop_strings, tokenizer):
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        if not isinstance(stop_strings, (list, tuple)) or not stop_strings or \
                not all(isinstance(s, str) and s for s in stop_strings):
            raise ValueError(f"stop_strings must be a non-empty string or a list of them, got {stop_strings!r}")
        if tokenizer is None:
            raise ValueError("generate: stop_strings need the model's tokenizer: pass tokenizer=")
        self.surfaces, mode = token_surfaces(tokenizer)
        self.stops = [s.encode("utf-8") if mode else s for s in stop_strings]
        self.window = max(len(s) for s in self.stops)

    def __call__(self, input_ids: torch.Tensor, scores=None) -> torch.Tensor:
        done = []
        for row in input_ids[:, -self.window:].tolist():
            pieces = [self.surfaces[t] if 0 <= t < len(self.surfaces) else self.surfaces[0][:0] for t in row]
            text = pieces[0][:0].join(pieces)
            last_start = len(text) - len(pieces[-1])
            # an occurrence starting at or after last_start - len(s) + 1 ends inside the last token
            done.append(any(s in text[max(0, last_start - len(s) + 1):] for s in self.stops))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
