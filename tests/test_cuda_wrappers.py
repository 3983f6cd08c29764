"""llama_fast.ops.cuda's Python side on the CPU, with the CUDA kernels replaced by fakes that enforce what the
C++ checks (csrc/cuda/ops_cuda.cpp) enforce: positions given densely, kv_lens validated without a host sync,
quantization scales converted to the activation dtype once per weight, not per call."""
from __future__ import annotations

import pytest
import torch

from llama_fast.ops import cuda
from llama_fast.quant import quantize


class FakeKernels:
    """Records the kernel calls; rotary_ insists on contiguous positions as ops_cuda.cpp does."""

    def __init__(self):
        self.calls = []

    def rotary_(self, q, k, positions, cos, sin):
        if not positions.is_contiguous():
            raise RuntimeError("rotary_: positions must be contiguous")
        self.calls.append(("rotary_", positions))

    def attention(self, q, k, v, causal, kv_lens, scale):
        self.calls.append(("attention", kv_lens))
        return torch.zeros_like(q)

    def quant_linear(self, x, qweight, scale, offset, bits, group_size, bias):
        self.calls.append(("quant_linear", scale, offset, bias))
        return x.new_zeros(x.shape[:-1] + (qweight.shape[0],))


@pytest.fixture
def kernels(monkeypatch):
    fake = FakeKernels()
    monkeypatch.setattr(cuda, "_kernels", fake)
    return fake


def test_rotary_takes_position_ids_broadcast_over_the_batch(kernels):
    q, k = torch.randn(3, 5, 4, 64), torch.randn(3, 5, 2, 64)
    positions = torch.arange(5)[None].expand(3, 5)      # what modeling makes of position_ids [1, T]
    cos = sin = torch.zeros(16, 32)
    cuda.rotary(q, k, positions, cos, sin)
    assert torch.equal(kernels.calls[0][1], positions)


def test_attention_checks_kv_lens_against_the_keys_given_on_the_device(kernels):
    q, k = torch.randn(2, 1, 4, 64), torch.randn(2, 16, 2, 64)
    cuda.attention(q, k, k, True, torch.tensor([16, 3], dtype=torch.int32))
    # torch._assert_async raises at once on CPU tensors; on a GPU it is a device-side assert (no sync)
    with pytest.raises(RuntimeError, match="kv_lens must lie in"):
        cuda.attention(q, k, k, True, torch.tensor([17, 3], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="kv_lens must lie in"):
        cuda.attention(q, k, k, True, torch.tensor([-1, 3], dtype=torch.int32))


def test_other_head_dims_are_named_as_unsupported():
    assert cuda.unsupported_attention(torch.randn(1, 1, 2, 96), None, None) is not None
    assert cuda.unsupported_attention(torch.randn(1, 1, 2, 128), None, None) is None


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
def test_scales_in_another_dtype_are_converted_once(kernels, scale_dtype):
    qw = quantize(torch.randn(32, 64), 4, 32, scale_dtype=scale_dtype)
    x = torch.randn(2, 64)
    cuda.quant_linear(x, qw)
    cuda.quant_linear(x, qw)
    (_, s1, o1, _), (_, s2, o2, _) = kernels.calls
    assert s1.dtype == o1.dtype == torch.float32
    assert s1 is s2 and o1 is o2            # the same converted tensors: made once, not per call
    torch.testing.assert_close(s1, qw.scale.float(), rtol=0, atol=0)   # exact: a widening conversion


def test_scales_already_in_the_activation_dtype_are_used_as_they_are(kernels):
    qw = quantize(torch.randn(32, 64), 4, 32)
    cuda.quant_linear(torch.randn(1, 64), qw)
    assert kernels.calls[0][1] is qw.scale
