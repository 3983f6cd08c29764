import pytest
import torch

from llama_fast import kernels
from llama_fast.ops import reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_matches_reference_and_skips_padding(dtype):
    torch.manual_seed(0)
    b, t, s, h, d = 2, 3, 11, 3, 24
    kv = torch.randn(b, t, 2, h, d).to(dtype)                    # strided k and v views of one tensor
    k, v = kv[:, :, 0], kv[:, :, 1]
    slots = torch.tensor([[-1, 4, 5], [8, 9, 10]])
    caches = [torch.randn(b, s, h, d).to(dtype) for _ in range(2)]
    expected = [c.clone() for c in caches]
    kernels.store_kv(*caches, k, v, slots)
    reference.store_kv(*expected, k, v, slots)
    assert caches[0].equal(expected[0]) and caches[1].equal(expected[1])


def test_slot_past_the_cache_is_an_error():
    cache = torch.zeros(1, 4, 2, 8)
    k = torch.randn(1, 1, 2, 8)
    with pytest.raises(IndexError, match="past the cache length 4"):
        kernels.store_kv(cache, cache.clone(), k, k, torch.tensor([[4]]))
