"""GPTQ, AWQ and compressed-tensors checkpoints, written here from a tiny random Llama by packing its weights
as each format defines (tests/hf_quant_util.py), loaded natively:
(a) every quantized linear dequantizes to exactly the format's formula (small integer codes and zeros times
    fp16 / bf16 scales are exact in fp32, and the readers keep offsets in fp32 when the scale dtype would
    round them: llama_fast.formats.zero_point),
(b) logits and greedy generation equal transformers' on the formula's dense weights (fp32, the tolerance of
    the other model tests; greedy tokens with conftest's near-tie rule), on the C++ CPU kernels and on the
    reference,
(c) the quantized kernels of each backend agree with the reference on such weights: tests/ops/
    test_quant_linear_formats.py (and tests/triton/test_quant_linear.py under the interpreter),
and save_pretrained writes llama_fast's format that reloads exactly; unsupported variants raise errors."""
import json

import hf_quant_util as H
import pytest
import torch

from llama_fast import LlamaForCausalLM
from llama_fast.linear import Linear
from llama_fast.loading import CheckpointError, _targets

from conftest import assert_greedy_agrees

transformers = pytest.importorskip("transformers")

# (format, writer options): each GPTQ knob (bits, group size incl. -1, sym, desc_act, v1 / v2), AWQ in both
# spellings with a module left dense, compressed-tensors W4A16 / W8A16, sym / asym, group / channel.
CASES = {
    "gptq4-g32-asym-v1": ("gptq", dict(bits=4, group_size=32)),
    "gptq4-g32-sym-actorder": ("gptq", dict(bits=4, group_size=32, symmetric=True, desc_act=True)),
    "gptq4-perchannel-v2": ("gptq", dict(bits=4, group_size=-1, v1=False)),
    "gptq8-g64-sym-actorder": ("gptq", dict(bits=8, group_size=64, symmetric=True, desc_act=True)),
    "gptq8-g32-asym-v2": ("gptq", dict(bits=8, group_size=32, v1=False)),
    "awq-g32-dense-down": ("awq", dict(group_size=32, dense_modules=("model.layers.1.mlp.down_proj",))),
    "awq-g64-autoawq": ("awq", dict(group_size=64, awq_spelling="autoawq")),
    "ct-w4a16-sym-g32": ("compressed-tensors", dict(bits=4, group_size=32, symmetric=True,
                                                    scale_dtype=torch.bfloat16)),
    "ct-w4a16-asym-channel": ("compressed-tensors", dict(bits=4, symmetric=False, strategy="channel")),
    "ct-w8a16-sym-channel": ("compressed-tensors", dict(bits=8, symmetric=True, strategy="channel",
                                                        scale_dtype=torch.bfloat16)),
    "ct-w8a16-asym-g64": ("compressed-tensors", dict(bits=8, group_size=64, symmetric=False,
                                                     dense_modules=("model.layers.0.self_attn.o_proj",))),
}


@pytest.fixture(scope="module", params=list(CASES))
def checkpoint(request, tmp_path_factory):
    fmt, options = CASES[request.param]
    hf = H.tiny_llama(seed=len(request.param))
    directory = tmp_path_factory.mktemp(request.param)
    expected = H.write_checkpoint(directory, hf, fmt, **options)
    return directory, hf, expected, options


def dequantized_part(model, name: str) -> torch.Tensor:
    """The fp32 dequantized weight of the transformers linear `name` inside our (fused) layer."""
    targets, by_hf = _targets(model)
    pname, part = by_hf[name]
    target = targets[pname]
    r0, r1 = target.rows[part]
    return target.module.quantized_weight().dequantize(torch.float32)[r0:r1]


def reference_model(hf, expected):
    """transformers on the formula's dense weights."""
    ref = H.tiny_llama()
    ref.load_state_dict({**hf.state_dict(), **{k: v.float() for k, v in expected.items()}})
    return ref


def ids(n=19, seed=0):
    return torch.randint(0, H.SMALL["vocab_size"], (2, n), generator=torch.Generator().manual_seed(seed))


def test_weights_are_the_formula_and_the_model_is_transformers(checkpoint):
    directory, hf, expected, options = checkpoint
    model = LlamaForCausalLM.from_pretrained(directory, dtype="float32")
    bits = options.get("bits", 4)
    for name, want in expected.items():
        got = dequantized_part(model, name)
        assert torch.equal(got.double(), want), name                                      # (a)
    dense = set(options.get("dense_modules", ()))
    for name, m in model.named_modules():
        if isinstance(m, Linear) and name != "lm_head":
            fused_dense = any(d.startswith(name.rpartition(".")[0] + ".") and d.rpartition(".")[2] in
                              ("o_proj", "down_proj") and d.endswith(name.rpartition(".")[2]) for d in dense)
            assert m.quantized != fused_dense and (fused_dense or m.bits == bits), name  # native, file's bits

    reference = reference_model(hf, expected)
    x = ids()
    with torch.no_grad():
        want = reference(x).logits
        for backend_name in (None, "torch"):                                              # (b)
            model.set_backend(backend_name)
            got = model(x).logits
            assert (got - want).abs().max() <= 1e-4 * want.abs().max(), backend_name
    model.set_backend(None)
    prompt = ids(7, seed=1)
    ours = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    theirs = reference.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0,
                                return_dict_in_generate=True, output_logits=True)
    assert_greedy_agrees(ours, theirs, prompt.shape[1], rel_tol=1e-4)


def test_save_pretrained_reloads_exactly(checkpoint, tmp_path):
    directory, _, _, _ = checkpoint
    model = LlamaForCausalLM.from_pretrained(directory, dtype="float32")
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["quant_method"] == "llama_fast"
    back = LlamaForCausalLM.from_pretrained(tmp_path, dtype="float32")
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    x = ids(seed=2)
    with torch.no_grad():
        assert torch.equal(model(x).logits, back(x).logits)


def test_act_order_layers_gather_their_inputs(tmp_path):
    """desc_act: a real permutation per layer, shared by the layers that read one input (fused), and kept
    through the fp16 model the config asks for."""
    expected = H.write_checkpoint(tmp_path, H.tiny_llama(), "gptq", bits=4, group_size=32, desc_act=True)
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype="float32")
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.input_perm is not None and not torch.equal(qkv.input_perm, torch.arange(qkv.in_features))
    assert model.model.layers[0].mlp.down_proj.input_perm is not None
    assert len(expected) == 14


def test_gptq_sidecar_quantize_config(tmp_path):
    hf = H.tiny_llama(seed=4)
    expected = H.write_checkpoint(tmp_path, hf, "gptq", bits=4, group_size=64, sidecar=True)
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype="float32", backend="torch")
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(dequantized_part(model, name).double(), expected[name])


def _rewrite_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"].update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("fmt,changes,message", [
    ("gptq", dict(bits=3), "GPTQ with bits=3 is not supported"),
    ("gptq", dict(bits=2), "GPTQ with bits=2 is not supported"),
    ("gptq", dict(checkpoint_format="marlin"), "checkpoint_format 'marlin' is not supported"),
    ("gptq", dict(is_marlin_format=True), "checkpoint_format 'marlin' is not supported"),
    ("awq", dict(version="gemv"), "AWQ version 'gemv' is not supported"),
    ("awq", dict(version="exllama"), "AWQ version 'exllama' is not supported"),
    ("awq", dict(zero_point=False), "zero_point=false is not supported"),
    ("compressed-tensors", dict(format="float-quantized"), "format 'float-quantized' is not supported"),
    ("compressed-tensors", dict(kv_cache_scheme={"num_bits": 8}), "kv_cache_scheme"),
    ("compressed-tensors", dict(sparsity_config={"format": "sparse-24-bitmask"}), "sparsity format"),
    ("compressed-tensors", dict(transform_config={"config_groups": {}}), "transform_config"),
])
def test_unsupported_variants_are_named(tmp_path, fmt, changes, message):
    H.write_checkpoint(tmp_path, H.tiny_llama(num_hidden_layers=1), fmt, bits=4, group_size=32)
    _rewrite_config(tmp_path, **changes)
    if fmt == "compressed-tensors" and "format" in changes:      # the group's own format wins over the top-level
        cfg = json.loads((tmp_path / "config.json").read_text())
        del cfg["quantization_config"]["config_groups"]["group_0"]["format"]
        (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        LlamaForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("weights,acts,message", [
    ({"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
     {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True},
     "activation quantization is not supported"),
    ({"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}, None,
     "float weights of 8 bits are not supported"),
    ({"num_bits": 4, "type": "int", "symmetric": True, "strategy": "block"}, None,
     "weight strategy 'block' is not supported"),
])
def test_compressed_tensors_schemes_we_do_not_run(tmp_path, weights, acts, message):
    H.write_checkpoint(tmp_path, H.tiny_llama(num_hidden_layers=1), "compressed-tensors", bits=4, group_size=32)
    cfg = json.loads((tmp_path / "config.json").read_text())
    group = cfg["quantization_config"]["config_groups"]["group_0"]
    group["weights"], group["input_activations"] = weights, acts
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        LlamaForCausalLM.from_pretrained(tmp_path)


def test_fused_layers_with_different_act_orders_are_refused(tmp_path):
    H.write_checkpoint(tmp_path, H.tiny_llama(num_hidden_layers=1), "gptq", bits=4, group_size=32, desc_act=True,
                       act_order_seeds={"model.layers.0.self_attn.k_proj": 77})
    with pytest.raises(CheckpointError, match="permute their input features differently"):
        LlamaForCausalLM.from_pretrained(tmp_path)


def test_malformed_parts_are_named(tmp_path):
    from safetensors import safe_open

    from llama_fast.formats import safetensors as safetensors_format
    H.write_checkpoint(tmp_path, H.tiny_llama(num_hidden_layers=1), "gptq", bits=4, group_size=32, desc_act=True)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        items = {n: f.get_tensor(n) for n in f.keys()}
    bad = dict(items)
    bad["model.layers.0.mlp.down_proj.g_idx"] = torch.zeros(256, dtype=torch.int32)   # every feature in group 0
    safetensors_format.write(tmp_path / "model.safetensors", sorted(bad.items()))
    with pytest.raises(CheckpointError, match="down_proj: g_idx does not give every group 32 input features"):
        LlamaForCausalLM.from_pretrained(tmp_path)
    bad = dict(items)
    bad["model.layers.0.mlp.up_proj.scales"] = bad["model.layers.0.mlp.up_proj.scales"][:2]
    safetensors_format.write(tmp_path / "model.safetensors", sorted(bad.items()))
    with pytest.raises(CheckpointError, match="up_proj: GPTQ parts do not fit together"):
        LlamaForCausalLM.from_pretrained(tmp_path)
    bad = dict(items)
    del bad["model.layers.0.mlp.up_proj.qzeros"]
    safetensors_format.write(tmp_path / "model.safetensors", sorted(bad.items()))
    with pytest.raises(CheckpointError, match="up_proj.qzeros is missing"):
        LlamaForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("case", ["gptq4-g32-sym-actorder", "ct-w4a16-sym-g32", "ct-w8a16-asym-g64"])
def test_bf16_model_within_the_bf16_rule(tmp_path, case):
    """bf16 activations on the file's fp16 / bf16 / fp32 scales: error vs the fp32 oracle within the bf16 rule
    of the model tests (at most BF16_FACTOR x transformers-bf16's error on the same weights, plus slack)."""
    from conftest import BF16_FACTOR, BF16_SLACK
    fmt, options = CASES[case]
    hf = H.tiny_llama(seed=5)
    expected = H.write_checkpoint(tmp_path, hf, fmt, **options)
    reference = reference_model(hf, expected)
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype="bfloat16")
    x = ids(seed=3)
    with torch.no_grad():
        oracle = reference(x).logits
        err_hf = float((reference.to(torch.bfloat16)(x).logits.float() - oracle).abs().max())
        got = model(x).logits
    assert got.dtype == torch.bfloat16
    err = float((got.float() - oracle).abs().max())
    assert 0 < err <= BF16_FACTOR * err_hf + BF16_SLACK * float(oracle.abs().max())
    out = model.generate(x[:1, :5], max_new_tokens=4, do_sample=False, eos_token_id=[])   # decode steps run too
    assert out.shape == (1, 9)
