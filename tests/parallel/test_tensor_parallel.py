"""Tensor parallelism on two CPU ranks over gloo against the one-process model (llama_fast.parallel).

One two-rank job (tp_worker.py, started by llama_fast.parallel.launch.run_ranks with a deadline; every process
killed by PID after it) runs all the cases, each from its own tiny random checkpoint; the tests compare what
each rank wrote with the one-process model loaded from the same files:
  * logits of a left-padded batch: the fp32 rule of tests/tolerance.py (the ranks add partial sums in another
    order than one process does);
  * greedy tokens: the same as the one-process model's (but for a near-tie, conftest.assert_greedy_agrees);
  * greedy and seeded sampled tokens, and logits: bitwise the same on both ranks (every rank gets the same
    all-reduced sums and gathered shards, so this holds by construction);
  * layouts that cannot be split: a clear error on every rank, and no hang.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_quant_util import tiny_llama, write_checkpoint
from kquant_util import random_blocks
from tolerance import assert_fp32_close

from llama_fast import LlamaForCausalLM
from llama_fast.formats.safetensors import SafetensorsFile
from llama_fast.parallel.launch import run_ranks

from conftest import BF16_FACTOR, BF16_SLACK, assert_greedy_agrees, make_hf_model
from gguf_util import Q, random_state_dict, write_llama_gguf

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("tp_worker.py")
WORLD = 2
DEADLINE_S = 240     # the whole job; it takes ~15 s on an idle 2-core machine

sys.path.insert(0, str(WORKER.parent))
from tp_worker import inputs, static_steps  # noqa: E402


def _hf(directory: Path, **config) -> str:
    make_hf_model(directory, dict(intermediate_size=128, **config))
    return str(directory)


def _quantized_checkpoint(src: str, directory: Path, bits: str, group_size: int, **save) -> str:
    LlamaForCausalLM.from_pretrained(src, dtype="float32", quantize=bits, group_size=group_size).save_pretrained(
        directory, **save)
    return str(directory)


def _third_party(directory: Path, fmt: str, model=None, **options) -> str:
    """A GPTQ / AWQ / compressed-tensors checkpoint of a tiny random Llama (tests/hf_quant_util.py: hidden 128,
    4 heads of 32, 2 KV heads, intermediate 256: every split over two ranks falls on whole words and on
    groups of 32)."""
    write_checkpoint(directory, tiny_llama(3) if model is None else model, fmt, **options)
    return str(directory)


def _gguf(path: Path, kquant: bool = False, kquant_o_proj: bool = False) -> str:
    """Q8_0 attention, Q4_0 (or Q4_K with rows of 256) MLP, F32 rest: every block type split both ways.
    kquant_o_proj: o_proj in Q4_K too, whose 256 input columns two ranks cannot split without splitting a block."""
    if kquant:
        config = dict(vocab_size=96, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                      rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    else:
        config = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                      rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    tensors = random_state_dict(config)
    types = {}
    for name, value in list(tensors.items()):
        if kquant_o_proj and name.endswith("o_proj.weight"):
            tensors[name] = random_blocks("Q4_K", *value.shape, seed=len(types)).numpy()
            types[name] = Q.Q4_K
        elif ".self_attn." in name:
            types[name] = Q.Q8_0
        elif ".mlp." in name:
            if kquant:
                tensors[name] = random_blocks("Q4_K", *value.shape, seed=len(types)).numpy()
                types[name] = Q.Q4_K
            else:
                types[name] = Q.Q4_0
    write_llama_gguf(path, config, tensors, types)
    return str(path)


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory):
    """{case name: (case, [per-rank results or error text])} for the cases below, from one two-rank job."""
    tmp = tmp_path_factory.mktemp("tp")
    mha = _hf(tmp / "mha", num_key_value_heads=4)
    tied = _hf(tmp / "gqa_tied", num_key_value_heads=2, tie_word_embeddings=True)
    cases = [
        dict(name="mha", path=mha),
        dict(name="mha_vocab_replicated", path=mha, kwargs=dict(tp_vocab="replicated")),
        dict(name="gqa_tied", path=tied),
        # one KV head for two ranks (replicated), biases on every linear, a vocabulary of 127 (uneven shards)
        dict(name="gqa_kv1_bias", path=_hf(tmp / "kv1", num_key_value_heads=1, attention_bias=True, mlp_bias=True,
                                         vocab_size=127)),
        dict(name="int4_on_load", path=tied, kwargs=dict(quantize="int4", group_size=32)),
        dict(name="int4_checkpoint", path=_quantized_checkpoint(mha, tmp / "int4", "int4", 32)),
        dict(name="int8_checkpoint", path=_quantized_checkpoint(tied, tmp / "int8", "int8", 32)),
        # a checkpoint in several files: a quantized linear's codes and scales may sit in different ones
        dict(name="int4_several_files", path=_quantized_checkpoint(tied, tmp / "int4_files", "int4", 32,
                                                                   max_shard_size="20KB")),
        dict(name="bf16", path=tied, kwargs=dict(dtype="bfloat16")),
        dict(name="gguf_q8_q4", path=_gguf(tmp / "q.gguf")),
        dict(name="gguf_q4_k", path=_gguf(tmp / "k.gguf", kquant=True)),
        dict(name="gptq_sym_v1", path=_third_party(tmp / "gptq_sym", "gptq", symmetric=True)),
        dict(name="gptq_asym_v1", path=_third_party(tmp / "gptq_asym", "gptq", symmetric=False)),
        dict(name="gptq_int8", path=_third_party(tmp / "gptq8", "gptq", bits=8, symmetric=False)),
        # act-order on the column-parallel layers (their K is whole on every rank); o_proj / down_proj dense
        dict(name="gptq_act_order_columns", path=_third_party(
            tmp / "gptq_act", "gptq", desc_act=True, dense_modules=[f"model.layers.{i}.{m}" for i in range(2)
                                                                      for m in ("self_attn.o_proj", "mlp.down_proj")])),
        dict(name="gptq_one_group", path=_third_party(tmp / "gptq_g1", "gptq", group_size=-1)),
        dict(name="awq", path=_third_party(tmp / "awq", "awq")),
        dict(name="compressed_tensors_w4a16", path=_third_party(tmp / "ct", "compressed-tensors", symmetric=True)),
        dict(name="compressed_tensors_asym_channel", path=_third_party(tmp / "ct_ch", "compressed-tensors",
                                                                       strategy="channel")),
        # layouts that cannot be split over two ranks
        dict(name="heads_not_divisible", path=_hf(tmp / "h3", num_attention_heads=3, num_key_value_heads=1,
                                                 hidden_size=48), error="num_attention_heads=3 is not divisible"),
        dict(name="world_over_heads", path=_hf(tmp / "h1", num_attention_heads=1, num_key_value_heads=1,
                                              hidden_size=16), error="needs at least 2 attention heads"),
        dict(name="group_split", path=_quantized_checkpoint(mha, tmp / "g64", "int4", 64),
             error="would split a block of 64 weights"),
        dict(name="kquant_block_split", path=_gguf(tmp / "ko.gguf", kquant=True, kquant_o_proj=True),
             error="would split a block of 256 weights"),
        dict(name="gptq_act_order_rows", path=_third_party(tmp / "gptq_act_all", "gptq", desc_act=True),
             error="act-order (desc_act"),
        # o_proj's 128 input columns in one group of 128: two ranks would split it
        dict(name="gptq_group_split", path=_third_party(tmp / "gptq_g128", "gptq", group_size=128),
             error="would split a block of 128 weights"),
        # head_dim 4: k_proj's 8 output rows split at 4, inside AWQ's words of 8 codes
        dict(name="awq_word_split", path=_third_party(tmp / "awq_small", "awq", group_size=8, model=tiny_llama(
            3, hidden_size=16, intermediate_size=32)), error="would split a block of 8 weights"),
        dict(name="one_rank_fails", path=mha, fail_rank=1, error="rank 1 of 2 failed to load its shard"),
        dict(name="ranks_load_different_models", path=mha, path_rank1=tied, error="loaded different models"),
    ]
    out = tmp / "out"
    out.mkdir()
    (tmp / "cases.json").write_text(json.dumps(cases))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    results = run_ranks([sys.executable, str(WORKER), str(tmp / "cases.json"), str(out)], WORLD,
                        timeout=DEADLINE_S, env=env)
    outputs = "\n".join(f"--- rank {r.rank} (exit {r.returncode}):\n{r.output[-3000:]}" for r in results)
    assert all(r.returncode == 0 for r in results), outputs
    found = {}
    for case in cases:
        ranks = []
        for rank in range(WORLD):
            error = out / f"{case['name']}.rank{rank}.error.txt"
            if error.exists():
                ranks.append(error.read_text())
            else:
                f = SafetensorsFile(out / f"{case['name']}.rank{rank}.safetensors")
                ranks.append({name: f.read(name) for name in f.keys()})
        found[case["name"]] = (case, ranks)
    return found


def _reference(case: dict):
    kwargs = {k: v for k, v in case.get("kwargs", {}).items() if not k.startswith("tp_")}
    model = LlamaForCausalLM.from_pretrained(case["path"], **kwargs)
    ids, mask = inputs(model.config.vocab_size)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        steps = static_steps(model, ids, mask)
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                            return_dict_in_generate=True, output_logits=True)
    return logits, greedy, ids.shape[1], steps


MATCH_CASES = ["mha", "mha_vocab_replicated", "gqa_tied", "gqa_kv1_bias", "int4_on_load", "int4_checkpoint",
               "int8_checkpoint", "int4_several_files", "gguf_q8_q4", "gguf_q4_k", "gptq_sym_v1", "gptq_asym_v1",
               "gptq_int8", "gptq_act_order_columns", "gptq_one_group", "awq", "compressed_tensors_w4a16",
               "compressed_tensors_asym_channel"]


@pytest.mark.parametrize("name", MATCH_CASES)
def test_two_ranks_match_one_process(tp_run, name):
    case, ranks = tp_run[name]
    for rank, got in enumerate(ranks):
        assert isinstance(got, dict), f"rank {rank} failed: {got}"
    first, second = ranks
    assert int(first["refuses_output_attentions"]) == 1
    for key in ("logits", "greedy", "sampled", "static_steps"):
        # Exact by construction: both ranks hold the same all-reduced sums and gathered shards
        assert torch.equal(first[key], second[key]), f"{key} differ between the ranks"
    logits, greedy, prompt_len, steps = _reference(case)
    # the real tokens' logits: a pad's are meaningless (llama_fast/modeling.py), and the two paths differ there (the
    # one process's fused CPU stack skips the pads and outputs zeros, a rank's op-by-op path computes them)
    real = inputs(logits.shape[-1])[1].bool()
    assert_fp32_close(first["logits"][real], logits[real], f"{name}: logits of rank 0 vs one process")
    # the static decode step (what a GPU rank's CUDA graph would capture), collectives included
    assert_fp32_close(first["static_steps"], steps, f"{name}: decode_step logits of rank 0 vs one process")
    assert_greedy_agrees(first["greedy"], greedy, prompt_len, rel_tol=1e-5)


def test_bf16_two_ranks_within_the_bf16_budget(tp_run):
    """bf16: each rank rounds its partial sums to bf16 before the all-reduce, so the error against the fp32
    model may differ from the one-process bf16 model's; it must stay within conftest's bf16 rule (2x the
    one-process bf16 error plus one bf16 rounding step of the logits' scale)."""
    case, ranks = tp_run["bf16"]
    assert isinstance(ranks[0], dict), ranks[0]
    assert torch.equal(ranks[0]["logits"], ranks[1]["logits"])      # the same sums on both ranks
    real = inputs(ranks[0]["logits"].shape[-1])[1].bool()     # the real tokens (see above)
    exact = _reference(dict(case, kwargs={"dtype": "float32"}))[0][real]
    one_process = _reference(case)[0][real]
    err = (ranks[0]["logits"][real] - exact).abs().max().item()
    own = (one_process.float() - exact).abs().max().item()
    assert err <= BF16_FACTOR * own + BF16_SLACK * exact.abs().max().item(), (err, own)


@pytest.mark.parametrize("name", ["heads_not_divisible", "world_over_heads", "group_split", "kquant_block_split",
                                  "gptq_act_order_rows", "gptq_group_split", "awq_word_split", "one_rank_fails",
                                  "ranks_load_different_models"])
def test_bad_layout_is_an_error_on_every_rank(tp_run, name):
    case, ranks = tp_run[name]
    for rank, got in enumerate(ranks):
        if name == "one_rank_fails" and rank == case["fail_rank"]:
            assert got == "RuntimeError: injected failure on this rank", got
            continue
        assert isinstance(got, str), f"rank {rank} loaded a model it should have refused"
        assert case["error"] in got, f"rank {rank}: {got}"


def _run_cli(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """`python -m llama_fast ...` in its own session, so that a timeout kills torchrun's ranks too (by the
    session's process group, which holds only what this call started)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "llama_fast", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_cli_tp_prints_the_one_process_text_once(tmp_path, capsys):
    from test_cli import save_tiny_cli_model  # the CLI tests' tiny model with a word-level tokenizer

    from llama_fast.tools.cli import main

    model_dir = save_tiny_cli_model(tmp_path)
    args = ["generate", "--model", str(model_dir), "--prompt", "hello w1 w2", "--max-new-tokens", "6"]
    assert main(args) == 0
    one = capsys.readouterr().out
    assert one.strip(), "no text generated"
    two = _run_cli(args + ["--tp", "2"])
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout == one     # greedy fp32: the same text, printed by rank 0 alone
    assert "tensor parallel over 2 ranks" in two.stderr and two.stderr.count("prefill:") == 1


def test_cli_tp_layout_that_does_not_split_is_one_line_before_any_rank_starts(tmp_path, capsys):
    from test_cli import save_tiny_cli_model

    from llama_fast.tools.cli import main

    model_dir = save_tiny_cli_model(tmp_path)     # 4 heads
    assert main(["generate", "--model", str(model_dir), "--prompt", "hello", "--tp", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["llama-fast generate: error: num_attention_heads=4 is not divisible by the world size 3: each "
                   "rank must hold the same number of query heads"]
