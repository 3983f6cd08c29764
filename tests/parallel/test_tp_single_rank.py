"""tp_plan="auto" in a process group of one rank (made in this process, no subprocess): the shard is the whole
model, no collective runs, and it decodes exactly as the one-process model (the same weights through the same
kernels, the fused CPU decode stack included)."""
from __future__ import annotations

import sys

import pytest
import torch
import torch.distributed as dist

from llama_fast import LlamaForCausalLM
from llama_fast.parallel import TensorParallelError
from llama_fast.parallel.launch import run_ranks

from conftest import make_hf_model


@pytest.fixture
def world_of_one():
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_one_rank_is_the_whole_model(tmp_path, world_of_one):
    make_hf_model(tmp_path, dict(intermediate_size=128, tie_word_embeddings=True))
    plain = LlamaForCausalLM.from_pretrained(tmp_path, dtype="float32")
    shard = LlamaForCausalLM.from_pretrained(tmp_path, dtype="float32", tp_plan="auto")
    assert shard.tensor_parallel.world == 1
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    # Exact: the same weights through the same kernels (no collective at a world of one)
    assert torch.equal(shard(ids).logits, plain(ids).logits)
    assert torch.equal(shard.generate(ids, max_new_tokens=6), plain.generate(ids, max_new_tokens=6))
    with pytest.raises(ValueError, match="tensor-parallel rank"):
        shard.save_pretrained(tmp_path / "saved")


def test_tp_plan_other_than_auto_is_refused(tmp_path, world_of_one):
    make_hf_model(tmp_path)
    with pytest.raises(TensorParallelError, match="tp_plan must be one of"):
        LlamaForCausalLM.from_pretrained(tmp_path, tp_plan={"layers": "colwise"})


def test_tp_plan_without_a_process_group_says_how_to_start_one(tmp_path, monkeypatch):
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    make_hf_model(tmp_path)
    with pytest.raises(TensorParallelError, match="torchrun"):
        LlamaForCausalLM.from_pretrained(tmp_path, tp_plan="auto")


def test_a_process_group_the_load_started_is_destroyed_at_exit(tmp_path):
    # Under torchrun nobody else owns the group the load starts; left to interpreter teardown, gloo's threads
    # can abort the process after its work is done. The load's exit handler destroys it first.
    make_hf_model(tmp_path, dict(intermediate_size=128))
    code = ("import atexit, torch.distributed as dist, llama_fast; "
            f"llama_fast.LlamaForCausalLM.from_pretrained({str(tmp_path)!r}, tp_plan='auto'); "
            "print('before', dist.is_initialized()); atexit._run_exitfuncs(); print('after', dist.is_initialized())")
    [result] = run_ranks([sys.executable, "-c", code], 1, timeout=120)
    assert result.returncode == 0, result.output[-3000:]
    assert "before True" in result.output and "after False" in result.output, result.output[-3000:]
