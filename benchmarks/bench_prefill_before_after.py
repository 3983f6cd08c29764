"""llama_fast prefill of one GGUF file, two source trees alternately (e.g. main before a change and a branch after
it), each measurement a fresh process of bench_prefill_separate.py's worker (warm-up at full length, then
`--repeats` prefills, best kept). Rounds alternate which tree goes first, so that a load that drifts over the run
(a shared machine) falls on both. Wall clock with --threads 2, the calling thread's CPU time with --threads 1.

    python benchmarks/bench_prefill_before_after.py --before /work/main --after /work/wt/x --threads 2
        [--format F16] [--contexts 128,512,2048] [--rounds 3] [--repeats 3] [--out benchmarks/results/x.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_decode_separate import cpu_description, model_files  # noqa: E402

from _machine import write_result  # noqa: E402


def run_tree(tree: str, spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]),
               PYTHONPATH=os.pathsep.join([tree] + os.environ.get("PYTHONPATH", "").split(os.pathsep)[1:]))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "bench_prefill_separate.py"), "--worker",
                           json.dumps(spec)], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True)
    p.add_argument("--after", required=True)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--format", default="F16")
    p.add_argument("--contexts", default="128,512,2048")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    clock = "thread_cpu_s" if args.threads == 1 else "wall_s"
    path = model_files(args.model, [args.format])[args.format]
    trees = {"before": args.before, "after": args.after}
    results = {"cpu": cpu_description(), "threads": args.threads, "clock": clock, "trees": trees,
               "model": args.model, "format": args.format, "rounds": args.rounds, "repeats": args.repeats,
               "load_average": [], "cases": []}
    runs = {}
    for r in range(args.rounds):
        results["load_average"].append(os.getloadavg()[0])
        for i, context in enumerate(int(c) for c in args.contexts.split(",")):
            order = ["before", "after"] if (r + i) % 2 == 0 else ["after", "before"]
            for name in order:
                spec = {"engine": "llama_fast", "format": args.format, "path": path, "context": context,
                        "threads": args.threads, "repeats": args.repeats}
                out = run_tree(trees[name], spec)
                runs.setdefault((context, name), []).append(out)
                line = out.get("error") or f"{context / min(out[clock]):8.1f} tok/s ({clock})"
                print(f"round {r} ctx {context:5d} {name:6s} {line}", flush=True)
    for context in (int(c) for c in args.contexts.split(",")):
        entry = {"context": context}
        for name in trees:
            ok = [o for o in runs.get((context, name), []) if clock in o]
            if ok:
                entry[name] = {"prefill_tok_s_best": context / min(min(o[clock]) for o in ok),
                               "prefill_tok_s_per_round": [context / min(o[clock]) for o in ok]}
        if "before" in entry and "after" in entry:
            entry["after_over_before"] = entry["after"]["prefill_tok_s_best"] / entry["before"]["prefill_tok_s_best"]
        results["cases"].append(entry)
        print(json.dumps(entry))
    results["load_average"].append(os.getloadavg()[0])
    write_result(args.out, results)


if __name__ == "__main__":
    main()
