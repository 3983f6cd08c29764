"""cpu_argmax (csrc/cpu/argmax.cpp): generate()'s greedy choice on the CPU. Its answer is an index, so it must
equal torch.argmax exactly (the same first maximal index, a NaN winning over any number) at every instruction-set
level, whatever the row length against the kernel's vectors and blocks of 256."""
import pytest
import torch

from op_fixtures import backend  # noqa: F401  (pytest fixture)

LENGTHS = [1, 2, 15, 16, 17, 255, 256, 257, 1000, 49152]


def argmax(scores):
    return torch.ops.llama_fast.cpu_argmax(scores)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", LENGTHS)
def test_random_rows_match_torch(backend, dtype, n):
    g = torch.Generator().manual_seed(n)
    scores = (torch.randn(5, n, generator=g) * 8).to(dtype)
    assert torch.equal(argmax(scores), scores.argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", LENGTHS)
def test_ties_nan_and_infinities(backend, dtype, n):
    """Each row plants its case at positions spread over the row (inside a vector, at block edges, in the tail)."""
    rows = []
    for first in sorted({0, n // 3, n // 2, max(0, n - 17), n - 1}):
        later = min(n - 1, first + 1 + (n - first) // 2)
        tie = torch.zeros(n)
        tie[first] = tie[later] = 5.0                      # two equal maxima: the first wins
        nan_after_max = torch.zeros(n)
        nan_after_max[first] = 9.0
        nan_after_max[later] = float("nan")                # a NaN wins over any number, even an earlier maximum
        if later == first:
            nan_after_max[first] = float("nan")
        two_nans = torch.zeros(n)
        two_nans[later] = float("nan")
        two_nans[first] = float("nan")                     # the first NaN
        pos_inf = torch.full((n,), -1.0)
        pos_inf[later] = float("inf")
        signed_zeros = torch.full((n,), -3.0)
        signed_zeros[first] = -0.0
        signed_zeros[later] = 0.0                          # -0 == +0: the first of them
        rows += [tie, nan_after_max, two_nans, pos_inf, signed_zeros]
    rows += [torch.full((n,), float("-inf")),              # all -inf: index 0
             torch.full((n,), float("-inf")).index_fill(0, torch.tensor([n - 1]), 1.0),
             torch.full((n,), 3.0)]
    scores = torch.stack(rows).to(dtype)
    assert torch.equal(argmax(scores), scores.argmax(-1))


def test_views_and_thread_counts(backend):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 3, 4099, generator=g)
    last = logits[:, -1, :]                                # generate()'s view: row stride 3 x 4099
    assert torch.equal(argmax(last), last.argmax(-1))
    transposed = torch.randn(300, 7, generator=g).t()      # a strided last dimension: copied first
    assert torch.equal(argmax(transposed), transposed.argmax(-1))
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert torch.equal(argmax(logits[:, 0, :]), logits[:, 0, :].argmax(-1))
    finally:
        torch.set_num_threads(before)
    assert argmax(torch.empty(0, 5)).shape == (0,)


def test_bad_inputs():
    with pytest.raises(RuntimeError, match="2-D"):
        argmax(torch.randn(7))
    with pytest.raises(RuntimeError, match="no columns"):
        argmax(torch.empty(3, 0))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        argmax(torch.randn(2, 4).half())


def test_opcheck():
    torch.library.opcheck(torch.ops.llama_fast.cpu_argmax.default, (torch.randn(3, 38),))
