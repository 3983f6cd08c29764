"""The model's decode steps on the CPU run the fused C++ stack (llama_fast/ops/cpu_decode.py): their logits
equal transformers' (fp32), stay within the bf16 budget, and equal the op-by-op path for quantized weights."""
import pytest
import torch

from llama_fast import LlamaForCausalLM
from llama_fast.ops import cpu_decode

pytest.importorskip("llama_fast._C")


@pytest.fixture
def count_fused(monkeypatch):
    calls = []
    orig = cpu_decode.run

    def run(*args, **kwargs):
        calls.append(args[1].shape)
        return orig(*args, **kwargs)
    monkeypatch.setattr(cpu_decode, "run", run)
    return calls


def _decode(model, ids, mask, prompt_len):
    """Prefill ids[:, :prompt_len], then feed the rest one token at a time; logits of every position."""
    with torch.no_grad():
        out = model(ids[:, :prompt_len], attention_mask=mask[:, :prompt_len], use_cache=True)
        logits, past = [out.logits], out.past_key_values
        for i in range(prompt_len, ids.shape[1]):
            out = model(ids[:, i:i + 1], attention_mask=mask[:, :i + 1], past_key_values=past, use_cache=True)
            logits.append(out.logits)
            past = out.past_key_values
    return torch.cat(logits, 1)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_fused_decode_matches_transformers_fp32(tmp_path, count_fused, kv_heads):
    import conftest
    conftest.make_hf_model(tmp_path, {"num_key_value_heads": kv_heads})
    hf = conftest.load_hf(tmp_path)
    ids, mask, position_ids = conftest.left_padded_batch((0, 3), seq_len=12)
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, position_ids=position_ids).logits
    ours = LlamaForCausalLM.from_pretrained(tmp_path, dtype="float32", backend="cpu")
    got = _decode(ours, ids, mask, prompt_len=6)
    # every decode step took the fused path, and so did the prefill when its B x T rows fit
    assert len(count_fused) == 6 + (ids.shape[0] * 6 <= cpu_decode.max_rows())
    real = mask.bool()
    assert conftest.max_rel_diff(got[real], want[real]) <= 1e-4


def test_fused_decode_bf16_within_budget(tmp_path, count_fused):
    import conftest
    conftest.make_hf_model(tmp_path, {"num_key_value_heads": 2})
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = conftest.load_hf(tmp_path)(ids).logits
        hf_low = conftest.load_hf(tmp_path, dtype=torch.bfloat16)(ids).logits
    got = _decode(LlamaForCausalLM.from_pretrained(tmp_path, dtype="bfloat16"), ids, mask, prompt_len=4)
    assert len(count_fused) == 7  # the 4-token prefill (B x T <= cpu_decode.max_rows()) and the 6 decode steps
    err, err_hf = (got.float() - want).abs().max().item(), (hf_low.float() - want).abs().max().item()
    assert err <= conftest.BF16_FACTOR * err_hf + conftest.BF16_SLACK * want.abs().max().item()


@pytest.mark.parametrize("quantize", ["int4", "int8"])
def test_fused_decode_quantized_equals_op_by_op(tmp_path, count_fused, quantize):
    import conftest
    conftest.make_hf_model(tmp_path, {"num_key_value_heads": 2})
    ids = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    fused = LlamaForCausalLM.from_pretrained(tmp_path, dtype="float32", quantize=quantize, group_size=32)
    got = _decode(fused, ids, mask, prompt_len=5)
    assert len(count_fused) == 4 + (3 * 5 <= cpu_decode.max_rows())   # the decode steps (and the prefill)
    ref = LlamaForCausalLM.from_pretrained(tmp_path, dtype="float32", quantize=quantize, group_size=32,
                                           backend="torch")
    want = _decode(ref, ids, mask, prompt_len=5)
    assert conftest.max_rel_diff(got, want) <= 1e-4


def test_fused_path_is_skipped_when_outputs_need_layers(tmp_path, count_fused):
    import conftest
    conftest.make_hf_model(tmp_path)
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype="float32")
    ids = torch.randint(0, 128, (1, 4))
    with torch.no_grad():
        out = model(ids, use_cache=True)
        before = len(count_fused)
        step = model(ids[:, :1], past_key_values=out.past_key_values, use_cache=True, output_hidden_states=True)
    assert len(step.hidden_states) == model.config.num_hidden_layers + 1 and len(count_fused) == before


def _step_logits(model, ids):
    """Logits of a decode step (the last token of ids against a cache of the others)."""
    with torch.no_grad():
        out = model(ids[:, :-1], use_cache=True)
        return model(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits


def _reference_copy(model):
    import copy
    return copy.deepcopy(model).set_backend("torch")


def test_decode_plan_is_built_once_and_follows_weight_changes(tmp_path, count_fused):
    """The validated C++ plan is reused across steps, and every way of changing the weights (re-quantizing a
    layer, assigning a new Parameter, swapping a tensor's data in place, .to(dtype)) gives the new weights'
    logits, never the old ones."""
    import conftest
    conftest.make_hf_model(tmp_path, {"num_key_value_heads": 2})
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype="float32")
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(5))
    _step_logits(model, ids)
    plan = cpu_decode._PLANS[model.model][3]
    _step_logits(model, ids)
    calls_per_step = 1 + (2 * 5 <= cpu_decode.max_rows())     # the decode step (and the 5-token prefill)
    assert cpu_decode._PLANS[model.model][3] is plan and len(count_fused) == 2 * calls_per_step

    layers = model.model.layers
    changes = [
        lambda: layers[1].mlp.down_proj.quantize_(4, group_size=32),
        lambda: setattr(layers[0].input_layernorm, "weight",
                        torch.nn.Parameter(torch.full_like(layers[0].input_layernorm.weight, 0.5),
                                           requires_grad=False)),
        lambda: setattr(layers[1].self_attn.o_proj.weight, "data", torch.randn_like(layers[1].self_attn.o_proj.weight)),
        lambda: setattr(layers[0].post_attention_layernorm.weight, "data",
                        torch.full_like(layers[0].post_attention_layernorm.weight, 2.0)),
    ]
    for change in changes:
        before = _step_logits(model, ids)
        change()
        got = _step_logits(model, ids)
        want = _step_logits(_reference_copy(model), ids)
        assert not torch.equal(got, before)
        assert conftest.max_rel_diff(got, want) <= 1e-4

    model.to(torch.bfloat16)
    got = _step_logits(model, ids)
    assert got.dtype == torch.bfloat16 and cpu_decode._PLANS[model.model][3] is not plan


def test_decode_plan_rejects_weights_broken_in_place(tmp_path):
    import conftest
    conftest.make_hf_model(tmp_path)
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype="float32")
    ids = torch.randint(0, 128, (1, 4))
    _step_logits(model, ids)
    norm = model.model.layers[1].input_layernorm.weight
    norm.data = torch.ones(norm.shape[0] + 1)   # same Parameter, now the wrong size
    with pytest.raises(RuntimeError, match="layer 1 input_layernorm must be"):
        _step_logits(model, ids)


def test_changing_one_models_weights_keeps_the_other_models_plan(tmp_path):
    """Weight versions are per model: re-quantizing a layer of one model rebuilds that model's plan only."""
    import conftest
    conftest.make_hf_model(tmp_path)
    a = LlamaForCausalLM.from_pretrained(tmp_path, dtype="float32")
    b = LlamaForCausalLM.from_pretrained(tmp_path, dtype="float32")
    ids = torch.randint(0, 128, (1, 4), generator=torch.Generator().manual_seed(3))
    _step_logits(a, ids)
    _step_logits(b, ids)
    plan_a, plan_b = cpu_decode._PLANS[a.model][3], cpu_decode._PLANS[b.model][3]
    a.model.layers[0].mlp.down_proj.quantize_(4, group_size=32)
    got_a = _step_logits(a, ids)
    _step_logits(b, ids)
    assert cpu_decode._PLANS[a.model][3] is not plan_a
    assert cpu_decode._PLANS[b.model][3] is plan_b
    assert conftest.max_rel_diff(got_a, _step_logits(_reference_copy(a), ids)) <= 1e-4


# ---- every weight form in the plan: ggml blocks (K-quants, Q5_0 / Q5_1) and GPTQ act-order -------------------

def _decode_both_ways(model, ids, prompt_len, monkeypatch):
    """The logits of _decode through the fused plan, then through the op-by-op path (the same CPU kernels)."""
    fused = _decode(model, ids, torch.ones_like(ids), prompt_len)
    with monkeypatch.context() as m:
        m.setattr(cpu_decode, "can_run", lambda *args, **kwargs: False)
        op_by_op = _decode(model, ids, torch.ones_like(ids), prompt_len)
    return fused, op_by_op


def _kquant_models(tmp_path):
    from kquant_util import write_mixed_gguf
    mixed = tmp_path / "mix.gguf"
    write_mixed_gguf(mixed)
    data = __import__("pathlib").Path(__file__).parent / "data"
    return [mixed, data / "kquant_Q4_K_M.gguf", data / "kquant_Q3_K_M.gguf"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_decode_of_block_weights_equals_op_by_op(tmp_path, count_fused, monkeypatch, dtype):
    """K-quant files (all seven block types, fused q/k/v and gate/up made of segments of different types, a tied
    Q6_K lm_head) decode through the plan. Exact: the plan calls the op-by-op path's kernels (kquant::linear,
    the norms, rotary, attention) on the same inputs in the same order, and adds the bias / rounds to bf16 as
    the kquant_linear op does."""
    for path in _kquant_models(tmp_path):
        model = LlamaForCausalLM.from_pretrained(path, dtype=dtype, backend="cpu")
        assert model.model.layers[0].self_attn.qkv_proj.kquant, path
        ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(6))
        count_fused.clear()
        fused, op_by_op = _decode_both_ways(model, ids, 5, monkeypatch)
        # the 10-row prefill (B x T <= cpu_max_gemv_rows) and every decode step ran the plan, none of the op-by-op run
        assert len(count_fused) == 5, path
        assert torch.equal(fused, op_by_op), path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_decode_of_act_order_gptq_equals_op_by_op(tmp_path, count_fused, monkeypatch, dtype):
    """GPTQ desc_act: the plan gathers each linear's input by its permutation (once per fused linear) and runs
    the quant_linear kernel, as the op-by-op path does after index_select: exact (same kernels, same inputs).
    Also against the reference backend, within the tolerance rule's fp32 budget."""
    import hf_quant_util as H

    import conftest
    H.write_checkpoint(tmp_path, H.tiny_llama(), "gptq", bits=4, group_size=32, desc_act=True)
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype=dtype, backend="cpu")
    perms = [lin.input_perm for layer in model.model.layers
             for lin in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                         layer.mlp.down_proj)]
    assert all(p is not None and not torch.equal(p, torch.arange(p.numel())) for p in perms)
    ids = torch.randint(0, model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(7))
    fused, op_by_op = _decode_both_ways(model, ids, 5, monkeypatch)
    assert len(count_fused) == 5     # the 15-row prefill (B x T <= cpu_max_gemv_rows) and the 4 decode steps
    assert torch.equal(fused, op_by_op)
    if dtype == torch.float32:
        ref = LlamaForCausalLM.from_pretrained(tmp_path, dtype=dtype, backend="torch")
        assert conftest.max_rel_diff(fused, _decode(ref, ids, torch.ones_like(ids), 5)) <= 1e-4


def test_decode_plan_rejects_a_broken_permutation(tmp_path):
    """An input_perm changed in place to an index outside [0, K) is an error, never an out-of-bounds read."""
    import hf_quant_util as H
    H.write_checkpoint(tmp_path, H.tiny_llama(), "gptq", bits=4, group_size=32, desc_act=True)
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype="float32", backend="cpu")
    ids = torch.randint(0, 128, (1, 4))
    _step_logits(model, ids)
    model.model.layers[1].mlp.down_proj.input_perm[3] = 10 ** 6
    with pytest.raises(RuntimeError, match="input_perm holds 1000000"):
        _step_logits(model, ids)


def test_decode_plan_names_bad_block_fields():
    """Block segments the plan cannot read are named at the first step, never read out of bounds."""
    from kquant_util import random_blocks

    from llama_fast import kquants
    norm = torch.ones(256)
    cos = sin = torch.zeros(8, 32)
    good = random_blocks("Q4_K", 1, 256)

    def step(blocks, types):
        plan = torch.classes.llama_fast.CpuDecodePlan(norm, 4, 2, 64, 1e-5)
        tensors = {"input_layernorm": norm, "post_attention_layernorm": norm}
        ints = {}
        for name, n, k in (("qkv_proj", 512, 256), ("o_proj", 256, 256), ("gate_up_proj", 512, 256),
                           ("down_proj", 256, 256)):
            for i, b in enumerate(blocks(n, k)):
                tensors[f"{name}.blocks.{i}"] = b
                if i < len(types):
                    ints[f"{name}.block_type.{i}"] = types[i]
        plan.add_layer(tensors, ints)
        cache = torch.zeros(1, 8, 2, 64)
        torch.ops.llama_fast.cpu_decode_step(plan, torch.zeros(1, 1, 256), [cache], [cache.clone()],
                                             torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long),
                                             torch.ones(1, dtype=torch.int32), 1, cos, sin, [], [])

    q4k = kquants.TYPE_IDS["Q4_K"]
    step(lambda n, k: [random_blocks("Q4_K", n, k)], [q4k])          # well formed: runs
    with pytest.raises(RuntimeError, match="unknown block type id 9"):
        step(lambda n, k: [random_blocks("Q4_K", n, k)], [9])
    with pytest.raises(RuntimeError, match=r"qkv_proj.blocks.0 must be contiguous uint8 \[rows, 144\]"):
        step(lambda n, k: [good[:, :100].contiguous()], [q4k])
    with pytest.raises(RuntimeError, match="one block_type per blocks tensor"):
        step(lambda n, k: [random_blocks("Q4_K", n, k)], [])


def _ragged_step(model, prompts, step_tokens):
    """Prefills each prompt into its own row of one cache, then runs one step in which row r feeds
    step_tokens[r] (left-padded to the longest; [] = a row of pads only): -> (logits [B, T, V], cache lengths)."""
    cache = model.new_cache(len(prompts), 64)
    lengths = []
    with torch.no_grad():
        for r, prompt in enumerate(prompts):
            model(torch.tensor([prompt]), past_key_values=cache.rows(r, r + 1), use_cache=True)
            lengths.append(len(prompt))
        cache.lengths.copy_(torch.tensor(lengths, dtype=torch.int32))
        cache.seen_tokens = max(lengths)
        width = max(len(t) for t in step_tokens)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for r, tokens in enumerate(step_tokens):
            if tokens:
                ids[r, width - len(tokens):] = torch.tensor(tokens)
                mask[r, width - len(tokens):] = 1
        logits = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits
    return logits, mask.bool(), cache.lengths.tolist()


@pytest.mark.parametrize("dtype", ["float32", "int4", "int8_kv"])
def test_padded_step_runs_fused_on_its_real_tokens(tmp_path, count_fused, dtype):
    """A serving step: one row's 20-token prompt chunk next to rows of one token and a row of pads only. B x T
    (4 x 20) exceeds the fused stack's rows, its real tokens (22) do not: the stack runs on those alone, and every
    real token's logits equal the op-by-op path's (which computes the pads too); the pad row's cache is untouched."""
    import conftest
    conftest.make_hf_model(tmp_path, {"num_key_value_heads": 2})
    assert 4 * 20 > cpu_decode.max_rows() >= 22
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (5, 3, 9, 4)]
    step_tokens = [[7], torch.randint(0, 128, (20,), generator=g).tolist(), [11], []]
    kw = {"int4": {"quantize": "int4", "group_size": 32}, "int8_kv": {"kv_cache_dtype": "int8"}}.get(dtype, {})
    fused = LlamaForCausalLM.from_pretrained(tmp_path, dtype="float32", **kw)
    ref = LlamaForCausalLM.from_pretrained(tmp_path, dtype="float32", backend="torch", **kw)
    got, real, lengths = _ragged_step(fused, prompts, step_tokens)
    assert tuple(count_fused[-1][:2]) == (4, 20)
    want, _, want_lengths = _ragged_step(ref, prompts, step_tokens)
    assert lengths == want_lengths == [6, 23, 10, 4]
    assert conftest.max_rel_diff(got[real], want[real]) <= 1e-4


def test_padded_step_with_too_many_real_tokens_runs_op_by_op(tmp_path, count_fused):
    import conftest
    conftest.make_hf_model(tmp_path, {"num_key_value_heads": 2})
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype="float32")
    rows = cpu_decode.max_rows() // 16 + 1                 # rows x 16 real tokens > max_rows
    tokens = [[3] * 16 for _ in range(rows)]
    tokens[0] = [3]                                         # one padded row
    _ragged_step(model, [[1, 2]] * rows, tokens)
    assert all(shape[0] * shape[1] <= cpu_decode.max_rows() for shape in count_fused)
