"""The shared harness of the op-level AMX benchmarks (bench_amx_quant.py, bench_amx_kquant.py): each path ("old",
"amx") runs in its own worker process with its environment switches, the rounds alternate the two processes, and
the best time per case is kept; then G multiply-adds/s per row count, printed and written with the CPU record."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def median_times(calls, make_x, rows, dtypes, repeat: int, clock=time.perf_counter) -> dict[str, float]:
    """{"<dtype>/<m>": median seconds of one call} over `repeat` timed calls after 2 warm-up calls (scratch
    buffers), each call taking the next weight of `calls` (cycled, so that weights come from memory)."""
    import torch
    out, turn = {}, 0
    for dtype in dtypes:
        for m in rows:
            x = make_x(m).to(getattr(torch, dtype))
            samples = []
            for i in range(repeat + 2):
                f = calls[turn % len(calls)]
                turn += 1
                t0 = clock()
                f(x)
                if i >= 2:
                    samples.append(clock() - t0)
            out[f"{dtype}/{m}"] = statistics.median(samples)
    return out


def best_of_rounds(script: str, paths: dict[str, dict[str, str]], args, extra_args: list[str]) -> dict:
    """{path: {case: best seconds}} over args.rounds rounds of one worker process per path. Each path's process gets
    its own switches and not the other path's (the "amx" path drops LLAMA_FAST_AMX, the "old" one the row override)."""
    best: dict[str, dict[str, float]] = {path: {} for path in paths}
    for _ in range(args.rounds):
        for path, env_add in paths.items():
            env = dict(os.environ, **env_add,
                       PYTHONPATH=os.pathsep.join(x for x in (ROOT, os.environ.get("PYTHONPATH")) if x))
            for other, other_env in paths.items():
                if other != path:
                    for name in other_env:
                        env.pop(name, None)
            cmd = [sys.executable, script, "--worker", *extra_args]
            res = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
            for key, t in res.items():
                best[path][key] = min(best[path].get(key, float("inf")), t)
    return best


def gmacs_table(best: dict, rows, k_n_of, title: str) -> dict:
    """{case: {m: {"old": G MAC/s, "amx": G MAC/s}}} from best_of_rounds' times, printed as a table; k_n_of(case)
    gives the case's (K, N)."""
    table = {}
    print(f"{title:28} " + " ".join(f"{m:>11}" for m in rows) + "   (G MAC/s old -> amx)")
    for key in sorted({k.rsplit("/", 1)[0] for k in best["old"]}):
        k, n = k_n_of(key)
        row = {}
        for m in rows:
            old, amx = best["old"][f"{key}/{m}"], best["amx"][f"{key}/{m}"]
            row[m] = {"old": m * n * k / old / 1e9, "amx": m * n * k / amx / 1e9}
        table[key] = row
        print(f"{key:28} " + " ".join(f"{row[m]['old']:5.0f}>{row[m]['amx']:<5.0f}" for m in rows))
    return table


def run(script: str, doc: str, worker, paths: dict[str, dict[str, str]], rows, k_n_of, title: str, condition: str,
        out_name: str, default_cycle_mib: float) -> None:
    """A benchmark's command line: in a worker process, print worker(args)'s timings as JSON; else alternate the
    paths' workers (best_of_rounds), print the table and write results/<out_name>_<threads>thread_intel_amx.json.
    `condition` is formatted with the arguments (cycle_mib, repeat, rounds)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cycle-mib", type=float, default=default_cycle_mib,
                   help="weight bytes cycled through (more than L3)")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    from _machine import cpu_record, write_result

    load_before = open("/proc/loadavg").read().split()[:3]
    best = best_of_rounds(script, paths, args, ["--cycle-mib", str(args.cycle_mib), "--repeat", str(args.repeat),
                                                "--threads", str(args.threads)])
    result = {"machine": cpu_record(),
              "load_average_before_after": [load_before, open("/proc/loadavg").read().split()[:3]],
              "threads": args.threads, "rows": list(rows), "condition": condition.format(**vars(args)),
              "gmacs": gmacs_table(best, rows, k_n_of, title)}
    here = os.path.dirname(os.path.abspath(__file__))
    write_result(args.out or os.path.join(here, "results", f"{out_name}_{args.threads}thread_intel_amx.json"), result)
