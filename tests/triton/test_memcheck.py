"""The suite-wide bounds check (_memcheck.py, installed by conftest.py) catches what it is there for."""
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpreterError


@triton.jit
def _copy_kernel(X, Y, n_load, n_store, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n_load, other=0.0)
    tl.store(Y + offs, x, mask=offs < n_store)



def test_in_bounds_accesses_pass():
    x, y = torch.randn(7), torch.zeros(7)
    _copy_kernel[(1,)](x, y, 7, 7, BLOCK=8)
    assert y.equal(x)


@pytest.mark.parametrize("n_load,n_store,kind", [(8, 7, "load"), (7, 8, "store")])
def test_one_element_past_the_end_is_caught(n_load, n_store, kind):
    x, y = torch.randn(7), torch.zeros(7)
    with pytest.raises(InterpreterError, match=f"_copy_kernel: {kind} outside every tensor argument in 1 of 8 lanes"):
        _copy_kernel[(1,)](x, y, n_load, n_store, BLOCK=8)
