"""The hand-over of the scheduler thread's events to the event loop (app._LoopRelay): every event arrives, in
order per request, and a burst posted before the loop runs costs one wake-up of the loop."""
from __future__ import annotations

import asyncio
import threading

import pytest

pytest.importorskip("fastapi")

from llama_fast.serve.app import _LoopRelay  # noqa: E402


def test_a_burst_of_events_is_one_wake_up_and_keeps_each_queue_in_order():
    loop = asyncio.new_event_loop()
    try:
        wake_ups = []
        schedule = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *args: (wake_ups.append(args), schedule(*args))[1]
        relay = _LoopRelay(loop)
        queues = [asyncio.Queue() for _ in range(3)]

        def scheduler_step():             # the scheduler thread: one step's events for three requests, twice
            for n in range(2 * len(queues)):
                relay.post(queues[n % len(queues)], n)

        thread = threading.Thread(target=scheduler_step)
        thread.start()
        thread.join()
        assert len(wake_ups) == 1                          # the loop did not run meanwhile: one hand-over
        loop.run_until_complete(asyncio.sleep(0))
        assert [[q.get_nowait() for _ in range(q.qsize())] for q in queues] == [[0, 3], [1, 4], [2, 5]]
        relay.post(queues[0], "next")                      # the hand-over ran: a new event wakes the loop again
        assert len(wake_ups) == 2
        loop.run_until_complete(asyncio.sleep(0))
        assert queues[0].get_nowait() == "next"
    finally:
        loop.close()


def test_posting_to_a_closed_loop_raises_every_time():
    """The scheduler's _send swallows a sink's error; the relay must not keep events for a loop that is gone
    (they would pile up, and later posts would wait on a hand-over that never runs)."""
    loop = asyncio.new_event_loop()
    relay = _LoopRelay(loop)
    queue = asyncio.Queue()
    loop.close()
    for _ in range(2):
        with pytest.raises(RuntimeError):
            relay.post(queue, "lost")
    assert relay._pending == []
