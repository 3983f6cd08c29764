"""float16 checkpoints on the CPU (issue 14, item 3): the CPU kernels take float32 and bfloat16, so a float16
model bound for them loads in float32 with one notice (never silently onto the slow reference ops); the
conversion is exact (tests/test_modeling.py::test_logits_fp16_within_budget compares the model with
transformers' float16 model under the tolerance rule)."""
import warnings

import pytest
import torch

from llama_fast import LlamaForCausalLM, _native
from llama_fast.loading import Float16OnCpuWarning

from conftest import make_hf_model

pytestmark = pytest.mark.skipif(_native.extension() is None, reason="the CPU kernels are not built")


def _fp16_checkpoint(directory):
    """A random tiny transformers model saved in float16 (config torch_dtype float16, as Llama-2 ships)."""
    ref = make_hf_model(directory / "fp32")
    ref.to(torch.float16).save_pretrained(directory / "fp16")
    return directory / "fp16", ref


@pytest.mark.parametrize("dtype", ["auto", "float16"])
@pytest.mark.parametrize("backend", [None, "cpu"])
def test_fp16_checkpoint_loads_as_fp32_with_one_notice(tmp_path, dtype, backend):
    path, _ = _fp16_checkpoint(tmp_path)
    with pytest.warns(Float16OnCpuWarning, match="float16 weights run as float32 on the CPU kernels") as rec:
        model = LlamaForCausalLM.from_pretrained(path, dtype=dtype, backend=backend)
    assert len([w for w in rec if issubclass(w.category, Float16OnCpuWarning)]) == 1
    assert model.dtype == torch.float32
    # exact by construction: every float16 value is a float32 value, so the conversion loses nothing
    kept = LlamaForCausalLM.from_pretrained(path, dtype="float16", backend="torch")
    for (name, got), (_, want) in zip(model.state_dict().items(), kept.state_dict().items()):
        assert want.dtype == torch.float16 and torch.equal(got, want.float()), name


def test_reference_backend_and_other_dtypes_keep_their_dtype(tmp_path):
    path, _ = _fp16_checkpoint(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Float16OnCpuWarning)
        assert LlamaForCausalLM.from_pretrained(path, backend="torch").dtype == torch.float16
        assert LlamaForCausalLM.from_pretrained(path, dtype="bfloat16").dtype == torch.bfloat16
        assert LlamaForCausalLM.from_pretrained(path, dtype="float32").dtype == torch.float32


def test_every_op_of_the_converted_model_runs_on_the_cpu_kernels(tmp_path):
    # what the notice is for: the model's dtype is one every CPU kernel takes, so backend=None picks them all
    # (the numbers against transformers' float16 model: tests/test_modeling.py::test_logits_fp16_within_budget)
    from llama_fast.ops import _backend, cpu
    path, _ = _fp16_checkpoint(tmp_path)
    with pytest.warns(Float16OnCpuWarning):
        model = LlamaForCausalLM.from_pretrained(path)
    for op in ("rms_norm", "fused_add_rms_norm", "rotary", "attention", "silu_and_mul", "linear", "store_kv"):
        assert _backend.resolve(op, None, torch.device("cpu"), model.dtype) is getattr(cpu, op), op
