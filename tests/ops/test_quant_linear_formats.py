"""quant_linear of every backend on weights the GPTQ / AWQ / compressed-tensors readers build from packed
tensors (tests/hf_quant_util.py): act-order input permutations, int8 with zero points, fp32 scales and
offsets, bf16 scales; against the fp64 oracle with the tolerance of op_fixtures."""
import hf_quant_util as H
import pytest
import torch

from llama_fast import ops
from llama_fast.formats import awq, compressed_tensors, gptq

from op_fixtures import backend, matches_reference  # noqa: F401  (pytest fixtures)


def format_weights():
    """(id, QuantizedWeight) built by the readers from packed tensors."""
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(0))
    out = []
    for bits, act_order, v1 in ((4, 5, True), (8, 6, False), (8, None, True)):
        codes, scale, zero, g_idx = H.quantize_weight(w, bits, 64, False, act_order)
        parts, _ = H.pack_gptq(codes, scale, zero, g_idx, bits, v1)
        config = {"bits": bits, "group_size": 64, "checkpoint_format": "gptq" if v1 else "gptq_v2"}
        out.append((f"gptq{bits}{'-actorder' if act_order else ''}", gptq.GptqFormat(config).weight("w", parts)))
    codes, scale, zero, _ = H.quantize_weight(w, 4, 32, False)
    out.append(("awq", awq.AwqFormat({"bits": 4, "group_size": 32}).weight("w", H.pack_awq(codes, scale, zero))))
    codes, scale, zero, _ = H.quantize_weight(w, 4, 128, True, scale_dtype=torch.bfloat16)
    config = {"config_groups": {"g": {"targets": ["Linear"], "format": "pack-quantized", "weights": {
        "num_bits": 4, "symmetric": True, "strategy": "group", "group_size": 128}}}}
    out.append(("ct-w4a16", compressed_tensors.CompressedTensorsFormat(config).weight(
        "w", H.pack_compressed_tensors(codes, scale, zero, 4, True, "group"))))
    return out


FORMAT_WEIGHTS = format_weights()


@pytest.mark.parametrize("case", FORMAT_WEIGHTS, ids=[c[0] for c in FORMAT_WEIGHTS])
@pytest.mark.parametrize("m", [1, 5, 19])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_kernels_on_format_weights(backend, case, m, dtype, matches_reference):
    name, device = backend
    _, qw = case
    x = torch.randn(m, qw.shape[1], generator=torch.Generator().manual_seed(m)).to(dtype)
    out = ops.quant_linear(x.to(device), qw.to(device), backend=name)
    want = x.double() @ qw.dequantize(torch.float64).t()
    matches_reference(out, want.float(), torch.nn.functional.linear(x, qw.dequantize(dtype)))
    # the reference op agrees as well (it undoes the permutation instead of gathering x)
    matches_reference(ops.quant_linear(x, qw, backend="torch"), want.float(),
                      torch.nn.functional.linear(x, qw.dequantize(dtype)))


