"""The server under concurrent clients: output tokens/s, time to first token and inter-token latency at 1, 4
and 16 concurrent clients, against the same requests sent one by one.

    python benchmarks/bench_serve.py                      # the embedded demo model (int4), CPU
    python benchmarks/bench_serve.py --max-tokens 64 --requests-per-client 2 --name serve_cpu

The server is `llama-fast serve` (continuous batching, max batch 16) in a child process on 127.0.0.1, so the
clients do not share its interpreter lock; each client is a thread streaming /v1/completions (greedy,
ignore_eos, logprobs=0 so that every token arrives as its own SSE chunk, timed on arrival). Scenario
"N clients": N threads each send R requests back to back. Baseline "one by one": the requests of the largest
scenario, sequentially. Inter-token latency is the gap between consecutive chunks of one request. Results go
to benchmarks/results/<name>.json and .png.

A request that joins a running batch has its prompt prefilled in chunks (the server's --prefill-chunk, default
16 tokens on the CPU), on the CPU in the same forward as the running requests' next tokens, so the running
requests keep getting a token every step; there the chunks fill the step up to --step-tokens tokens (default 16)
with the running requests' tokens included (--step-tokens 64: the chunks on top of the running rows, as
before that option existed). Neither option changes the scenario or what is measured.

The run is kept short on purpose (the benchmark machines are shared): a few requests per scenario, so the
p99 figures rest on a few hundred gaps. The JSON says so.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import cpu_model  # noqa: E402

PROMPTS = ["Once upon a time", "The capital of France is", "Write a haiku about the sea.", "def fibonacci(n):",
           "List three colors:", "The quick brown fox", "Explain gravity to a child.", "In the year 2050,",
           "My favourite food is", "Dear diary, today", "The recipe calls for", "Breaking news:",
           "A good password is", "The meaning of life is", "Roses are red,", "Step 1: open the box."]


def percentile(values, q):
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def stream_one(http, url, prompt, max_tokens):
    """One streamed completion: (start, [arrival time of each token chunk]), perf_counter seconds."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "logprobs": 0,
            "ignore_eos": True}
    start = time.perf_counter()
    arrivals = []
    with http.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0].get("logprobs"):
                arrivals.extend([time.perf_counter()] * len(chunk["choices"][0]["logprobs"]["tokens"]))
    if len(arrivals) != max_tokens:
        raise RuntimeError(f"expected {max_tokens} tokens, got {len(arrivals)}")
    return start, arrivals


def run_scenario(url, clients, requests_per_client, max_tokens, prompts):
    """`clients` threads, each sending its requests back to back; returns the scenario's measurements."""
    import httpx

    records, errors = [], []
    lock = threading.Lock()

    def client(index):
        with httpx.Client(timeout=600) as http:
            for n in range(requests_per_client):
                prompt = prompts[(index * requests_per_client + n) % len(prompts)]
                try:
                    record = stream_one(http, url, prompt, max_tokens)
                except Exception as e:       # reported, not hidden
                    with lock:
                        errors.append(repr(e))
                    continue
                with lock:
                    records.append(record)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    begin = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - begin
    return summarize(records, wall, clients, errors)


def run_one_by_one(url, prompts, max_tokens):
    import httpx

    records = []
    begin = time.perf_counter()
    with httpx.Client(timeout=600) as http:
        for prompt in prompts:
            records.append(stream_one(http, url, prompt, max_tokens))
    return summarize(records, time.perf_counter() - begin, 1, [])


def summarize(records, wall, clients, errors):
    ttft = [arrivals[0] - start for start, arrivals in records]
    gaps = [b - a for _, arrivals in records for a, b in zip(arrivals, arrivals[1:])]
    tokens = sum(len(arrivals) for _, arrivals in records)
    return {"clients": clients, "requests": len(records), "errors": errors, "output_tokens": tokens,
            "wall_s": wall, "output_tok_per_s": tokens / wall if wall > 0 else None,
            "ttft_p50_ms": 1e3 * statistics.median(ttft) if ttft else None,
            "ttft_p99_ms": 1e3 * percentile(ttft, 99) if ttft else None,
            "itl_p50_ms": 1e3 * statistics.median(gaps) if gaps else None,
            "itl_p99_ms": 1e3 * percentile(gaps, 99) if gaps else None, "itl_samples": len(gaps)}


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scen = results["scenarios"]
    clients = [s["clients"] for s in scen]
    base = results["one_by_one"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot(clients, [s["output_tok_per_s"] for s in scen], "o-", label="concurrent (continuous batching)")
    axes[0].axhline(base["output_tok_per_s"], color="gray", ls="--", label="same requests one by one")
    axes[0].set(xlabel="concurrent clients", ylabel="output tokens/s (all clients)", xscale="log", title="throughput")
    axes[1].plot(clients, [s["itl_p50_ms"] for s in scen], "o-", label="p50")
    axes[1].plot(clients, [s["itl_p99_ms"] for s in scen], "s-", label="p99")
    axes[1].axhline(base["itl_p99_ms"], color="gray", ls="--", label="one by one p99")
    axes[1].set(xlabel="concurrent clients", ylabel="ms", xscale="log", title="inter-token latency")
    axes[2].plot(clients, [s["ttft_p50_ms"] for s in scen], "o-", label="p50")
    axes[2].plot(clients, [s["ttft_p99_ms"] for s in scen], "s-", label="p99")
    axes[2].set(xlabel="concurrent clients", ylabel="ms", xscale="log", title="time to first token")
    for ax in axes:
        ax.set_xticks(clients, [str(c) for c in clients])
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"llama-fast serve: {results['model']} on {results['device']} "
                 f"({results['torch_threads']} threads; {results['note']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


@contextlib.contextmanager
def server_process(path, args, device, threads):
    """`llama-fast serve` in a child process on a free port of 127.0.0.1; yields its URL once /health is ok."""
    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, "-m", "llama_fast", "serve", "--model", path, "--port", str(port),
               "--max-batch", str(args.max_batch), "--max-queue", "256", "--max-seq-len", "256",
               "--dtype", args.dtype, "--device", device, "--threads", str(threads), "--log-level", "warning"]
    if args.prefill_chunk:
        command += ["--prefill-chunk", str(args.prefill_chunk)]
    if args.step_tokens:
        command += ["--step-tokens", str(args.step_tokens)]
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen(command, cwd=root, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if child.poll() is not None:
                raise RuntimeError(f"the server exited with {child.returncode}")
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not become ready in 300 s")
            time.sleep(0.2)
        yield url
    finally:
        child.terminate()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="HF directory or .gguf (default: the embedded demo model)")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--requests-per-client", type=int, default=None,
                        help="default: 4 for 1 client, 2 for 4 and 16, 1 otherwise (a short run; with two "
                             "each, requests of the 16 clients join a running batch)")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--prefill-chunk", type=int, default=None,
                        help="the server's --prefill-chunk (default: the server's)")
    parser.add_argument("--step-tokens", type=int, default=None,
                        help="the server's --step-tokens (default: the server's; 64 gives the policy before it "
                             "existed: prefill_chunk prompt tokens on top of the running rows)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--name", default="serve_cpu")
    parser.add_argument("--note", default="shared machine under load from other jobs; short run (few requests "
                                          "per scenario): read the numbers as indicative")
    args = parser.parse_args(argv)

    import torch

    if args.model is None:
        from llama_fast.tools.demo import demo_model_dir
        path, model_name = demo_model_dir(), "SmolLM2-135M-Instruct (embedded, Q4_1 native)"
    else:
        path, model_name = args.model, os.path.basename(os.path.normpath(args.model))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = args.threads or torch.get_num_threads()
    clients = [int(c) for c in args.clients.split(",")]
    default_requests = {1: 4, 4: 2, 16: 2}
    results = {"benchmark": "bench_serve", "model": model_name, "device": device,
               "cpu": cpu_model(), "cpu_count": os.cpu_count(),
               "load_average_at_start": os.getloadavg(), "torch_threads": threads, "dtype": args.dtype,
               "max_batch": args.max_batch, "max_tokens": args.max_tokens, "prefill_chunk": args.prefill_chunk,
               "step_tokens": args.step_tokens,
               "note": args.note, "scenarios": []}
    with server_process(path, args, device, threads) as url:
        run_one_by_one(url, PROMPTS[:1], 4)      # first-call costs (plans, caches) stay out of the numbers
        for n in clients:
            per_client = args.requests_per_client or default_requests.get(n, 1)
            result = run_scenario(url, n, per_client, args.max_tokens, PROMPTS)
            result["requests_per_client"] = per_client
            results["scenarios"].append(result)
            print(f"{n:3d} clients: {result['output_tok_per_s']:.1f} tok/s, TTFT p50 "
                  f"{result['ttft_p50_ms']:.0f} ms, ITL p50 {result['itl_p50_ms']:.1f} ms p99 "
                  f"{result['itl_p99_ms']:.1f} ms", file=sys.stderr)
        largest = max(clients)
        per_client = args.requests_per_client or default_requests.get(largest, 1)
        baseline_prompts = [PROMPTS[i % len(PROMPTS)] for i in range(largest * per_client)]
        results["one_by_one"] = run_one_by_one(url, baseline_prompts, args.max_tokens)
        print(f"one by one: {results['one_by_one']['output_tok_per_s']:.1f} tok/s", file=sys.stderr)
    results["load_average_at_end"] = os.getloadavg()
    by_clients = {s["clients"]: s for s in results["scenarios"]}
    if 1 in by_clients and largest in by_clients:
        one, many = by_clients[1], by_clients[largest]
        results["goal"] = {
            "throughput_ratio": many["output_tok_per_s"] / one["output_tok_per_s"],
            "throughput_ratio_target": 4.0,
            "itl_p99_ratio": many["itl_p99_ms"] / one["itl_p99_ms"],
            "itl_p99_ratio_target": 3.0,
        }
    out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{args.name}.json"), "w") as f:
        json.dump(results, f, indent=2)
    plot(results, os.path.join(out_dir, f"{args.name}.png"))
    print(json.dumps(results.get("goal", {}), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
