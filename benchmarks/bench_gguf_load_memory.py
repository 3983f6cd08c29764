"""Peak resident memory of a native GGUF load, relative to the bytes of the tensors the model keeps.

Runs the load in a fresh process: imports and a warm-up load of a tiny GGUF of the same tensor types first
(so torch's code pages are resident: they are not tensor memory), then the kernel's peak-RSS counter is reset
(/proc/self/clear_refs "5"), then LlamaForCausalLM.from_pretrained(gguf). Reported: the peak RSS above the
pre-load RSS, the bytes of the model's tensors (parameters and buffers, each storage once), their ratio, and
the wall time. Target (issue 17): ratio <= 1.3. Also the resident memory the loaded model keeps (RSS after the
load and a garbage collection, above the pre-load RSS) against the file's size. Target (issue 14): <= 1.15x.
Default model: the demo GGUF (SmolLM2-135M Q4_1).

    python benchmarks/bench_gguf_load_memory.py [--gguf FILE] [--out benchmarks/results/gguf_load_memory.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

_CHILD = r"""
import gc, json, sys, time
import torch
import llama_fast
from llama_fast import LlamaForCausalLM

# Warm-up: load and run a tiny GGUF of the same tensor types twice, so that the pages of torch's code the
# load touches are resident before the measurement (they are not tensor memory).
sys.path.insert(0, sys.argv[2])
import gguf_util as G
config = G.tiny_config(tie_word_embeddings=True)
weights = G.random_state_dict(config)
types = {k: G.Q.Q4_1 for k in weights if "proj" in k}
types["model.embed_tokens.weight"] = G.Q.Q8_0
G.write_llama_gguf(sys.argv[3], config, weights, types)
for _ in range(2):
    warm = LlamaForCausalLM.from_pretrained(sys.argv[3])
    warm(torch.tensor([[1, 2]]))
    del warm
gc.collect()

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")                       # resets VmHWM (peak RSS) to the current RSS
before = status("VmRSS")
t0 = time.perf_counter()
model = LlamaForCausalLM.from_pretrained(sys.argv[1])
seconds = time.perf_counter() - t0
peak = status("VmHWM")
gc.collect()
after = status("VmRSS")
storages = {}
for t in list(model.parameters()) + list(model.buffers()):
    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
kept = sum(storages.values())
print(json.dumps({"rss_before": before, "peak_rss": peak, "peak_over_before": peak - before,
                  "tensor_bytes_kept": kept, "ratio": (peak - before) / kept, "load_seconds": seconds,
                  "resident_over_before": after - before}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", help="the GGUF file (default: the demo model's)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tree", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   help="the source tree whose llama_fast is measured (default: this one)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "gguf_load_memory.json"))
    args = p.parse_args()
    if args.gguf is None:
        from llama_fast.tools.demo import find_demo_gguf
        args.gguf = find_demo_gguf()
    runs = []
    tests = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run([sys.executable, "-c", _CHILD, args.gguf, tests, os.path.join(tmp, "warm.gguf")],
                                 check=True, capture_output=True, text=True, cwd=args.tree)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = min(runs, key=lambda r: r["ratio"])
    file_bytes = os.path.getsize(args.gguf)
    for r in runs:
        r["resident_over_file"] = r["resident_over_before"] / file_bytes
        r["peak_over_file"] = r["peak_over_before"] / file_bytes
    result = {"gguf": os.path.basename(args.gguf), "tree": args.tree, "file_bytes": file_bytes,
              "runs": runs, "resident_over_file_min": min(r["resident_over_file"] for r in runs),
              "ratio_min": best["ratio"], "ratio_max": max(r["ratio"] for r in runs),
              "note": "peak RSS above the pre-load RSS / bytes of the tensors the model keeps; "
                      "taken on a shared 2-core machine (other jobs running), times are indicative only"}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    for r in runs:
        print(f"peak +{r['peak_over_before'] / 2**20:.0f} MiB over {r['tensor_bytes_kept'] / 2**20:.0f} MiB kept "
              f"= {r['ratio']:.2f}x, {r['load_seconds']:.2f} s; resident +{r['resident_over_before'] / 2**20:.0f} "
              f"MiB = {r['resident_over_file']:.2f}x the file")


if __name__ == "__main__":
    main()
