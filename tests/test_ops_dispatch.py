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
