"""Per-op timings of the CUDA kernels against the Triton kernels and the PyTorch reference, on a GPU.

    python benchmarks/bench_cuda_ops.py [--out benchmarks/results/cuda_ops]   -> .json and .png

For each case: median time (CUDA events), the bytes the op must move and the achieved GB/s (and TFLOP/s for
the compute-bound prefill cases). Backends that cannot run an op are recorded with the reason. This is what
decides where "cuda" should stay the default over "triton" (llama_fast/ops/_backend.py)."""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from llama_fast import ops, quant


def bench(fn, warmup=5, iters=50) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def cases(dtype):
    dev = "cuda"
    el = torch.tensor([], dtype=dtype).element_size()
    for rows in (1, 2048):
        x = torch.randn(rows, 4096, device=dev, dtype=dtype)
        w = torch.randn(4096, device=dev, dtype=dtype)
        yield f"rms_norm {rows}x4096", "rms_norm", (x, w, 1e-6), 2 * x.numel() * el, 0
        gu = torch.randn(rows, 2 * 11008, device=dev, dtype=dtype)
        yield f"silu_and_mul {rows}x11008", "silu_and_mul", (gu,), 1.5 * gu.numel() * el, 0
    for b, tk in ((1, 4096), (8, 4096), (1, 32768)):
        q = torch.randn(b, 1, 32, 128, device=dev, dtype=dtype)
        k = torch.randn(b, tk, 8, 128, device=dev, dtype=dtype)
        yield (f"attention decode b{b} tk{tk} gqa4", "attention", (q, k, k.clone(), True, None, None),
               2 * k.numel() * el, 0)
    t = 2048
    q = torch.randn(1, t, 32, 128, device=dev, dtype=dtype)
    k = torch.randn(1, t, 8, 128, device=dev, dtype=dtype)
    yield (f"attention prefill t{t} gqa4", "attention", (q, k, k.clone(), True, None, None), 0,
           2 * 2 * t * t * 32 * 128 / 2)
    for bits in (4, 8):
        for m in (1, 512):
            qw = quant.quantize(torch.randn(11008, 4096, device=dev) * 0.02, bits=bits, group_size=128,
                                scale_dtype=dtype)
            x = torch.randn(m, 4096, device=dev, dtype=dtype)
            wbytes = qw.qweight.numel() + 2 * qw.scale.numel() * qw.scale.element_size()
            yield (f"quant_linear int{bits} m{m} 11008x4096", "quant_linear", (x, qw), wbytes + x.numel() * el,
                   2 * m * 11008 * 4096)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/cuda_ops")
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_cuda_ops: SKIP - no CUDA GPU here")
        return 0
    dtype = getattr(torch, args.dtype)
    results = []
    for name, op, op_args, nbytes, flops in cases(dtype):
        row = {"case": name, "op": op, "dtype": args.dtype, "bytes": nbytes, "flops": flops, "backends": {}}
        for backend in ("cuda", "triton", "torch"):
            reason = ops.unavailable_reason(backend, torch.device("cuda"))
            if reason is not None:
                row["backends"][backend] = {"unavailable": reason}
                continue
            fn = getattr(ops, op)
            try:
                ms = bench(lambda: fn(*op_args, backend=backend))
            except Exception as e:  # noqa: BLE001 - recorded, not fatal: one backend may lack an op or a shape
                row["backends"][backend] = {"error": f"{type(e).__name__}: {e}"}
                continue
            entry = {"ms": ms}
            if nbytes:
                entry["GB/s"] = nbytes / ms / 1e6
            if flops:
                entry["TFLOP/s"] = flops / ms / 1e9
            row["backends"][backend] = entry
        results.append(row)
        print(name, {b: round(v.get("ms", float("nan")), 4) for b, v in row["backends"].items()})
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(10, 0.45 * len(results) + 1.5))
        names = [r["case"] for r in results]
        for i, backend in enumerate(("cuda", "triton", "torch")):
            speed = [(r["backends"]["torch"].get("ms", float("nan")) / r["backends"][backend]["ms"])
                     if "ms" in r["backends"].get(backend, {}) else 0.0 for r in results]
            ax.barh([j + 0.27 * i for j in range(len(results))], speed, height=0.27, label=backend)
        ax.set_yticks([j + 0.27 for j in range(len(results))], names)
        ax.set_xlabel("speed-up over the PyTorch reference")
        ax.set_title(f"llama_fast ops, {args.dtype}, {meta['device']}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out + ".png", dpi=120)
    except ImportError:
        pass
    print(f"wrote {args.out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
