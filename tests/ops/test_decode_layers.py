"""cpu_decode_step on a CpuDecodePlan (the whole decoder stack of a decode step in one C++ call) against the same
stack composed from the reference ops, for dense fp32/bf16 and int4/int8 weights, GQA, batch > 1 with ragged cache
lengths; and the plan's checks of its named per-layer fields."""
import pytest
import torch

from llama_fast import quant
from llama_fast.ops import cpu, reference

pytest.importorskip("llama_fast._C")


def _stack(layers, hidden, heads, kv_heads, head_dim, inter, dtype, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: (torch.randn(*s, generator=g) * 0.1)  # noqa: E731
    linears, norms = [], []
    for _ in range(layers):
        norms.append([(1 + rnd(hidden)).to(dtype), (1 + rnd(hidden)).to(dtype)])
        ls = []
        for n, k in [((heads + 2 * kv_heads) * head_dim, hidden), (hidden, heads * head_dim), (2 * inter, hidden),
                     (hidden, inter)]:
            w = rnd(n, k)
            ls.append(w.to(dtype) if bits == 0 else quant.quantize(w, bits=bits, group_size=32,
                                                                   scale_dtype=torch.float16))
        linears.append(ls)
    return linears, norms, (1 + rnd(hidden)).to(dtype)


_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def _fields(ls, ns):
    """One layer's named fields, as LlamaDecoderLayer.decode_fields builds them."""
    tensors, ints = {"input_layernorm": ns[0], "post_attention_layernorm": ns[1]}, {}
    for name, w in zip(_LINEARS, ls):
        if isinstance(w, torch.Tensor):
            tensors[f"{name}.weight"] = w
            ints[f"{name}.bits"] = 0
        else:
            parts = {"qweight": w.qweight, "scales": w.scale, "offsets": w.offset}
            tensors.update({f"{name}.{k}": t for k, t in parts.items() if t is not None})
            ints.update({f"{name}.bits": w.bits, f"{name}.group_size": w.group_size})
    return tensors, ints


def _plan(linears, norms, final, heads, kv_heads, d, eps, edit=None):
    plan = torch.classes.llama_fast.CpuDecodePlan(final, heads, kv_heads, d, eps)
    for ls, ns in zip(linears, norms):
        tensors, ints = _fields(ls, ns)
        if edit is not None:
            edit(tensors, ints)
        plan.add_layer(tensors, ints)
    return plan


def _step(plan, *args):
    return torch.ops.llama_fast.cpu_decode_step(plan, *args, [], [])   # a float cache: no int8 scales


def _reference_step(x, linears, norms, final, kc, vc, pos, slots, kv_lens, span, cos, sin, heads, kv_heads, d, eps):
    lin = lambda h, w: reference.linear(h, w) if isinstance(w, torch.Tensor) else reference.quant_linear(h, w)  # noqa
    b, t, _ = x.shape
    residual, out = x, None
    for l, (ls, ns) in enumerate(zip(linears, norms)):
        if out is None:
            h = reference.rms_norm(residual, ns[0], eps)
        else:
            h, residual = reference.fused_add_rms_norm(out, residual, ns[0], eps)
        qkv = lin(h, ls[0]).view(b, t, heads + 2 * kv_heads, d)
        q, k, v = [p.contiguous() for p in qkv.split([heads, kv_heads, kv_heads], dim=2)]
        reference.rotary(q, k, pos, cos, sin)
        reference.store_kv(kc[l], vc[l], k, v, slots)
        a = reference.attention(q, kc[l][:, :span], vc[l][:, :span], True, kv_lens)
        h, residual = reference.fused_add_rms_norm(lin(a.reshape(b, t, -1), ls[1]), residual, ns[1], eps)
        out = lin(reference.silu_and_mul(lin(h, ls[2])), ls[3])
    return reference.fused_add_rms_norm(out, residual, final, eps)[0]


@pytest.mark.parametrize("dtype,bits", [(torch.float32, 0), (torch.bfloat16, 0), (torch.float32, 4),
                                        (torch.float32, 8), (torch.bfloat16, 4)])
# Batches past the GEMV kernels' register blocks (9, 17 rows: the tiled multi-row kernels) and a prefill chunk
# riding in a step (1 x 24 tokens).
@pytest.mark.parametrize("b,t", [(1, 1), (3, 1), (2, 2), (9, 1), (17, 1), (1, 24)])
def test_decode_layers_matches_composed_reference(dtype, bits, b, t):
    layers, hidden, heads, kv_heads, d, inter, eps = 3, 96, 6, 2, 64, 160, 1e-5
    linears, norms, final = _stack(layers, hidden, heads, kv_heads, d, inter, dtype, bits)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(b, t, hidden, generator=g).to(dtype)
    lengths = torch.tensor([(30, 3, 17)[i % 3] for i in range(b)], dtype=torch.int32)  # ragged cache fill
    cap = int(lengths.max()) + t + 2
    kc = [torch.randn(b, cap, kv_heads, d, generator=g).to(dtype) for _ in range(layers)]
    vc = [torch.randn(b, cap, kv_heads, d, generator=g).to(dtype) for _ in range(layers)]
    slots = lengths[:, None] + torch.arange(t, dtype=torch.int32)[None]
    kv_lens = lengths + t
    span = int(kv_lens.max())
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2).double() / d)
    ang = torch.arange(64).double()[:, None] * inv
    cos, sin = ang.cos().float(), ang.sin().float()
    pos = slots.long()
    kc_ref, vc_ref = [c.clone() for c in kc], [c.clone() for c in vc]
    want = _reference_step(x.float() if dtype == torch.bfloat16 and bits == 0 else x, linears, norms, final,
                           kc_ref, vc_ref, pos, slots, kv_lens, span, cos, sin, heads, kv_heads, d, eps) \
        if dtype == torch.float32 else None
    plan = _plan(linears, norms, final, heads, kv_heads, d, eps)
    out = _step(plan, x, kc, vc, pos, slots, kv_lens, span, cos, sin)
    assert out.shape == x.shape and out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
        for l in range(layers):
            torch.testing.assert_close(kc[l], kc_ref[l], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(vc[l], vc_ref[l], rtol=1e-5, atol=1e-5)
    else:
        # bf16: the same stack through the CPU ops one by one (each tested against its error budget) must agree
        # with the fused call bit for bit, since both run the same kernels in the same order.
        kc2, vc2 = [c.clone() for c in kc_ref], [c.clone() for c in vc_ref]
        step = _composed_cpu_ops(x, linears, norms, final, kc2, vc2, pos, slots, kv_lens, span, cos, sin, heads,
                                 kv_heads, d, eps)
        assert torch.equal(out, step)


def _composed_cpu_ops(x, linears, norms, final, kc, vc, pos, slots, kv_lens, span, cos, sin, heads, kv_heads, d, eps):
    lin = lambda h, w: cpu.linear(h, w) if isinstance(w, torch.Tensor) else cpu.quant_linear(h, w)  # noqa: E731
    b, t, _ = x.shape
    residual, out = x, None
    for l, (ls, ns) in enumerate(zip(linears, norms)):
        if out is None:
            h = cpu.rms_norm(residual, ns[0], eps)
        else:
            h, residual = cpu.fused_add_rms_norm(out, residual, ns[0], eps)
        qkv = lin(h, ls[0]).view(b, t, heads + 2 * kv_heads, d)
        q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=2)
        cpu.rotary(q, k, pos, cos, sin)
        cpu.store_kv(kc[l], vc[l], k, v, slots)
        a = cpu.attention(q, kc[l][:, :span], vc[l][:, :span], True, kv_lens)
        h, residual = cpu.fused_add_rms_norm(lin(a.reshape(b, t, -1), ls[1]), residual, ns[1], eps)
        out = lin(cpu.silu_and_mul(lin(h, ls[2])), ls[3])
    return cpu.fused_add_rms_norm(out, residual, final, eps)[0]


def test_decode_layers_bad_inputs():
    linears, norms, final = _stack(1, 64, 2, 1, 32, 64, torch.float32, 0)
    plan = _plan(linears, norms, final, 2, 1, 32, 1e-6)
    x = torch.randn(1, 1, 64)
    kc, vc = [torch.zeros(1, 8, 1, 32)], [torch.zeros(1, 8, 1, 32)]
    pos = torch.zeros(1, 1, dtype=torch.long)
    cos, sin = torch.ones(8, 16), torch.zeros(8, 16)
    kv = torch.tensor([1], dtype=torch.int32)
    out = _step(plan, x, kc, vc, pos, pos, kv, 1, cos, sin)
    assert out.shape == x.shape
    with pytest.raises(RuntimeError, match="past the end of the cache"):
        _step(plan, x, kc, vc, pos, pos + 8, kv, 1, cos, sin)
    rows = torch.ops.llama_fast.cpu_max_gemv_rows()
    big = rows + 1           # a well-formed step of one row too many (no pads: every token is real)
    big_pos = torch.zeros(big, 1, dtype=torch.long)
    with pytest.raises(RuntimeError, match=f"B x T must be 1..{rows}"):
        _step(plan, torch.randn(big, 1, 64), [torch.zeros(big, 8, 1, 32)], [torch.zeros(big, 8, 1, 32)], big_pos,
              big_pos, torch.ones(big, dtype=torch.int32), 1, cos, sin)
    # with pads (slot -1) the limit is on the real tokens
    pad_slots = torch.full((big, 1), -1, dtype=torch.long)
    with pytest.raises(RuntimeError, match=f"1..{rows} real tokens, got 0"):
        _step(plan, torch.randn(big, 1, 64), [torch.zeros(big, 8, 1, 32)], [torch.zeros(big, 8, 1, 32)], big_pos,
              pad_slots, torch.zeros(big, dtype=torch.int32), 1, cos, sin)
    with pytest.raises(RuntimeError, match="pad .slot -1. after a real token"):
        _step(plan, torch.randn(1, 2, 64), kc, vc, torch.zeros(1, 2, dtype=torch.long),
              torch.tensor([[0, -1]]), kv, 1, cos, sin)
    with pytest.raises(RuntimeError, match="activations. dtype"):
        _step(plan, x.bfloat16(), kc, vc, pos, pos, kv, 1, cos, sin)
    with pytest.raises(RuntimeError, match="kv_lens must lie"):
        _step(plan, x, kc, vc, pos, pos, torch.tensor([5], dtype=torch.int32), 1, cos, sin)


@pytest.mark.parametrize("edit,message", [
    (lambda t, i: t.pop("o_proj.weight"), "o_proj has no weight"),
    (lambda t, i: t.pop("input_layernorm"), "input_layernorm must be"),
    (lambda t, i: t.__setitem__("down_proj.scales", torch.ones(64, 1)), "dense .bits 0. but has quantized fields"),
    (lambda t, i: i.__setitem__("qkv_proj.bits", 3), "qkv_proj.bits must be 0 .dense., 4 or 8"),
    (lambda t, i: t.__setitem__("gate_up_proj.wieght", t["gate_up_proj.weight"]), "unknown tensor field"),
    (lambda t, i: t.__setitem__("mlp.weight", t["gate_up_proj.weight"]), "unknown field 'mlp.weight'"),
    (lambda t, i: i.__setitem__("o_proj.group", 32), "unknown int field"),
])
def test_decode_plan_rejects_bad_fields(edit, message):
    """The plan reads its weights by name: a missing, unknown or inconsistent field is a clear error at the first
    step, never a tensor read in the wrong role."""
    linears, norms, final = _stack(1, 64, 2, 1, 32, 64, torch.float32, 0)
    x = torch.randn(1, 1, 64)
    kc, vc = [torch.zeros(1, 8, 1, 32)], [torch.zeros(1, 8, 1, 32)]
    pos = torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(RuntimeError, match=message):
        plan = _plan(linears, norms, final, 2, 1, 32, 1e-6, edit)
        _step(plan, x, kc, vc, pos, pos, torch.tensor([1], dtype=torch.int32), 1, torch.ones(8, 16), torch.zeros(8, 16))
