"""What the tensor-parallel benchmarks' rank processes share (bench_tp_cpu.py, bench_tp_gpu.py)."""
from __future__ import annotations

import json
import os
import time


class TokenStamps:
    """A generate() streamer (put / end) that notes when each token arrives; `sync` (e.g. torch.cuda.synchronize)
    runs first, so that a GPU's queued work is counted where it belongs."""

    def __init__(self, sync=None):
        self.times, self.sync = [], sync

    def put(self, value):
        if self.sync is not None:
            self.sync()
        self.times.append(time.perf_counter())

    def end(self):
        pass

    def decode_steps(self) -> list[float]:
        """Seconds of each decode step: the first put is the prompt, the second ends the prefill."""
        return [b - a for a, b in zip(self.times[1:], self.times[2:])]


def finish_rank(result: dict, path: str) -> None:
    """Rank 0 writes the variant's result; every rank leaves its process group."""
    import torch.distributed as dist

    if int(os.environ.get("RANK", "0")) == 0:
        with open(path, "w") as f:
            json.dump(result, f)
    if dist.is_initialized():
        dist.destroy_process_group()
