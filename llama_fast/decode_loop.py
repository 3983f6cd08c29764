"""The pieces of generate's decode loop that keep the host from waiting on the device.

On a GPU the host enqueues a step's kernels in a few microseconds (one graph replay) and the step itself takes
~1-10 ms; any read of a device value on the host (`bool(unfinished.any())`, `tokens.cpu()` for a streamer)
makes the host wait for the step to finish, so the next step cannot be queued behind it. Here:

- `FinishWatch` answers "have all rows finished?" from an asynchronous copy to pinned memory, read only once
  its event has completed: the loop stops a few steps late at worst, never early, and `final_length` (one sync,
  at the end) says where the rows really all finished, so the output is trimmed to exactly what a per-step check
  returns (the extra steps only wrote pad tokens past it).
- `AsyncTokenStream` hands each step's tokens to a streamer through pinned async copies, in order, as soon as
  each copy has landed, and never a token past the final length.

On the CPU both do the plain synchronous thing (there is nothing to overlap).
"""
from __future__ import annotations

from collections import deque

import torch


def _overlaps(device: torch.device) -> bool:
    return device.type == "cuda"


def _pinned(shape, dtype) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, pin_memory=True)


def _new_event():
    event = torch.cuda.Event()
    event.record()
    return event


class FinishWatch:
    """Tracks the first output length at which every row had finished."""

    def __init__(self, device: torch.device):
        self.device = device
        self.async_ = _overlaps(device)
        self.done_at = torch.zeros((), dtype=torch.long, device=device)   # 0 = not yet
        self._exact: int | None = None
        self._pending: deque = deque()        # (event, pinned copy of _done_at)

    def update(self, unfinished: torch.Tensor, length: int) -> bool:
        """Call after the token making the output `length` long; True when the loop may stop (every row is
        known to have finished, possibly some steps ago)."""
        if not self.async_:
            if not bool(unfinished.any()):
                self._exact = length
                return True
            return False
        # first length with no unfinished row, recorded once (where() keeps it when already set)
        newly = (~unfinished.any()) & (self.done_at == 0)
        self.done_at.copy_(torch.where(newly, torch.full_like(self.done_at, length), self.done_at))
        host = _pinned((), torch.long)
        host.copy_(self.done_at, non_blocking=True)
        self._pending.append((_new_event(), host))
        done = False
        while self._pending and self._pending[0][0].query():
            _, copied = self._pending.popleft()
            done = done or int(copied) > 0
        return done

    def final_length(self, length: int) -> int:
        """The exact output length: where every row had finished, else `length` (one sync on the device)."""
        if not self.async_:
            return self._exact if self._exact is not None else length
        done_at = int(self.done_at)
        return done_at if done_at > 0 else length

    def known_done_at(self) -> int:
        """The finishing length known on the host without waiting (0 while unknown)."""
        return 0 if self.async_ else (self._exact or 0)


class AsyncTokenStream:
    """Feeds a streamer each step's tokens [B] in order, from pinned async copies on a GPU. Each copy carries
    the FinishWatch's finishing length as it was at that step, so tokens past it (pads the loop made before the
    host learnt that every row had finished) are never delivered."""

    def __init__(self, streamer, device: torch.device):
        self.streamer = streamer
        self.async_ = _overlaps(device)
        self._pending: deque = deque()        # (length after the token, event, pinned [tokens..., done_at])

    def put(self, tokens: torch.Tensor, length: int, done_at: torch.Tensor | None = None) -> None:
        if not self.async_:
            self.streamer.put(tokens.cpu())
            return
        host = _pinned(tokens.shape[0] + 1, torch.long)
        host[:-1].copy_(tokens, non_blocking=True)
        if done_at is not None:
            host[-1:].copy_(done_at.reshape(1), non_blocking=True)
        self._pending.append((length, _new_event(), host))
        self._deliver(wait=False)

    def _deliver(self, wait: bool) -> None:
        while self._pending:
            length, event, host = self._pending[0]
            if not wait and not event.query():
                return
            event.synchronize()
            self._pending.popleft()
            done_at = int(host[-1])
            if done_at == 0 or length <= done_at:
                self.streamer.put(host[:-1].clone())

    def close(self) -> None:
        """Delivers what is still in flight (waiting for the copies), then ends the stream."""
        if self.async_:
            self._deliver(wait=True)
        self.streamer.end()
