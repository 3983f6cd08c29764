"""Incremental detokenization with OpenAI stop strings.

Each new token re-decodes the request's output tokens (special tokens skipped) and releases only text that
can no longer change or be cut: never an incomplete UTF-8 character (the decoder's U+FFFD at the end), and
never a tail that could be the start of a stop string. When a stop string appears anywhere in the text
(across token boundaries, inside one token), the text ends right before it and the request stops with
finish_reason "stop"; the stop string itself is not returned (OpenAI's rule).
"""
from __future__ import annotations


class IncrementalText:
    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.tokens: list[int] = []
        self.released = 0           # characters of the decoded text already handed out
        self.text = ""
        self.stopped = False

    def add(self, token: int) -> str:
        """Appends a token; returns the newly releasable text (possibly empty). Sets `stopped` when a stop
        string completed."""
        self.tokens.append(token)
        self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if self.stop:
            # only the new end of the text can hold a new match; search from the oldest unreleased character
            longest = max(len(s) for s in self.stop)
            start = max(0, self.released - longest + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
                return self._release(len(self.text))
        end = len(self.text)
        while end > self.released and self.text[end - 1] == "\ufffd":
            end -= 1            # an incomplete multi-byte character: wait for its other bytes
        end -= self._partial_stop_suffix(self.text[:end])
        return self._release(end)

    def flush(self) -> str:
        """The rest of the text when the request ends (length or eos): held-back tails are final now."""
        return self._release(len(self.text))

    def _partial_stop_suffix(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _release(self, end: int) -> str:
        if end <= self.released:
            return ""
        piece = self.text[self.released:end]
        self.released = end
        return piece
