import pytest
import torch

from llama_fast import ops


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        ops.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-6, backend="tpu")


def test_cuda_backend_on_cpu_tensor_says_why():
    with pytest.raises(ops.BackendUnavailableError, match="CUDA tensors only"):
        ops.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-6, backend="cuda")


def test_default_backend_on_cpu_is_the_extension():
    assert ops.default_backend("cpu") == "cpu"


def test_default_backend_sends_fp16_on_cpu_to_the_reference():
    x, w = torch.randn(3, 16, dtype=torch.float16), torch.randn(16, dtype=torch.float16)
    # Exact by construction: backend=None must pick the reference itself for fp16 on the CPU (same function).
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), ops.rms_norm(x, w, 1e-6, backend="torch"), rtol=0, atol=0)


def test_explicit_cpu_backend_names_an_unsupported_dtype():
    x, w = torch.randn(3, 16, dtype=torch.float16), torch.randn(16, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.rms_norm(x, w, 1e-6, backend="cpu")
