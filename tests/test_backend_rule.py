"""The backend fallback rule (llama_fast.ops._backend): a backend asked for by name runs or raises saying why;
backend=None may fall back to a slower one but warns once, naming what it passed over and why. The GPU is
faked: the "cuda" and "triton" backends are declared available and nothing is executed."""
from __future__ import annotations

import warnings

import pytest
import torch

from llama_fast import kernels as triton_backend
from llama_fast import ops
from llama_fast.ops import _backend, cuda

GPU = torch.device("cuda", 0)


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(_backend, "_resolved", {})
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.setattr(cuda, "unavailable_reason", lambda device: None)
    monkeypatch.setattr(triton_backend, "unavailable_reason", lambda device: None)
    if not hasattr(triton_backend, "attention"):
        pytest.skip("triton is not installed")


def q_of(head_dim):
    return torch.empty(1, 1, 4, head_dim, device="meta")


def test_explicit_cuda_raises_for_a_head_dim_its_kernels_lack(fake_gpu):
    q = q_of(96)
    with pytest.raises(ops.BackendUnavailableError, match="backend 'cuda' cannot run attention here: .*not 96"):
        _backend.resolve_for("attention", "cuda", GPU, torch.float16, q, q, q, True, None, None)


def test_default_backend_falls_back_for_that_head_dim_and_warns_once(fake_gpu):
    q = q_of(96)
    with pytest.warns(ops.BackendFallbackWarning, match="runs on backend 'triton', not on 'cuda': .*not 96"):
        fn = _backend.resolve_for("attention", None, GPU, torch.float16, q, q, q, True, None, None)
    assert fn is triton_backend.attention
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _backend.resolve_for("attention", None, GPU, torch.float16, q, q, q, True, None, None)


def test_default_backend_takes_cuda_where_it_covers_the_shape_silently(fake_gpu):
    q = q_of(128)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.resolve_for("attention", None, GPU, torch.float16, q, q, q, True, None, None) is cuda.attention


def test_default_backend_names_a_missing_cuda_build(fake_gpu, monkeypatch):
    monkeypatch.setattr(cuda, "unavailable_reason", lambda device: "llama_fast._C was built without CUDA kernels")
    with pytest.warns(ops.BackendFallbackWarning, match="'cuda': llama_fast._C was built without CUDA kernels"):
        assert _backend.resolve("rms_norm", None, GPU, torch.float16) is triton_backend.rms_norm


def test_explicit_cuda_without_the_build_raises(fake_gpu, monkeypatch):
    monkeypatch.setattr(cuda, "unavailable_reason", lambda device: "llama_fast._C was built without CUDA kernels")
    with pytest.raises(ops.BackendUnavailableError, match="built without CUDA kernels"):
        _backend.resolve("rms_norm", "cuda", GPU, torch.float16)


def test_fp16_on_the_cpu_says_why_it_runs_on_the_reference(monkeypatch):
    monkeypatch.setattr(_backend, "_resolved", {})
    monkeypatch.setattr(_backend, "_warned", set())
    with pytest.warns(ops.BackendFallbackWarning, match="'cpu': its kernels do not take torch.float16"):
        _backend.resolve("rms_norm", None, torch.device("cpu"), torch.float16)
