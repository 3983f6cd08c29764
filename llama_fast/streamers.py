"""Streamers: receive tokens as generate() produces them and turn them into text pieces.

Same protocol as transformers' streamers (generate calls `put(prompt_ids)` once, then `put(new_ids)` per
step, then `end()`), so either library's streamers work with either generate.

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    threading.Thread(target=model.generate, kwargs=dict(input_ids=ids, max_new_tokens=64, streamer=streamer)).start()
    for piece in streamer:
        print(piece, end="", flush=True)
"""
from __future__ import annotations

import queue


class TextStreamer:
    """Decodes the growing sequence and emits only text that can no longer change: up to the last space
    (a word may still grow), a whole line, a CJK character, never a half UTF-8 character. Prints to stdout;
    subclasses override `on_finalized_text`."""

    def __init__(self, tokenizer, skip_prompt: bool = False, **decode_kwargs):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.decode_kwargs = decode_kwargs
        self.token_cache: list = []
        self.print_len = 0
        self.next_tokens_are_prompt = True

    def put(self, value):
        if hasattr(value, "dim"):
            if value.dim() > 1 and value.shape[0] > 1:
                raise ValueError("text streamers support a batch of one sequence")
            value = value.reshape(-1).tolist()
        elif isinstance(value, int):
            value = [value]
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.next_tokens_are_prompt = False
        self.token_cache.extend(value)
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        if text.endswith("\n"):
            printable = text[self.print_len:]
            self.token_cache, self.print_len = [], 0
        elif text.endswith("\ufffd"):      # an incomplete multi-byte character: wait for its other bytes
            printable = ""
        elif text and _is_cjk(ord(text[-1])):
            printable = text[self.print_len:]
            self.print_len += len(printable)
        else:
            printable = text[self.print_len:text.rfind(" ") + 1]
            self.print_len += len(printable)
        self.on_finalized_text(printable)

    def end(self):
        printable = ""
        if self.token_cache:
            printable = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)[self.print_len:]
        self.token_cache, self.print_len = [], 0
        self.next_tokens_are_prompt = True
        self.on_finalized_text(printable, stream_end=True)

    def on_finalized_text(self, text: str, stream_end: bool = False):
        print(text, flush=True, end="" if not stream_end else None)


class TextIteratorStreamer(TextStreamer):
    """An iterator of the decoded text pieces; run generate in another thread and iterate here.
    `timeout` (seconds) bounds the wait for each piece (queue.Empty is raised past it)."""

    def __init__(self, tokenizer, skip_prompt: bool = False, timeout: float | None = None, **decode_kwargs):
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.text_queue: queue.Queue = queue.Queue()
        self.stop_signal = None
        self.timeout = timeout

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if text:
            self.text_queue.put(text, timeout=self.timeout)
        if stream_end:
            self.text_queue.put(self.stop_signal, timeout=self.timeout)

    def __iter__(self):
        return self

    def __next__(self):
        value = self.text_queue.get(timeout=self.timeout)
        if value is self.stop_signal:
            raise StopIteration
        return value


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF
            or 0x2F800 <= cp <= 0x2FA1F)
