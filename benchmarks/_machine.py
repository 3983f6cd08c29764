"""What the hardware can do, for the benchmarks' roofline fractions: the CPU's memory bandwidth and GEMM peak
measured in the same run (a shared 2-core machine varies from minute to minute), GPU peaks from a table."""
from __future__ import annotations

import os
import platform
import time

import torch

# Dense peaks of the GPUs we compare on: (HBM GB/s, bf16 TFLOP/s).
GPU_PEAKS = {"A100": (2039.0, 312.0), "H100": (3350.0, 989.0), "H200": (4800.0, 989.0)}


def timed(fn, repeat: int = 20, warmup: int = 3, sync=None) -> list[float]:
    """Wall times (seconds) of `repeat` calls after `warmup`."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return times


def _huge_page_floats(n: int) -> torch.Tensor:
    """n fp32 ones on transparent huge pages where the OS offers them, as llama_fast keeps a loaded model's weights
    (llama_fast/weight_arena.py): on 4 KiB pages a streaming read ran well below what the kernels then reach."""
    from llama_fast import weight_arena
    huge = weight_arena.HUGE_PAGE
    raw = torch.empty(n * 4 + 2 * huge, dtype=torch.uint8)
    start = -raw.data_ptr() % huge
    if weight_arena.huge_pages_available():
        weight_arena.advise_huge_pages(raw.data_ptr() + start, (n * 4 + huge - 1) // huge * huge)
    return raw[start:start + n * 4].view(torch.float32).fill_(1.0)


def cpu_read_bandwidth(mib: int = 512, repeat: int = 10) -> float:
    """GB/s of streaming reads over a buffer far larger than the caches (a sum over fp32), the roofline of
    GEMV-shaped kernels. The median of `repeat` runs."""
    x = _huge_page_floats(mib * 2**20 // 4)
    times = sorted(timed(lambda: x.sum(), repeat=repeat, warmup=2))
    return x.numel() * 4 / times[len(times) // 2] / 1e9


def cpu_cache_read_bandwidth(mib: int, repeat: int = 5) -> float:
    """cpu_read_bandwidth on one thread, over a buffer of `mib` read again and again: where it falls to the
    1 GiB value, the caches no longer hold that much (whatever L3 size the CPU reports). One thread, because a
    multi-threaded sum of a small buffer measures the threads' barrier on a busy machine, not the memory."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cpu_read_bandwidth(mib=mib, repeat=repeat)
    finally:
        torch.set_num_threads(threads)


def cpu_copy_bandwidth(mib: int = 256, repeat: int = 10) -> float:
    """GB/s (read + write bytes) of a large copy."""
    a, b = torch.ones(mib * 2**20 // 4), torch.empty(mib * 2**20 // 4)
    times = sorted(timed(lambda: b.copy_(a), repeat=repeat, warmup=2))
    return 2 * a.numel() * 4 / times[len(times) // 2] / 1e9


def cpu_gemm_peak(dtype=torch.float32, n: int = 1536, repeat: int = 5) -> float:
    """GFLOP/s of torch's (MKL / oneDNN) square GEMM: the achievable compute peak."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    times = sorted(timed(lambda: a @ b, repeat=repeat, warmup=1))
    return 2 * n ** 3 / times[len(times) // 2] / 1e9


def gpu_peaks() -> tuple[str, float, float] | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, (bw, tflops) in GPU_PEAKS.items():
        if key in name:
            return name, bw, tflops * 1e3
    return None


def cpu_model() -> str:
    """The CPU's model name, family and model number (/proc/cpuinfo), for the record next to each result."""
    try:
        with open("/proc/cpuinfo") as f:
            first = f.read().split("\n\n")[0]
    except OSError:
        return platform.processor() or platform.machine()
    info = dict((k.strip(), v.strip()) for k, v in (line.split(":", 1) for line in first.splitlines() if ":" in line))
    return " ".join(f"{k}={info[k]}" for k in ("model name", "cpu family", "model") if k in info)


def write_result(path: str, result: dict) -> None:
    """Writes a benchmark's result as indented JSON (making its folder) and says where."""
    import json
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", path)


def cpu_record() -> dict:
    """What each CPU benchmark result records of the machine: the CPU model, family and model number, the
    instruction set and the run-time tuning (cache sizes, prefetch distance) the CPU kernels chose here."""
    record = {"cpu": cpu_model(), "logical_cpus": os.cpu_count()}
    try:
        from llama_fast import _native
        from llama_fast.ops import cpu
        if _native.extension() is not None:
            record["isa"] = cpu.set_isa("")
            record["kernel_tuning"] = cpu.tuning()
    except (ImportError, AttributeError):    # no extension, or one older than the tuning op
        pass
    return record
