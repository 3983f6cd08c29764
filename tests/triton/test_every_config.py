"""Every autotune config gives the right answer, not only the first one the interpreter picks by default:
each config is forced in turn (a one-config autotuner runs it without timing) on one small shape. The
compile check (.ci/check_triton_cubins.py) covers the same configs on sm_80 / sm_90."""
import pytest
import torch
from tolerance import assert_fp32_close

from llama_fast import quant
from llama_fast.kernels import kernel_module
from llama_fast.ops import reference

attn_mod = kernel_module("attention")
quant_mod = kernel_module("quant_linear")
rms_mod = kernel_module("rms_norm")
silu_mod = kernel_module("silu_and_mul")


def _ids(configs):
    return [",".join(f"{k}={v}" for k, v in c.kwargs.items()) + f",w={c.num_warps},s={c.num_stages}"
            for c in configs]


def _force(monkeypatch, autotuner, config):
    monkeypatch.setattr(autotuner, "configs", [config])
    monkeypatch.setattr(autotuner, "cache", {})


@pytest.mark.parametrize("config", quant_mod.GEMV_CONFIGS, ids=_ids(quant_mod.GEMV_CONFIGS))
def test_quant_gemv_configs(monkeypatch, config):
    _force(monkeypatch, quant_mod._gemv, config)
    torch.manual_seed(0)
    x, w = torch.randn(3, 512), torch.randn(40, 512)
    for qw in (quant.quantize(w, bits=4, group_size=128), quant.quantize(w, bits=8, group_size=32)):
        assert_fp32_close(quant_mod.quant_linear(x, qw), reference.quant_linear(x, qw))


@pytest.mark.parametrize("config", quant_mod.GEMM_CONFIGS, ids=_ids(quant_mod.GEMM_CONFIGS))
def test_quant_gemm_configs(monkeypatch, config):
    _force(monkeypatch, quant_mod._gemm, config)
    torch.manual_seed(0)
    x, w = torch.randn(20, 256), torch.randn(40, 256)
    for qw in (quant.quantize(w, bits=4, group_size=128), quant.quantize(w, bits=8, group_size=32)):
        assert_fp32_close(quant_mod.quant_linear(x, qw), reference.quant_linear(x, qw))


@pytest.mark.parametrize("config", attn_mod.PREFILL_CONFIGS_SMALL_D, ids=_ids(attn_mod.PREFILL_CONFIGS_SMALL_D))
def test_prefill_configs(monkeypatch, config):
    for autotuner in (attn_mod._prefill_small_d, attn_mod._prefill_any_d):
        _force(monkeypatch, autotuner, config)
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 40, 4, 64), torch.randn(1, 70, 2, 64), torch.randn(1, 70, 2, 64)
    lens = torch.tensor([61], dtype=torch.int32)
    assert_fp32_close(attn_mod.prefill_attention(q, k, v, True, lens), reference.attention(q, k, v, True, lens))


@pytest.mark.parametrize("config", attn_mod.DECODE_CONFIGS, ids=_ids(attn_mod.DECODE_CONFIGS))
def test_decode_configs(monkeypatch, config):
    _force(monkeypatch, attn_mod._decode_split_kernel, config)
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 1, 8, 64), torch.randn(2, 150, 2, 64), torch.randn(2, 150, 2, 64)
    lens = torch.tensor([150, 77], dtype=torch.int32)
    out = attn_mod.decode_attention(q, k, v, True, lens, num_splits=2)
    assert_fp32_close(out, reference.attention(q, k, v, True, lens))


@pytest.mark.parametrize("config", silu_mod.SILU_CONFIGS, ids=_ids(silu_mod.SILU_CONFIGS))
def test_silu_and_mul_configs(monkeypatch, config):
    _force(monkeypatch, silu_mod._silu_and_mul_kernel, config)
    gu = torch.randn(3, 2 * 3000, generator=torch.Generator().manual_seed(0))
    assert_fp32_close(silu_mod.silu_and_mul(gu), reference.silu_and_mul(gu))


@pytest.mark.parametrize("config", rms_mod.CONFIGS, ids=_ids(rms_mod.CONFIGS))
def test_rms_norm_configs(monkeypatch, config):
    _force(monkeypatch, rms_mod._rms_norm_kernel, config)
    torch.manual_seed(0)
    x, r, w = torch.randn(3, 3000), torch.randn(3, 3000), torch.randn(3000)
    out, res = rms_mod.fused_add_rms_norm(x, r, w, 1e-6)
    ref_out, ref_res = reference.fused_add_rms_norm(x, r, w, 1e-6)
    assert_fp32_close(out, ref_out)
    assert res.equal(ref_res)
