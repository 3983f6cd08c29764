"""End-to-end generation benchmark: prefill and decode tokens/s of llama_fast (each backend that runs on the
device) against transformers (eager and sdpa attention) and installed peers (llama-cpp-python) on the same
model, at several batch sizes and dtypes. Run as `llama-fast bench` (or `python -m llama_fast bench`, `make
bench`); it lives in the package, not in benchmarks/, so that an installed wheel can run it. Results go to
benchmarks/results/ under the current directory unless --out-dir says otherwise.

Every configuration runs in its own subprocess (so its peak RSS is its own and no engine warms another's
caches), with the same thread count and the same prompt: random token ids from a fixed seed, so every
engine sees exactly prompt_len tokens. One generate() call per repeat, timed by a streamer: prefill is the
time until the first new token, decode the time for the remaining ones (eos disabled, so every row runs the
full length). Results: JSON and a PNG chart under benchmarks/results/, and a table of ratios against
transformers (sdpa, else eager) on stdout.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

DEFAULT_OUT = os.path.join("benchmarks", "results")

# torch and each engine's package (llama_fast's model, transformers, llama_cpp, matplotlib for the chart) are
# imported in the functions that use them: a worker process runs one engine and loads only that one.


# ---- one configuration, in a worker process --------------------------------------------------------------

class _Clock:
    """A streamer that only timestamps: put(prompt), then put(token) per step."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        self.times.append(time.perf_counter())


def _prompt(batch, prompt_len, vocab_size, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    # Skip the first 100 ids (special tokens live there in most vocabularies).
    return torch.randint(100, vocab_size, (batch, prompt_len), generator=g)


def _time_generate(generate, ids, new_tokens, repeats):
    """[(prefill_s, decode_s)] for `repeats` runs after one short warm-up."""
    generate(ids[:, :8], 2, _Clock())
    runs = []
    for _ in range(repeats):
        clock = _Clock()
        start = time.perf_counter()
        out = generate(ids, new_tokens, clock)
        end = time.perf_counter()
        if out.shape[1] != ids.shape[1] + new_tokens:
            raise RuntimeError(f"generated {out.shape[1] - ids.shape[1]} tokens, expected {new_tokens}")
        first_token = clock.times[1]
        runs.append((first_token - start, end - first_token))
    return runs


def _run_llama_fast(spec):
    import torch

    import llama_fast

    backend = None if spec["backend"] == "auto" else spec["backend"]
    model = llama_fast.LlamaForCausalLM.from_pretrained(spec["model"], dtype=spec["dtype"], device=spec["device"],
                                                       backend=backend).eval()
    ids = _prompt(spec["batch"], spec["prompt_len"], model.config.vocab_size).to(model.device)

    def generate(prompt, n, clock):
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                              eos_token_id=[], streamer=clock)

    return _time_generate(generate, ids, spec["new_tokens"], spec["repeats"])


def _run_transformers(spec):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        spec["model"], dtype=getattr(torch, spec["dtype"]), attn_implementation=spec["backend"],
    ).to(spec["device"]).eval()
    model.generation_config.eos_token_id = None
    ids = _prompt(spec["batch"], spec["prompt_len"], model.config.vocab_size).to(spec["device"])

    def generate(prompt, n, clock):
        with torch.inference_mode():
            return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, pad_token_id=0, streamer=clock)

    return _time_generate(generate, ids, spec["new_tokens"], spec["repeats"])


def _run_llama_cpp(spec):
    import llama_cpp

    if spec["batch"] != 1:
        raise NotImplementedError("llama-cpp-python's Python API runs one sequence at a time")
    llm = llama_cpp.Llama(model_path=spec["gguf"], n_ctx=spec["prompt_len"] + spec["new_tokens"] + 8,
                          n_threads=spec["threads"], n_threads_batch=spec["threads"], n_batch=spec["prompt_len"],
                          verbose=False)
    ids = _prompt(1, spec["prompt_len"], llm.n_vocab())[0].tolist()

    def run(prompt, n):
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        token = int(llm.scores[llm.n_tokens - 1].argmax())
        first = time.perf_counter()
        for _ in range(n - 1):
            llm.eval([token])
            token = int(llm.scores[llm.n_tokens - 1].argmax())
        return first - start, time.perf_counter() - first

    run(ids[:8], 2)
    return [run(ids, spec["new_tokens"]) for _ in range(spec["repeats"])]


ENGINES = {"llama_fast": _run_llama_fast, "transformers": _run_transformers, "llama_cpp": _run_llama_cpp}


def run_worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    result = dict(spec)
    try:
        runs = ENGINES[spec["engine"]](spec)
    except Exception as e:  # a configuration that cannot run is reported, not fatal to the whole benchmark
        result.update(status="error", error=f"{type(e).__name__}: {e}")
    else:
        batch = spec["batch"]
        prefill = [r[0] for r in runs]
        decode = [r[1] for r in runs]
        result.update(
            status="ok",
            prefill_s=prefill, decode_s=decode,
            prefill_tokens_per_s={"max": batch * spec["prompt_len"] / min(prefill),
                                  "median": batch * spec["prompt_len"] / statistics.median(prefill)},
            # the first new token belongs to prefill, the other new_tokens - 1 to decode
            decode_tokens_per_s={"max": batch * (spec["new_tokens"] - 1) / min(decode),
                                 "median": batch * (spec["new_tokens"] - 1) / statistics.median(decode)})
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


# ---- the driver ----------------------------------------------------------------------------------------

def _available_backends(device):
    import torch

    from llama_fast.ops._backend import BACKENDS, unavailable_reason

    return [b for b in BACKENDS if unavailable_reason(b, torch.device(device)) is None]


def _installed(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None


def plan(args) -> list:
    """The configurations to run: (engine, backend) x dtype x batch."""
    engines = []
    for name in args.engines:
        if name == "llama_fast":
            # "auto" = backend=None (the best implementation of each op); then each backend forced alone.
            engines += [("llama_fast", b) for b in (args.backends or ["auto"] + _available_backends(args.device))]
        elif name == "transformers":
            if _installed("transformers"):
                engines += [("transformers", attn) for attn in args.attn]
        elif name == "llama_cpp":
            if _installed("llama_cpp") and args.gguf:
                engines.append(("llama_cpp", "gguf"))
        else:
            raise ValueError(f"unknown engine {name!r}; choose from llama_fast, transformers, llama_cpp")
    specs = []
    for engine, backend in engines:
        for dtype in (args.dtypes if engine != "llama_cpp" else ["gguf"]):
            for batch in args.batch_sizes:
                if engine == "llama_cpp" and batch != 1:
                    continue
                specs.append(dict(engine=engine, backend=backend, dtype=dtype, batch=batch, model=args.model,
                                  gguf=args.gguf, device=args.device, prompt_len=args.prompt_len,
                                  new_tokens=args.new_tokens, repeats=args.repeats, threads=args.threads))
    return specs


def _run_in_subprocess(spec, timeout):
    import llama_fast

    # The worker imports the same llama_fast as this process (a checkout's, or the installed one).
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(llama_fast.__file__)))
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]),
               PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "llama_fast.tools.bench", "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(spec, status="error", error=f"timed out after {timeout} s")
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return dict(spec, status="error", error=f"worker exited {proc.returncode}: {tail[0]}")
    return json.loads(lines[-1])


def _label(r):
    return f"{r['engine']}:{r['backend']}"


def ratio_table(results) -> str:
    """Median tokens/s per configuration and the ratio against transformers (sdpa, else eager)."""
    rows = [f"{'engine':<22} {'dtype':<9} {'batch':>5} {'prefill tok/s':>14} {'x hf':>6} {'decode tok/s':>13} "
            f"{'x hf':>6} {'peak RSS MB':>12}"]
    for r in results:
        if r["status"] != "ok":
            rows.append(f"{_label(r):<22} {r['dtype']:<9} {r['batch']:>5}  {r['status']}: {r.get('error', '')[:70]}")
            continue
        base = None
        for attn in ("sdpa", "eager"):
            base = next((b for b in results if b["engine"] == "transformers" and b["backend"] == attn
                         and b["status"] == "ok" and b["batch"] == r["batch"]
                         and b["dtype"] == (r["dtype"] if r["dtype"] != "gguf" else "float32")), None)
            if base:
                break

        def ratio(key):
            return f"{r[key]['median'] / base[key]['median']:.2f}" if base else "-"

        rows.append(f"{_label(r):<22} {r['dtype']:<9} {r['batch']:>5} {r['prefill_tokens_per_s']['median']:>14.1f} "
                    f"{ratio('prefill_tokens_per_s'):>6} {r['decode_tokens_per_s']['median']:>13.1f} "
                    f"{ratio('decode_tokens_per_s'):>6} {r['peak_rss_mb']:>12.0f}")
    return "\n".join(rows)


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        return None


def build_parser():
    p = argparse.ArgumentParser(prog="llama-fast bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="HF directory (default: the embedded demo model, converted and cached)")
    p.add_argument("--gguf", help="GGUF for the peers (default: the demo model's GGUF when --model is not given)")
    p.add_argument("--engines", nargs="+", default=["llama_fast", "transformers", "llama_cpp"])
    p.add_argument("--backends", nargs="+", default=None,
                   help="llama_fast backends: auto (backend=None) and/or torch, cpu, triton, cuda (default: auto and "
                        "every backend available on the device)")
    p.add_argument("--attn", nargs="+", default=["eager", "sdpa"], help="transformers attention implementations")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="threads for every engine (default: all cores)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    p.add_argument("--out-dir", default=DEFAULT_OUT)
    p.add_argument("--name", default=None, help="file name stem of the results (default: generate-<timestamp>)")
    p.add_argument("--quick", action="store_true", help="a few tokens, batch 1, float32, one repeat (a smoke run)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    if args.quick:
        args.prompt_len, args.new_tokens, args.repeats = min(args.prompt_len, 16), min(args.new_tokens, 4), 1
        args.batch_sizes, args.dtypes = [1], ["float32"]
    if min(args.prompt_len, args.new_tokens, args.repeats, *args.batch_sizes) < 1 or args.new_tokens < 2:
        raise ValueError("prompt-len, repeats and batch sizes must be >= 1 and new-tokens >= 2")
    args.threads = args.threads or len(os.sched_getaffinity(0))
    if args.model is None:
        from llama_fast.tools.demo import demo_model_dir, find_demo_gguf

        args.model = demo_model_dir(native=False)   # dense: what transformers reads too
        args.gguf = args.gguf or find_demo_gguf()
    specs = plan(args)
    print(f"{len(specs)} configurations, {args.threads} threads, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, {args.repeats} repeats", file=sys.stderr)
    import torch

    report = {
        "benchmark": "generate",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "threads": args.threads, "torch": torch.__version__, "commit": _git_commit(),
                    "load_average": os.getloadavg()},
        "settings": {k: getattr(args, k) for k in ("model", "gguf", "prompt_len", "new_tokens", "repeats",
                                                   "batch_sizes", "dtypes", "device")},
        "results": [],
    }
    os.makedirs(args.out_dir, exist_ok=True)
    stem = args.name or "generate-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = os.path.join(args.out_dir, stem + ".json")
    results = report["results"]
    for i, spec in enumerate(specs, 1):
        print(f"[{i}/{len(specs)}] {spec['engine']}:{spec['backend']} {spec['dtype']} batch {spec['batch']}",
              file=sys.stderr, flush=True)
        results.append(_run_in_subprocess(spec, args.timeout))
        with open(json_path, "w") as f:        # after every configuration: an interrupted run keeps its data
            json.dump(report, f, indent=2)
    print(ratio_table(results))
    print(f"wrote {json_path}", file=sys.stderr)
    if not args.no_plot:
        from llama_fast.tools.bench_plot import plot_generate

        png = plot_generate(report, os.path.join(args.out_dir, stem + ".png"))
        print(f"wrote {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
