"""generate on CUDA: the static decode step, its CUDA graph, the sync-free loop (issue 13). Graphs on and off
and the eager forward path give the same tokens as transformers; a decode step reads nothing on the host; a step
that cannot be captured warns once and runs eagerly; torch.compile(fullgraph=True) composes on the GPU too."""
import warnings

import pytest
import torch
from no_host_read import NoHostRead

from conftest import left_padded_batch, load_hf, make_hf_model
from cuda_testing import requires_cuda

pytestmark = requires_cuda

CONFIG = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=1, intermediate_size=320)


def load(directory, dtype=torch.float32, backend="cuda"):
    from llama_fast import LlamaForCausalLM

    make_hf_model(directory, CONFIG)
    return LlamaForCausalLM.from_pretrained(directory, dtype=dtype, device="cuda", backend=backend)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@torch.inference_mode()
def test_graphs_on_and_off_match_transformers_greedy(tmp_path, backend):
    from llama_fast import cuda_graphs

    ours = load(tmp_path, backend=backend)
    ref = load_hf(tmp_path).cuda()
    ids, mask, _ = left_padded_batch(pads=(0, 4), seq_len=9, vocab=128)
    ids, mask = ids.cuda(), mask.cuda()
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # a failed capture would warn
        graphed = ours.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert cuda_graphs._GRAPHS[ours][2].graph is not None, "the decode step was not captured"
    eager = ours.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0,
                          cuda_graphs=False)
    again = ours.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert torch.equal(graphed.cpu(), expected.cpu())
    assert torch.equal(eager.cpu(), expected.cpu())
    assert torch.equal(again.cpu(), expected.cpu())       # the graph and its cache are reused


@torch.inference_mode()
def test_eos_stops_where_the_synchronous_loop_does(tmp_path):
    ours = load(tmp_path)
    ids, mask, _ = left_padded_batch(pads=(0, 2, 5), seq_len=8, vocab=128)
    ids, mask = ids.cuda(), mask.cuda()
    free = ours.generate(ids, attention_mask=mask, max_new_tokens=32, eos_token_id=None)
    eos = int(free[1, 8 + 3])
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=32, eos_token_id=eos, pad_token_id=0)
    cpu = ours.to("cpu").set_backend("torch")
    want = cpu.generate(ids.cpu(), attention_mask=mask.cpu(), max_new_tokens=32, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got.cpu(), want)


@torch.inference_mode()
def test_decode_steps_read_nothing_on_the_host(tmp_path):
    ours = load(tmp_path, torch.bfloat16)
    ids = torch.randint(0, 128, (2, 7), device="cuda")
    cache = ours.new_cache(2, 64)
    tok = ours(ids, past_key_values=cache).logits[:, -1].argmax(-1)[:, None]
    cos, sin = ours.rope_tables(cache)
    ours.decode_step(tok, cache, cos, sin)
    ours(tok, past_key_values=cache)
    with NoHostRead():
        for _ in range(3):
            tok = ours.decode_step(tok, cache, cos, sin).argmax(-1)[:, None]
            tok = ours(tok, past_key_values=cache).logits[:, -1].argmax(-1)[:, None]


@torch.inference_mode()
def test_a_step_that_cannot_be_captured_warns_once_and_runs_eagerly(tmp_path, monkeypatch):
    from llama_fast import cuda_graphs

    ours = load(tmp_path)
    ids = torch.randint(0, 128, (1, 5), device="cuda")
    want = ours.generate(ids, max_new_tokens=8, cuda_graphs=False)
    real = type(ours).decode_step

    def syncing_step(self, *args):
        torch.cuda.synchronize()            # not allowed while capturing
        return real(self, *args)

    monkeypatch.setattr(type(ours), "decode_step", syncing_step)
    cuda_graphs.release(ours)
    with pytest.warns(RuntimeWarning, match="could not be captured"):
        got = ours.generate(ids, max_new_tokens=8)
    assert torch.equal(got, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours.generate(torch.randint(0, 128, (3, 5), device="cuda"), max_new_tokens=4)   # says it once


@torch.inference_mode()
def test_changed_weights_are_captured_again(tmp_path):
    from llama_fast.linear import Linear

    ours = load(tmp_path, torch.bfloat16)
    ids = torch.randint(0, 128, (1, 5), device="cuda")
    ours.generate(ids, max_new_tokens=4)
    for name, module in ours.named_modules():
        if isinstance(module, Linear) and name != "lm_head":
            module.quantize_(4, 64, name=name)
    got = ours.generate(ids, max_new_tokens=12)
    assert torch.equal(got, ours.generate(ids, max_new_tokens=12, cuda_graphs=False))


@torch.inference_mode()
def test_compiled_decode_step_fullgraph_on_the_gpu(tmp_path):
    import torch._dynamo

    torch._dynamo.reset()
    ours = load(tmp_path, torch.bfloat16)
    ids = torch.randint(0, 128, (2, 6), device="cuda")
    caches = [ours.new_cache(2, 64) for _ in range(2)]
    tok = [ours(ids, past_key_values=c).logits[:, -1].argmax(-1)[:, None] for c in caches][0]
    cos, sin = ours.rope_tables(caches[0])
    compiled = torch.compile(ours.decode_step, fullgraph=True, backend="aot_eager")
    t_c = t_e = tok
    for i in range(16):
        torch._dynamo.config.error_on_recompile = i > 0
        try:
            got = compiled(t_c, caches[0], cos, sin)
        finally:
            torch._dynamo.config.error_on_recompile = False
        want = ours.decode_step(t_e, caches[1], cos, sin)
        torch.testing.assert_close(got, want)
        t_c, t_e = got.argmax(-1)[:, None], want.argmax(-1)[:, None]
