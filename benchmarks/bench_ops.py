"""Micro-benchmarks of every llama_fast op on every backend that runs here, at the demo model's shapes
(SmolLM2-135M: hidden 576, 9/3 heads of 64, intermediate 1536, vocab 49152): decode (1 token, a 512-token
cache) and prefill (512 tokens). Reports GB/s or GFLOP/s and the fraction of the roofline: on the CPU the
memory bandwidth and GEMM peak measured in this same run, on a GPU the peaks of benchmarks/_machine.py.

    OMP_NUM_THREADS=2 python benchmarks/bench_ops.py [--out benchmarks/results/ops_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llama_fast import ops, quant  # noqa: E402
from llama_fast.ops import _backend  # noqa: E402

from _machine import cpu_gemm_peak, cpu_read_bandwidth, gpu_peaks, timed  # noqa: E402

H, HQ, HKV, D, I, V, CTX, PREFILL = 576, 9, 3, 64, 1536, 49152, 512, 512


def cases(dtype, device):
    """(op name, label, fn(backend) -> callable, bytes moved, flops)."""
    es = torch.finfo(dtype).bits // 8
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype).to(device)  # noqa: E731
    out = []
    for t in (1, PREFILL):
        x, res, w = r(t, H), r(t, H), r(H)
        out.append(("rms_norm", f"T={t}", lambda b, x=x, w=w: (lambda: ops.rms_norm(x, w, 1e-5, backend=b)),
                    2 * t * H * es, 0))
        out.append(("fused_add_rms_norm", f"T={t}",
                    lambda b, x=x, res=res, w=w: (lambda: ops.fused_add_rms_norm(x, res, w, 1e-5, backend=b)),
                    4 * t * H * es, 0))
        gu = r(t, 2 * I)
        out.append(("silu_and_mul", f"T={t}", lambda b, gu=gu: (lambda: ops.silu_and_mul(gu, backend=b)),
                    3 * t * I * es, 0))
        q, k = r(1, t, HQ, D), r(1, t, HKV, D)
        pos = torch.arange(t, device=device)[None]
        ang = torch.arange(CTX + PREFILL, device=device)[:, None].float() * torch.rand(D // 2, device=device)
        cos, sin = ang.cos(), ang.sin()
        out.append(("rotary", f"T={t}", lambda b, q=q, k=k, pos=pos, cos=cos, sin=sin:
                    (lambda: ops.rotary(q, k, pos, cos, sin, backend=b)), 2 * t * (HQ + HKV) * D * es, 0))
    # attention: decode against a CTX cache, and causal prefill
    q1, kc, vc = r(1, 1, HQ, D), r(1, CTX, HKV, D), r(1, CTX, HKV, D)
    lens = torch.tensor([CTX], dtype=torch.int32, device=device)
    out.append(("attention", f"decode ctx={CTX}", lambda b: (lambda: ops.attention(q1, kc, vc, True, lens, backend=b)),
                2 * CTX * HKV * D * es, 4 * CTX * HQ * D))
    qp, kp, vp = r(1, PREFILL, HQ, D), r(1, PREFILL, HKV, D), r(1, PREFILL, HKV, D)
    out.append(("attention", f"prefill T={PREFILL}", lambda b: (lambda: ops.attention(qp, kp, vp, True, backend=b)),
                4 * PREFILL * HQ * D * es, 2 * PREFILL * PREFILL * HQ * D))
    # linears: the fused projections of a layer and the tied lm_head, decode (GEMV) and prefill (GEMM)
    for name, n, k in (("qkv_proj", (HQ + 2 * HKV) * D, H), ("gate_up_proj", 2 * I, H), ("down_proj", H, I),
                       ("lm_head", V, H)):
        w = r(n, k)
        qw = quant.quantize(w.float().cpu(), bits=4, group_size=32, scale_dtype=torch.float16).to(device)
        q8 = quant.quantize(w.float().cpu(), bits=8, group_size=32, scale_dtype=torch.float16).to(device)
        q4_bytes = qw.qweight.numel() + 2 * qw.scale.numel() * 2
        q8_bytes = q8.qweight.numel() + q8.scale.numel() * 2
        for t in ((1,) if name == "lm_head" else (1, PREFILL)):
            x = r(t, k)
            out.append(("linear", f"{name} {n}x{k} T={t}", lambda b, x=x, w=w: (lambda: ops.linear(x, w, backend=b)),
                        n * k * es + t * (n + k) * es, 2 * t * n * k))
            out.append(("quant_linear", f"int4 g32 {name} T={t}",
                        lambda b, x=x, qw=qw: (lambda: ops.quant_linear(x, qw, backend=b)), q4_bytes, 2 * t * n * k))
            if t == 1:
                out.append(("quant_linear", f"int8 g32 {name} T={t}",
                            lambda b, x=x, q8=q8: (lambda: ops.quant_linear(x, q8, backend=b)), q8_bytes, 2 * n * k))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    if device.type == "cpu":
        bw, peak = cpu_read_bandwidth(), cpu_gemm_peak()
        machine = {"kind": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                   "read_GBps": bw, "gemm_fp32_GFLOPs": peak, "gemm_bf16_GFLOPs": cpu_gemm_peak(torch.bfloat16)}
    else:
        name, bw, peak = gpu_peaks() or (torch.cuda.get_device_name(), float("nan"), float("nan"))
        machine = {"kind": name, "peak_GBps": bw, "peak_bf16_GFLOPs": peak}
    print(json.dumps(machine))
    backends = [b for b in ("torch", "cpu", "triton", "cuda") if _backend.unavailable_reason(b, device) is None]
    rows = []
    for dtype in [getattr(torch, d) for d in args.dtypes.split(",")]:
        peak_c = machine.get("gemm_bf16_GFLOPs" if dtype == torch.bfloat16 else "gemm_fp32_GFLOPs", peak)
        for op, label, make, nbytes, flops in cases(dtype, device):
            for b in backends:
                if not hasattr(_backend._module(b), op):
                    continue
                try:
                    times = sorted(timed(make(b), repeat=args.repeat, sync=sync))
                except Exception as e:  # noqa: BLE001  (an op a backend lacks for this dtype)
                    print(f"{op:18s} {label:28s} {b:6s} skipped: {e}")
                    continue
                t = times[len(times) // 2]
                gbps, gflops = nbytes / t / 1e9, flops / t / 1e9
                # roofline: min(compute peak, arithmetic intensity x bandwidth)
                roof = min(peak_c, flops / nbytes * bw) if flops else None
                frac = gflops / roof if flops else gbps / bw
                rows.append({"op": op, "case": label, "dtype": str(dtype).split(".")[-1], "backend": b,
                             "us": t * 1e6, "GBps": gbps, "GFLOPs": gflops, "roofline_fraction": frac})
                print(f"{op:18s} {label:28s} {rows[-1]['dtype']:8s} {b:6s} {t * 1e6:10.1f} us  {gbps:7.1f} GB/s  "
                      f"{gflops:8.1f} GFLOP/s  {100 * frac:5.1f}% of roofline")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"ops_{device.type}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"machine": machine, "results": rows}, f, indent=1)
    _plot(rows, out[:-5] + ".png")
    print("wrote", out)


def _plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels = sorted({(r["op"], r["case"], r["dtype"]) for r in rows})
    backends = sorted({r["backend"] for r in rows})
    fig, ax = plt.subplots(figsize=(10, max(4, 0.22 * len(labels))))
    hgt = 0.8 / len(backends)
    for i, b in enumerate(backends):
        vals = [next((r["roofline_fraction"] for r in rows if (r["op"], r["case"], r["dtype"]) == lab
                      and r["backend"] == b), 0) for lab in labels]
        ax.barh([j + i * hgt for j in range(len(labels))], [100 * v for v in vals], height=hgt, label=b)
    ax.set_yticks([j + 0.4 for j in range(len(labels))])
    ax.set_yticklabels([f"{o} {c} {d}" for o, c, d in labels], fontsize=6)
    ax.set_xlabel("% of roofline (measured bandwidth / GEMM peak)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
