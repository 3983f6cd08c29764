"""Dense linear (decode GEMV for <= 8 rows, GEMM beyond) against F.linear."""
import pytest
import torch

from llama_fast import ops

from op_fixtures import at_each_thread_count, backend, matches_reference  # noqa: F401  (pytest fixtures)


@pytest.mark.parametrize("m,n,k", [(1, 1, 7), (1, 769, 576), (3, 83, 1536), (8, 960, 83), (5, 7, 64), (20, 83, 576)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_reference(backend, m, n, k, dtype, bias, matches_reference):
    name, device = backend
    g = torch.Generator().manual_seed(m * 1000 + n)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    out = ops.linear(x.to(device), w.to(device), None if b is None else b.to(device), backend=name)
    want = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double()).float()
    matches_reference(out, want, torch.nn.functional.linear(x, w, b))


def test_linear_keeps_leading_dims_cpu():
    x, w = torch.randn(2, 1, 83), torch.randn(7, 83)
    out = ops.linear(x, w, backend="cpu")
    assert out.shape == (2, 1, 7)
    torch.testing.assert_close(out, x @ w.t(), rtol=1e-5, atol=1e-5)


def test_linear_bad_inputs_cpu():
    with pytest.raises(RuntimeError, match="must equal weight's K"):
        ops.linear(torch.randn(1, 8), torch.randn(4, 9), backend="cpu")
    with pytest.raises(RuntimeError, match="weight dtype"):
        ops.linear(torch.randn(1, 8), torch.randn(4, 8).bfloat16(), backend="cpu")
    with pytest.raises(RuntimeError, match="bias must be \\[4\\]"):
        ops.linear(torch.randn(1, 8), torch.randn(4, 8), torch.randn(5), backend="cpu")
    with pytest.raises(RuntimeError, match="weight must be contiguous"):
        ops.linear(torch.randn(1, 8), torch.randn(8, 4).t(), backend="cpu")


def test_opcheck_linear():
    torch.library.opcheck(torch.ops.llama_fast.cpu_linear.default, (torch.randn(2, 83), torch.randn(7, 83), None))
    torch.library.opcheck(torch.ops.llama_fast.cpu_linear.default,
                          (torch.randn(2, 83), torch.randn(7, 83), torch.randn(7)))


# The decode GEMVs give each thread one contiguous range of weight rows (thread_pool.h one_range_per_thread, a
# multiple of 4 rows): row counts that leave the last range short or empty (n < 4 x threads), on 1 and 2 threads.
# Each output is one row's dot product, computed the same way whichever thread owns the row, so the outputs of
# every thread count are bitwise equal (and match the reference).
@pytest.mark.parametrize("n,k", [(1, 40), (5, 576), (7, 33), (13, 576), (770, 64)])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_row_ranges_per_thread(backend, n, k, m, dtype, matches_reference):
    name, device = backend
    g = torch.Generator().manual_seed(n * 10 + k)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    outs = at_each_thread_count(lambda: ops.linear(x, w, backend=name))
    want = torch.nn.functional.linear(x.double(), w.double()).float()
    matches_reference(outs[0], want, torch.nn.functional.linear(x, w))
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
