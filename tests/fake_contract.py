"""The fake (meta) contract of the ops (llama_fast/ops/fake.py, docs/KERNELS.md): for every op, the outputs of
the fake under FakeTensorMode have the shapes, dtypes and strides of the real kernel's outputs on the same
inputs. Shared by tests/ops/test_fake.py (the C++ ops, llama_fast::) and tests/triton/test_fake.py
(llama_fast_triton::)."""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from llama_fast import quant


def cases(dtype: torch.dtype) -> list[tuple[str, tuple]]:
    """(op name, args) per op, with non-contiguous views where the ops accept them (q / k / v split from qkv)."""
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    qkv = rnd(2, 3, 8, 16)
    q, k, v = qkv.split([4, 2, 2], dim=2)
    qw = quant.quantize(torch.randn(24, 64, generator=g), bits=4, group_size=32)
    ang = torch.rand(10, 8, generator=g)
    return [
        ("rms_norm", (rnd(3, 5, 40), rnd(40), 1e-6)),
        ("fused_add_rms_norm", (rnd(3, 40), rnd(3, 40), rnd(40), 1e-6)),
        ("rotary_", (q.clone(), k.clone(), torch.arange(3).repeat(2, 1), ang.cos(), ang.sin())),
        ("attention", (q, k, v, True, torch.tensor([3, 2], dtype=torch.int32), 0.25)),
        ("attention", (q.contiguous(), rnd(2, 7, 2, 16), rnd(2, 7, 2, 16), False, None, 0.25)),
        ("silu_and_mul", (rnd(2, 3, 48),)),
        ("quant_linear", (rnd(2, 5, 64), qw.qweight, qw.scale, qw.offset, 4, 32, rnd(24))),
        ("store_kv_", (rnd(2, 6, 2, 16), rnd(2, 6, 2, 16), k.contiguous(), v.contiguous(),
                       torch.tensor([[0, 1, 2], [-1, 3, 4]]))),
    ]


def _layout(out):
    if out is None:
        return None
    if isinstance(out, (tuple, list)):
        return [_layout(o) for o in out]
    return (tuple(out.shape), out.dtype, out.stride() if out.is_contiguous() else "non-contiguous")


def check_fakes(namespace, dtype: torch.dtype) -> None:
    """Every op of `namespace` (torch.ops.llama_fast or torch.ops.llama_fast_triton): fake layout == real."""
    for name, args in cases(dtype):
        op = getattr(namespace, name)
        real = op(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            fake = op(*fake_args)
        assert _layout(fake) == _layout(real), f"{name} ({dtype}): fake {_layout(fake)} != real {_layout(real)}"
