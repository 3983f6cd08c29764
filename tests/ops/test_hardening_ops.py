"""Issue 17's op catalogue: NaN/inf never silently turned finite, int64 kv_lens range-checked before
narrowing, quant_linear with K = 0 defined like F.linear, in-place rotary refusing overlapping memory."""
import pytest
import torch
import torch.nn.functional as F

from llama_fast import ops

from op_fixtures import backend  # noqa: F401  (the parametrized fixture)


def _qkv(b, tq, tk, hq, hkv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, tq, hq, d, generator=g).to(dtype), torch.randn(b, tk, hkv, d, generator=g).to(dtype),
            torch.randn(b, tk, hkv, d, generator=g).to(dtype))


# (tq, tk): decode over a short cache, decode split over many keys (split-K merge), prefill (many rows)
SHAPES = [(1, 40), (1, 600), (24, 24), (4, 300)]


@pytest.mark.parametrize("tq, tk", SHAPES)
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_and_inf_propagate_like_the_reference(backend, tq, tk, where, value, dtype):
    """Was: the CPU kernel turned a NaN into zeros (std::max drops NaN, `l > 0 ? 1/l : 0`)."""
    name, device = backend
    q, k, v = _qkv(2, tq, tk, 4, 2, 64, dtype)
    {"q": q, "k": k, "v": v}[where][1, 0, 1, 5] = value     # one element of batch 1
    kv_lens = torch.tensor([tk, tk], dtype=torch.int32)
    ref = ops.attention(q, k, v, True, kv_lens, backend="torch")
    out = ops.attention(q.to(device), k.to(device), v.to(device), True, kv_lens.to(device), backend=name).cpu()
    if value != value:
        assert torch.isnan(ref).any(), "a NaN input makes some reference output NaN"
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), (torch.isnan(out).sum(), torch.isnan(ref).sum())
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), finite)
    assert torch.isfinite(out[0]).all()          # batch 0 is untouched


def test_padded_rows_still_give_zeros(backend):
    name, device = backend
    q, k, v = _qkv(2, 3, 8, 4, 2, 64, torch.float32)
    kv_lens = torch.tensor([8, 1], dtype=torch.int32)     # row 1: queries 0 and 1 see no key (left padding)
    out = ops.attention(q.to(device), k.to(device), v.to(device), True, kv_lens.to(device), backend=name).cpu()
    ref = ops.attention(q, k, v, True, kv_lens, backend="torch")
    assert torch.equal(out[1, :2], torch.zeros_like(out[1, :2])) and torch.equal(ref[1, :2], out[1, :2])


def test_model_with_one_nan_weight_gives_nan_logits_on_every_backend():
    """Was: finite logits (and fluent text) on "cpu", NaN on "torch"."""
    from llama_fast import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.layers[0].self_attn.qkv_proj.weight[3, 7] = float("nan")
    ids = torch.tensor([[1, 2, 3, 4]])
    ref = model.set_backend("torch")(ids).logits
    out = model.set_backend("cpu")(ids).logits
    assert torch.isnan(ref).all()
    assert torch.equal(torch.isnan(out), torch.isnan(ref))


def test_int64_kv_lens_are_range_checked_before_narrowing():
    """Was: 2^32 + 2 was narrowed to 2 and accepted."""
    q, k, v = _qkv(1, 1, 8, 4, 2, 64, torch.float32)
    with pytest.raises(RuntimeError, match=r"kv_lens must lie in \[0, 8\], got \[4294967298, 4294967298\]"):
        ops.attention(q, k, v, True, torch.tensor([2 ** 32 + 2]), backend="cpu")
    with pytest.raises(RuntimeError, match=r"kv_lens must lie in \[0, 8\]"):
        ops.attention(q, k, v, True, torch.tensor([-2 ** 32 + 2]), backend="cpu")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 300])          # the GEMV, any-rows and prefill paths
def test_quant_linear_with_k_zero_is_zeros_plus_bias(bits, with_bias, rows):
    """Was: uninitialised memory, bias ignored (CPU); x.numel() / 0 (CUDA)."""
    n = 16
    qweight = torch.zeros(n, 0, dtype=torch.uint8 if bits == 4 else torch.int8)
    scale = torch.ones(n, 0)
    bias = torch.randn(n) if with_bias else None
    x = torch.randn(rows, 0)
    out = torch.ops.llama_fast.quant_linear(x, qweight, scale, None, bits, 32, bias)
    expected = F.linear(x, torch.zeros(n, 0), bias)     # F.linear's answer: an empty sum is 0, plus the bias
    assert torch.equal(out, expected)


def test_rotary_refuses_heads_that_share_memory():
    """Was: an expanded q (one row per head in memory) was rotated once per head."""
    d = 16
    cos, sin = torch.randn(32, d // 2), torch.randn(32, d // 2)
    positions = torch.tensor([[3, 4]])
    q = torch.randn(1, 2, 1, d).expand(1, 2, 4, d)
    k = torch.randn(1, 2, 2, d)
    with pytest.raises(RuntimeError, match="must not have elements that share memory"):
        ops.rotary(q, k, positions, cos, sin, backend="cpu")
    with pytest.raises(RuntimeError, match="must not have elements that share memory"):
        ops.rotary(torch.randn(1, 2, 4, d), torch.randn(1, 2, 1, d).expand(1, 2, 2, d), positions, cos, sin,
                   backend="cpu")
