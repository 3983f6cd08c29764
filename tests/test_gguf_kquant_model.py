"""Whole models from GGUF files holding K-quant / Q5_0 / Q5_1 tensors: every linear keeps the file's blocks
(KQuantWeight, fused q/k/v and gate/up as row segments of their own types), a tied quantized token table serves
lm_head natively, and the logits equal those of the same model with the weights dequantized (gguf.quants'
numbers). The real llama.cpp-quantized fixtures (tests/data/kquant_*.gguf) are checked against transformers'
own GGUF loading in test_gguf_kquant_fixtures.py."""
import gguf
import numpy as np
import pytest
import torch
from kquant_util import random_blocks, write_mixed_gguf

from llama_fast import LlamaForCausalLM, kquants
from llama_fast.formats.gguf import GGUFError, read_gguf

import gguf_util as G

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def kquant_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("kq") / "mix.gguf"
    config, types = write_mixed_gguf(path)
    return path, config, types


def test_tensors_keep_the_files_blocks(kquant_file):
    path, config, types = kquant_file
    _, tensors = read_gguf(path)
    reader = gguf.GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}
    for name, value in tensors:
        if name == "lm_head.weight":
            assert isinstance(value, kquants.KQuantWeight) and value.kinds == ("Q6_K",)
            continue
        if name not in types:
            continue
        t = by_name[G.gguf_name(name)]
        want = gguf.quants.dequantize(t.data, t.tensor_type)
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            want = G.permute_back(want, heads)
        assert isinstance(value, kquants.KQuantWeight) and value.kinds == (types[name],), name
        assert value.nbytes == t.n_bytes        # the file's bytes, no more
        assert np.array_equal(value.dequantize().numpy().view(np.uint32), want.view(np.uint32)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_runs_natively_and_matches_its_dequantized_self(kquant_file, dtype):
    path, config, types = kquant_file
    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype, backend="cpu")
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    assert attn.qkv_proj.kquant_kinds == ("Q4_K", "Q6_K")        # q+k merged, v its own segment
    assert mlp.gate_up_proj.kquant_kinds == ("Q5_0", "Q5_1")
    assert model.lm_head.kquant_kinds == ("Q6_K",)              # the tied table, natively
    dense = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, dequantize=True, backend="torch")
    ids = torch.randint(0, config["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = dense(ids).logits.double()
        got = model(ids).logits.double()
        # decode steps (the op-by-op path with the GEMV kernels) against the same positions of a full forward
        out = model.generate(ids[:1, :4], max_new_tokens=5, do_sample=False)
        ref = dense.generate(ids[:1, :4], max_new_tokens=5, do_sample=False)
    err = (got - want).abs().max().item()
    if dtype == torch.float32:
        assert err <= 1e-4 * want.abs().max().item()
        assert torch.equal(out, ref)
    else:  # bf16: within 2x the error of the same model dense in bf16 (PyTorch's own bf16 computation)
        low = LlamaForCausalLM.from_pretrained(path, dtype=dtype, dequantize=True, backend="torch")
        with torch.no_grad():
            base = (low(ids).logits.double() - want).abs().max().item()
        assert err <= 2 * base


def test_unsupported_type_is_named(tmp_path):
    config = G.tiny_config(hidden_size=64, intermediate_size=128)
    sd = G.random_state_dict(config)
    name = "model.layers.0.mlp.up_proj.weight"
    rows, cols = sd[name].shape
    sd[name] = np.random.default_rng(0).integers(0, 256, (rows, cols // 32 * 18), dtype=np.uint8)
    path = tmp_path / "iq.gguf"
    G.write_llama_gguf(path, config, sd, {name: Q.IQ4_NL})
    with pytest.raises(GGUFError, match="blk.0.ffn_up.weight has type IQ4_NL; supported types are .*Q4_K"):
        LlamaForCausalLM.from_pretrained(path)


def test_save_pretrained_refuses_block_weights(kquant_file, tmp_path):
    model = LlamaForCausalLM.from_pretrained(kquant_file[0])
    with pytest.raises(ValueError, match="ggml K-quant blocks"):
        model.save_pretrained(tmp_path / "out")


def test_q8_0_part_of_a_fused_ggml_layer_stays_native(tmp_path):
    """SmolLM2's Q4_K_M file keeps q/k in Q5_0 and v in Q8_0 (llama.cpp's fallbacks for 576-wide rows): the Q8_0
    part joins the fused layer as Q8_0 blocks of the file's bytes (kquants.from_q8_0) instead of making the whole
    layer dense, and the logits equal those of the dequantized model."""
    config = G.tiny_config(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2)
    sd = G.random_state_dict(config)
    p = "model.layers.0."
    types = {p + "self_attn.q_proj.weight": "Q5_0", p + "self_attn.k_proj.weight": "Q5_0",
             p + "self_attn.v_proj.weight": "Q8_0", p + "mlp.gate_proj.weight": "Q8_0",
             p + "mlp.up_proj.weight": "Q5_1", p + "self_attn.o_proj.weight": "Q8_0"}
    tensors = {name: random_blocks(types[name], *value.shape, seed=i).numpy() if name in types else value
               for i, (name, value) in enumerate(sd.items())}
    path = tmp_path / "q8_mix.gguf"
    G.write_llama_gguf(path, config, tensors, {k: Q[v] for k, v in types.items()})
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, backend="cpu")
    layer = model.model.layers[0]
    assert layer.self_attn.qkv_proj.kquant_kinds == ("Q5_0", "Q8_0")
    assert layer.mlp.gate_up_proj.kquant_kinds == ("Q8_0", "Q5_1")
    assert layer.self_attn.o_proj.kquant_kinds is None and layer.self_attn.o_proj.bits == 8   # all Q8_0: as before
    dense = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, dequantize=True, backend="torch")
    ids = torch.randint(0, config["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = dense(ids).logits.double()
        got = model(ids).logits.double()
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()
