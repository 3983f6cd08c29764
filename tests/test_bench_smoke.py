"""The generate benchmark harness end to end on a tiny model: a few tokens, every engine in a subprocess,
the JSON report and the PNG chart. (Speed is never asserted; only that the harness measures and reports.)"""
import json

import pytest

from llama_fast.tools.bench import main, ratio_table

transformers = pytest.importorskip("transformers")
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    path = tmp_path_factory.mktemp("tiny")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def test_quick_run_writes_json_and_png(tiny_model_dir, tmp_path, capsys):
    rc = main(["--model", tiny_model_dir, "--engines", "llama_fast", "transformers", "--backends", "torch",
               "--attn", "sdpa", "--quick", "--threads", "1", "--out-dir", str(tmp_path), "--name", "smoke"])
    assert rc == 0
    report = json.loads((tmp_path / "smoke.json").read_text())
    assert (tmp_path / "smoke.png").stat().st_size > 1000
    labels = {(r["engine"], r["backend"]) for r in report["results"]}
    assert labels == {("llama_fast", "torch"), ("transformers", "sdpa")}
    for r in report["results"]:
        assert r["status"] == "ok", r.get("error")
        assert r["batch"] == 1 and r["dtype"] == "float32" and r["prompt_len"] == 16 and r["new_tokens"] == 4
        assert len(r["prefill_s"]) == len(r["decode_s"]) == 1
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            assert r[key]["max"] >= r[key]["median"] > 0
        assert r["peak_rss_mb"] > 50
    table = capsys.readouterr().out
    assert "llama_fast:torch" in table and "x hf" in table


def test_failed_configuration_is_reported_not_fatal():
    results = [dict(engine="llama_fast", backend="cuda", dtype="float32", batch=1, status="error",
                    error="RuntimeError: no CUDA device")]
    assert "no CUDA device" in ratio_table(results)
