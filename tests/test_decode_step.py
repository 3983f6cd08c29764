"""The static decode step (LlamaModel.decode_step): what CUDA graphs capture and torch.compile compiles.

Checked on the CPU with our custom ops (backend "cpu", whose fake impls torch.compile traces): it equals the
forward pass, torch.compile(fullgraph=True) runs 64 steps of it with no graph break and no recompilation after
the first and matches eager, and a step reads nothing from the device on the host (.item(), bool(), .tolist(),
a copy to the CPU), which is what makes it capturable."""
from __future__ import annotations

import pytest
import torch
from no_host_read import NoHostRead

from llama_fast import LlamaForCausalLM
from llama_fast.config import LlamaConfig
from llama_fast.linear import Linear

from conftest import tiny_config

STEPS = 64


def tiny_model(quantize: str | None, backend="cpu", device="cpu"):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**tiny_config(max_position_embeddings=128)), dtype=torch.float32,
                             device=device)
    if quantize == "int4":
        for name, module in model.named_modules():
            if isinstance(module, Linear) and name != "lm_head":
                module.quantize_(4, 32, name=name)
    return model.set_backend(backend).eval()


def prefilled(model, batch=2, capacity=STEPS + 16):
    ids = torch.randint(0, model.config.vocab_size, (batch, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0                                   # row 1 is left padded: rows have different lengths
    cache = model.new_cache(batch, capacity)
    logits = model(ids, attention_mask=mask, past_key_values=cache, logits_to_keep=1).logits[:, -1]
    return cache, logits.argmax(-1)


@pytest.mark.parametrize("quantize", [None, "int4"])
@torch.inference_mode()
def test_decode_step_equals_forward(quantize):
    model = tiny_model(quantize)
    cache_a, tok = prefilled(model)
    cache_b, _ = prefilled(model)
    cos, sin = model.rope_tables(cache_b)
    for _ in range(8):
        want = model(tok[:, None], past_key_values=cache_a).logits[:, -1]
        got = model.decode_step(tok[:, None], cache_b, cos, sin)
        cache_b.seen_tokens += 1
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(cache_a.lengths, cache_b.lengths)
        tok = want.argmax(-1)


@pytest.mark.parametrize("quantize", [None, "int4"])
@torch.inference_mode()
def test_decode_step_reads_nothing_on_the_host(quantize):
    model = tiny_model(quantize)
    cache, tok = prefilled(model)
    cos, sin = model.rope_tables(cache)
    model.decode_step(tok[:, None], cache, cos, sin)      # first call: lazy set-up (plans, resolution) is allowed
    with NoHostRead():
        for _ in range(3):
            tok = model.decode_step(tok[:, None], cache, cos, sin).argmax(-1)


def test_the_guard_catches_host_reads():
    with NoHostRead(), pytest.raises(AssertionError, match="host read"):
        bool(torch.ones(2).any())


@pytest.mark.parametrize("quantize", [None, "int4"])
@torch.inference_mode()
def test_compiled_decode_step_has_no_graph_break_no_recompile_and_matches_eager(quantize):
    import torch._dynamo

    torch._dynamo.reset()
    model = tiny_model(quantize)
    cache_eager, tok = prefilled(model)
    cache_compiled, _ = prefilled(model)
    cos, sin = model.rope_tables(cache_eager)
    graphs = []

    def backend(gm, example_inputs):
        # "aot_eager" traces every op through its fake impl (the FakeTensor pass inductor also runs) and
        # functionalizes the in-place cache writes, without inductor's C++ compile time on a shared machine.
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    from torch._dynamo.backends.common import aot_autograd  # noqa: F401  (registers aot_eager)
    from torch._dynamo.backends.debugging import aot_eager
    compiled = torch.compile(model.decode_step, fullgraph=True, backend=backend)
    tok_e = tok_c = tok
    for i in range(STEPS):
        if i == 1:
            torch._dynamo.config.error_on_recompile = True
        try:
            got = compiled(tok_c[:, None], cache_compiled, cos, sin)
        finally:
            torch._dynamo.config.error_on_recompile = False
        want = model.decode_step(tok_e[:, None], cache_eager, cos, sin)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(cache_compiled.lengths, cache_eager.lengths)
        tok_e, tok_c = want.argmax(-1), got.argmax(-1)
        assert torch.equal(tok_e, tok_c)
    assert len(graphs) == 1
    # torch.compile would trace a .item() into an unbacked symbol instead of failing: look for one
    scalar_reads = [n for n in graphs[0].graph.nodes if n.op == "call_method" and n.target in ("item", "tolist")]
    assert not scalar_reads, f"the decode step reads device values on the host: {scalar_reads}"
    for k_c, k_e in zip(cache_compiled.k, cache_eager.k):
        torch.testing.assert_close(k_c, k_e, rtol=1e-5, atol=1e-5)
