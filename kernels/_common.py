"""Shared plumbing of the Triton backend: interpreter detection, autotuning, input checks, and the registry
of kernels that .ci/check_triton_cubins.py compiles for sm_80 and sm_90."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import triton

# Every kernel module imports this one first. Loaded under another name (`import kernels.rotary` with the
# repository root on sys.path), it would be the start of a second copy of the kernel modules, whose
# torch.library.custom_op calls destroy the llama_fast_triton ops that llama_fast.kernels holds (see
# __init__.py): refuse it with a clear error instead.
if __name__ != "llama_fast.kernels._common":
    raise ImportError(f"the Triton kernels must be imported as llama_fast.kernels, not as "
                      f"{__name__.rsplit('.', 1)[0]!r} (a second copy would redefine the llama_fast_triton ops)")

# The interpreter (TRITON_INTERPRET=1, read by triton at import) runs kernels on CPU tensors with numpy.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def autotune(configs: list, key: list[str]):
    """triton.autotune over `configs` on a GPU. The interpreter cannot time kernels (and each launch costs
    seconds there), so it gets the first config only: list the safest, most general config first."""
    return triton.autotune(configs=configs[:1] if INTERPRET else configs, key=key)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (108 on an A100, 132 on an H100 SXM); 4 under the interpreter,
    small so that the tests exercise the multi-CTA paths on small shapes."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def m_bucket(m: int) -> int:
    """Autotune key for a row count: re-tune per power of two, not per distinct prompt length."""
    return triton.next_power_of_2(max(m, 1))


def check(condition: bool, message: str, error=ValueError) -> None:
    if not condition:
        raise error(message)


def check_float(name: str, t: torch.Tensor) -> None:
    check(t.dtype in FLOAT_DTYPES, f"{name} must be float32, float16 or bfloat16, got {t.dtype}", TypeError)


def check_same_device(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    check(len(set(devices.values())) <= 1, f"tensors are on different devices: {devices}")


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    check(t.stride(-1) == 1, f"{name} must be contiguous in its last dimension, got strides {tuple(t.stride())}")


@dataclass
class CompileCase:
    """One kernel for the compile check: its @triton.jit function, the types of its runtime arguments in
    triton's signature syntax ("*fp16", "i32", "fp32"), the constexprs fixed by the launcher, and the
    autotune configs whose meta-parameters complete them."""
    name: str
    fn: object
    signature: dict
    constexprs: dict
    configs: list = field(default_factory=lambda: [triton.Config({})])


def jit_function(kernel):
    """The @triton.jit function beneath an autotuner (or the function itself)."""
    return getattr(kernel, "fn", kernel)
