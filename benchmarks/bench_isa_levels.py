"""CPU decode of the demo model at several instruction-set levels of the CPU kernels, each run in its own
process (LLAMA_FAST_CPU_ISA lowers the level; bench_decode_cpu.py measures), alternating levels so that every
level sees the same machine state; records the CPU model, family and the load average with every run.

    OMP_NUM_THREADS=2 python benchmarks/bench_isa_levels.py --isas avx512,avx512_vnni --only int4 --rounds 2

Writes benchmarks/results/<--name>.json. The machine may be shared: compare levels within one file.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def cpu_info() -> dict:
    """Model name, family, model number and flags of interest, from /proc/cpuinfo (Linux)."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key in ("model name", "cpu family", "model") and key not in info:
                    info[key] = value
                if key == "flags" and "flags" not in info:
                    have = set(value.split())
                    info["flags"] = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
                                                 "amx_tile", "f16c") if f in have]
    except OSError:
        pass
    return info


def run_level(isa: str, only: str, tokens: int, repeat: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run.json")
        # this tree's llama_fast, not an installed one (the script's directory, not the root, is on sys.path)
        root = os.path.dirname(HERE)
        env = dict(os.environ, LLAMA_FAST_CPU_ISA=isa,
                   PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p))
        cmd = [sys.executable, os.path.join(HERE, "bench_decode_cpu.py"), "--only", only, "--tokens", str(tokens),
               "--repeat", str(repeat), "--prefill", "32", "--batch", "1", "--skip-llama-cpp", "--out", out]
        load_before = os.getloadavg()
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            result = json.load(f)
    result["load_average_before"] = load_before
    result["load_average_after"] = os.getloadavg()
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--isas", default="avx512,avx512_vnni", help="comma list of LLAMA_FAST_CPU_ISA values")
    p.add_argument("--only", default="int4", help="engines (bench_decode_cpu.py --only)")
    p.add_argument("--rounds", type=int, default=2, help="alternations of all levels")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3, help="measurements per process")
    p.add_argument("--name", default="decode_cpu_isa_levels")
    p.add_argument("--note", default="", help="free text stored with the results (e.g. the machine's load)")
    args = p.parse_args()
    isas = [s.strip() for s in args.isas.split(",") if s.strip()]
    runs = {isa: [] for isa in isas}
    for r in range(args.rounds):
        for isa in isas:
            runs[isa].append(run_level(isa, args.only, args.tokens, args.repeat))
            for name, e in runs[isa][-1]["engines"].items():
                print(f"round {r} {isa:12s} {name:36s} median {e['decode_median']:6.1f} tok/s "
                      f"({100 * e.get('bandwidth_fraction', 0):.0f}% of the read bandwidth)")
    summary = {}
    for isa, rs in runs.items():
        for name in rs[0]["engines"]:
            medians = [run["engines"][name]["decode_median"] for run in rs]
            fractions = [run["engines"][name].get("bandwidth_fraction", 0.0) for run in rs]
            summary.setdefault(name, {})[isa] = {
                "decode_median_per_run": medians, "best_decode_median": max(medians),
                "bandwidth_fraction_per_run": fractions,
                "read_bandwidth_GBps_per_run": [statistics.median(run["read_bandwidth_GBps"]) for run in rs]}
    results = {"what": __doc__.splitlines()[0], "command": " ".join(sys.argv), "cpu": cpu_info(),
               "threads": os.environ.get("OMP_NUM_THREADS"), "note": args.note, "summary": summary, "runs": runs}
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, args.name + ".json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(summary, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
