"""llama_fast.weight_arena: a loaded CPU model's weights moved into one huge-page buffer.

Moving copies bytes, so every value, and so every output, is unchanged: the logits are compared exactly (the kernels'
arithmetic does not depend on where the weights lie). What must also survive the move: tensors that shared a storage
(a tied lm_head, views) still share one, shapes and strides are kept, and the CPU decode plan built afterwards reads
the new addresses."""
import pytest
import torch
from torch import nn

from llama_fast import LlamaForCausalLM, weight_arena

from conftest import make_hf_model

needs_huge_pages = pytest.mark.skipif(not weight_arena.huge_pages_available(),
                                      reason="transparent huge pages unavailable here (not Linux, or mode never)")


def _storages(model: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())
            if t.untyped_storage().nbytes() >= weight_arena.MIN_BYTES}


@pytest.fixture
def tied_model(tmp_path, monkeypatch):
    """A tiny tied-embedding model loaded without packing (LLAMA_FAST_HUGE_PAGES=0), and every storage counted."""
    make_hf_model(tmp_path, {"tie_word_embeddings": True})
    monkeypatch.setenv("LLAMA_FAST_HUGE_PAGES", "0")
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    monkeypatch.delenv("LLAMA_FAST_HUGE_PAGES")
    monkeypatch.setattr(weight_arena, "MIN_BYTES", 1)    # the tiny model's tensors are all small
    return model


@needs_huge_pages
def test_pack_keeps_every_output_and_the_tie(tied_model):
    ids = torch.tensor([[3, 17, 99, 5, 64, 2]])
    with torch.inference_mode():
        before = tied_model(ids).logits
        assert len(_storages(tied_model)) > 1
        assert weight_arena.pack_weights(tied_model) > 0
        assert len(_storages(tied_model)) == 1                       # one buffer holds them all
        emb, head = tied_model.model.embed_tokens, tied_model.lm_head
        assert head.weight.data_ptr() == emb.weight.data_ptr()       # still tied: one table
        assert torch.equal(tied_model(ids).logits, before)           # same bytes, same arithmetic


@needs_huge_pages
def test_decode_after_packing_equals_decode_before(tied_model):
    ids = torch.tensor([[3, 17, 99, 5]])
    before = tied_model.generate(ids, max_new_tokens=8, do_sample=False)
    weight_arena.pack_weights(tied_model)
    assert torch.equal(tied_model.generate(ids, max_new_tokens=8, do_sample=False), before)


@needs_huge_pages
def test_views_of_one_storage_stay_views(monkeypatch):
    monkeypatch.setattr(weight_arena, "MIN_BYTES", 1)
    m = nn.Module()
    base = torch.arange(4096, dtype=torch.float32).reshape(64, 64)
    m.register_buffer("whole", base)
    m.register_buffer("rows", base[8:40])             # a view at an offset
    m.register_buffer("cols", base.t())               # strided
    m.register_buffer("halves", torch.arange(1000, dtype=torch.bfloat16))
    m.register_buffer("codes", torch.arange(3000, dtype=torch.int32).to(torch.uint8))   # odd byte count
    expect = {name: t.clone() for name, t in m.named_buffers()}
    strides = {name: t.stride() for name, t in m.named_buffers()}
    assert weight_arena.pack_weights(m) > 0
    for name, t in m.named_buffers():
        assert torch.equal(t, expect[name]) and t.stride() == strides[name], name
        assert t.data_ptr() % t.element_size() == 0
    assert m.rows.data_ptr() == m.whole.data_ptr() + 8 * 64 * 4
    m.whole[10, 0] = -1.0
    assert m.rows[2, 0] == -1.0 and m.cols[0, 10] == -1.0       # still one storage


def test_disabled_by_the_environment(monkeypatch, tied_model):
    monkeypatch.setenv("LLAMA_FAST_HUGE_PAGES", "0")
    ptr = tied_model.lm_head.weight.data_ptr()
    assert weight_arena.pack_weights(tied_model) == 0
    assert tied_model.lm_head.weight.data_ptr() == ptr


@needs_huge_pages
def test_from_pretrained_packs_cpu_models(tmp_path, monkeypatch):
    make_hf_model(tmp_path)
    monkeypatch.setattr(weight_arena, "MIN_BYTES", 1)
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert len(_storages(model)) == 1


@needs_huge_pages
def test_the_kernels_know_the_buffer_while_the_model_lives(tmp_path, monkeypatch):
    """The dense GEMVs treat the registered buffer as on huge pages, and only it (csrc/cpu/tuning.h: no software
    prefetch there unless the CPU's choice says so)."""
    import gc

    from llama_fast.ops import cpu
    make_hf_model(tmp_path)
    monkeypatch.setattr(weight_arena, "MIN_BYTES", 1)
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    address = model.lm_head.weight.data_ptr()
    elsewhere = torch.empty(1 << 16, dtype=torch.bfloat16)
    distance = cpu.tuning()["prefetch_bytes"]
    on_huge = distance if cpu.tuning()["prefetch_on_huge_pages"] else 0  # by CPU vendor (cpu/tuning.h)
    assert torch.ops.llama_fast.cpu_dense_prefetch_bytes(address) == on_huge
    assert torch.ops.llama_fast.cpu_dense_prefetch_bytes(elsewhere.data_ptr()) == distance
    del model
    gc.collect()
    assert torch.ops.llama_fast.cpu_dense_prefetch_bytes(address) == distance
