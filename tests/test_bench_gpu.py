"""benchmarks/bench_gpu.py on the CPU with a tiny model: the code `make gpu-check` runs on a GPU machine, so it
cannot rot where there is none. Checks what it writes, never how fast anything was."""
from __future__ import annotations

import json

import pytest
import torch
from script_module import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/bench_gpu.py", "bench_gpu")


def test_arguments(bench):
    args = bench.parse_args(["--shapes", "7b, 1b", "--budget-s", "90"])
    assert args.shapes == ["7b", "1b"] and args.budget_s == 90
    for bad in (["--shapes", "70b"], ["--short", "9", "--long", "9"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_decode_bytes_count_each_weight_once(bench):
    tied = bench.llama_fast_model({**bench.SHAPES["tiny"], "tie_word_embeddings": True}, torch.float32, "cpu")
    untied = bench.llama_fast_model(bench.SHAPES["tiny"], torch.float32, "cpu")
    embed = 256 * 128 * 4
    # untied: the embedding table is not read in full by a decode step, the separate head is
    assert bench.decode_bytes(untied, 1, 10)["weights"] == bench.decode_bytes(tied, 1, 10)["weights"]
    assert bench.decode_bytes(untied, 1, 10)["weights"] == sum(
        p.numel() * 4 for p in untied.parameters()) - embed
    assert bench.decode_bytes(untied, 2, 10)["kv_cache"] == 2 * 2 * 1 * 64 * 10 * 2 * 4


def test_runs_end_to_end_on_the_cpu(bench, tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--device", "cpu", "--shapes", "tiny", "--short", "2", "--long", "5", "--repeats", "1",
                "--no-compile", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert doc["machine"]["copy_gbs"] > 0
    got = {(r["engine"], r["weights"], r["batch"]) for r in doc["results"]}
    assert got == {(e, w, b) for b in (1, 8) for e, w in (("llama_fast", "bf16"), ("llama_fast", "int4 g128"),
                                                           ("transformers sdpa eager", "bf16"))}
    for r in doc["results"]:
        # a loaded machine may time the long run no slower than the short one; anything else is a bug
        assert "error" not in r or r["error"].startswith("RuntimeError: timing noise"), r
        assert "error" in r or (r["tok_per_s"] > 0 and r["bytes_per_step"]["weights"] > 0)
