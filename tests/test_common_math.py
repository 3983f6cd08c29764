"""CPU tests of the csrc/common math the CUDA kernels share (__host__ __device__ inline functions): a small
torch-free driver (tests/common/common_driver.cpp) is compiled with the host C++ compiler and its results
are compared with torch and with llama_fast.quant."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llama_fast import quant

ROOT = Path(__file__).resolve().parents[1]
CXX = os.environ.get("CXX", "g++")


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    if shutil.which(CXX) is None:
        pytest.skip(f"no host C++ compiler ({CXX}) to build the csrc/common driver")
    exe = tmp_path_factory.mktemp("common") / "common_driver"
    subprocess.run([CXX, "-std=c++17", "-O2", "-Wall", "-Werror", f"-I{ROOT / 'csrc'}",
                    str(ROOT / "tests" / "common" / "common_driver.cpp"), "-o", str(exe)], check=True)

    def run(mode: str, stdin: str = "") -> list[str]:
        out = subprocess.run([str(exe), mode], input=stdin, capture_output=True, text=True, check=True)
        return out.stdout.split()

    return run


def hex_floats(t: torch.Tensor) -> str:
    return " ".join(f"{u:08x}" for u in t.float().flatten().contiguous().view(torch.int32).numpy().astype(np.uint32))


def floats_from_hex(words: list[str]) -> torch.Tensor:
    return torch.from_numpy(np.array([int(w, 16) for w in words], dtype=np.uint32).view(np.float32).copy())


def interesting_floats() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 65504.0, 65519.99, 65520.0, 1e5, -1e5, 6.1e-5, 6.0e-8, 5.9e-8,
                            2.98e-8, 2.9802322e-08, 1e-10, 3.0e38, float("inf"), float("-inf"), float("nan"),
                            1.0009765625, 1.00048828125, 1.000732421875])
    wide = torch.exp(torch.empty(4000).uniform_(-30, 14, generator=g)) * torch.randn(4000, generator=g).sign()
    # Halfway cases between neighbouring fp16 values (round-to-even decides them).
    h = torch.randint(0, 0x7BFF, (2000,), generator=g, dtype=torch.int32).to(torch.int16).view(torch.float16)
    up = torch.from_numpy(np.nextafter(h.numpy(), np.float16(np.inf)))
    mids = ((h.double() + up.double()) / 2).float()  # exact in fp32
    return torch.cat([special, wide, h.float(), mids])


def test_half_bits_to_float_matches_torch_for_every_pattern(driver):
    ours = floats_from_hex(driver("half_to_float"))
    theirs = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    nan = theirs.isnan()
    assert torch.equal(ours.isnan(), nan)
    assert torch.equal(ours[~nan].view(torch.int32), theirs[~nan].view(torch.int32))


@pytest.mark.parametrize("dtype,mode", [(torch.float16, "float_to_half"), (torch.bfloat16, "float_to_bf16")])
def test_float_to_16bit_rounds_like_torch(driver, dtype, mode):
    x = interesting_floats()
    ours = torch.tensor([int(w, 16) for w in driver(mode, f"{x.numel()} {hex_floats(x)}")], dtype=torch.int32)
    theirs = x.to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
    nan = x.isnan()
    assert torch.equal(ours[~nan], theirs[~nan]), (x[~nan][ours[~nan] != theirs[~nan]])[:10]
    assert torch.all(torch.tensor([int(w, 16) for w in driver(mode, f"1 {hex_floats(x[nan][:1])}")]) & 0x7FFF
                     > (0x7C00 if dtype == torch.float16 else 0x7F80))


def test_int4_magic_conversion_decodes_the_serialized_nibble_order(driver):
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (64, 8), generator=g)
    codes[0] = torch.arange(8)
    codes[1] = 15
    packed = quant.pack_int4(codes)  # [64, 4] bytes, even element in the low nibble
    words = packed.contiguous().view(torch.int32).flatten().numpy().astype(np.uint32)
    out = np.array(driver("int4_words", f"{len(words)} " + " ".join(f"{w:08x}" for w in words)),
                   dtype=np.int64).reshape(64, 8, 2)
    expected = quant.QuantizedWeight(packed, torch.ones(64, 1), None, 4, 8).unpack().numpy()
    np.testing.assert_array_equal(out[..., 0], expected)  # the LOP3 magic-number path
    np.testing.assert_array_equal(out[..., 1], expected)  # quant::int4_code
    np.testing.assert_array_equal(expected, codes.numpy())


def test_dequant_value_matches_quantized_weight(driver):
    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(2))
    qw = quant.quantize(w, bits=4, group_size=16, scale_dtype=torch.float32)
    codes = qw.unpack().flatten()
    s = qw.scale.repeat_interleave(16, dim=1).flatten()
    o = qw.offset.repeat_interleave(16, dim=1).flatten()
    triples = " ".join(f"{int(c)} {hex_floats(sv.reshape(1))} {hex_floats(ov.reshape(1))}"
                       for c, sv, ov in zip(codes, s, o))
    ours = floats_from_hex(driver("dequant", f"{codes.numel()} {triples}"))
    torch.testing.assert_close(ours, qw.dequantize(torch.float32).flatten(), rtol=0, atol=0)


@pytest.mark.parametrize("n,d,chunk", [(1, 4, 1), (7, 3, 2), (83, 5, 16), (64, 2, 64), (50, 4, 7)])
def test_online_softmax_merge_is_exact_softmax(driver, n, d, chunk):
    g = torch.Generator().manual_seed(n * 31 + chunk)
    s = torch.randn(n, generator=g) * 4
    s[torch.rand(n, generator=g) < 0.3] = float("-inf")  # masked keys, possibly whole chunks
    s[n // 2] = 3.0  # at least one valid key
    v = torch.randn(n, d, generator=g)
    ours = floats_from_hex(driver("softmax", f"{n} {d} {chunk} {hex_floats(s)} {hex_floats(v)}"))
    expected = (torch.softmax(s.double(), 0) @ v.double()).float()
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_online_softmax_with_no_valid_key_gives_zeros(driver):
    s = torch.full((9,), float("-inf"))
    v = torch.randn(9, 3)
    ours = floats_from_hex(driver("softmax", f"9 3 4 {hex_floats(s)} {hex_floats(v)}"))
    assert torch.equal(ours, torch.zeros(3))


def test_rotate_pair_matches_the_reference_rotary(driver):
    from llama_fast.ops import reference

    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 1, 1, 2 * 500, generator=g)
    ang = torch.randn(1, 1, 1, 500, generator=g) * 10
    c, s = ang.cos(), ang.sin()
    x1, x2 = x[..., :500].flatten(), x[..., 500:].flatten()
    quads = " ".join(hex_floats(torch.stack([a, b, cc, ss])) for a, b, cc, ss in
                     zip(x1, x2, c.flatten(), s.flatten()))
    out = floats_from_hex(driver("rotary", f"500 {quads}")).reshape(500, 2)
    expected = reference._rotate(x, c, s).flatten()
    torch.testing.assert_close(torch.cat([out[:, 0], out[:, 1]]), expected, rtol=0, atol=0)


def test_silu_mul_matches_torch(driver):
    g = torch.Generator().manual_seed(4)
    gate = torch.cat([torch.randn(1000, generator=g) * 8, torch.tensor([0.0, -100.0, 100.0, -88.0, 89.0])])
    up = torch.randn(gate.numel(), generator=g)
    pairs = " ".join(hex_floats(torch.stack([a, b])) for a, b in zip(gate, up))
    ours = floats_from_hex(driver("silu_mul", f"{gate.numel()} {pairs}"))
    torch.testing.assert_close(ours, F.silu(gate) * up, rtol=2e-6, atol=1e-7)
