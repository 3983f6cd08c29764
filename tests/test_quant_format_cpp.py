"""csrc/common/quant_format.h (the C++/CUDA view of the format) against llama_fast.quant, on the CPU.

A torch-free driver (tests/cpp/quant_format_test.cpp) is compiled with g++ and fed random codes, scales and
offsets; its unpacked codes, dequantized weights and repacked bytes must equal quant.py's bit for bit.
"""
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from llama_fast.quant import QuantizedWeight

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which("g++") or shutil.which("c++")


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    if CXX is None:
        pytest.skip("no C++ compiler on PATH")
    exe = tmp_path_factory.mktemp("quant_format") / "quant_format_test"
    subprocess.run([CXX, "-std=c++17", "-O1", "-ffp-contract=off", "-Wall", "-Werror", f"-I{ROOT / 'csrc'}",
                    str(ROOT / "tests/cpp/quant_format_test.cpp"), "-o", str(exe)], check=True)
    return exe


def run_driver(exe, qw: QuantizedWeight):
    n, k = qw.shape
    header = np.array([qw.bits, n, k, qw.group_size, qw.offset is not None], dtype=np.int64)
    parts = [header.tobytes(), qw.qweight.contiguous().numpy().tobytes(),
             qw.scale.float().contiguous().numpy().tobytes()]
    if qw.offset is not None:
        parts.append(qw.offset.float().contiguous().numpy().tobytes())
    out = subprocess.run([str(exe)], input=b"".join(parts), capture_output=True, check=True).stdout
    codes = np.frombuffer(out, np.int32, n * k).reshape(n, k)
    weights = np.frombuffer(out, np.float32, n * k, offset=4 * n * k).reshape(n, k)
    repacked = np.frombuffer(out, np.uint8, offset=8 * n * k)
    return torch.from_numpy(codes.copy()), torch.from_numpy(weights.copy()), repacked


def random_weight(bits, n, k, group, scale_dtype, with_offset, seed):
    g = torch.Generator().manual_seed(seed)
    if bits == 4:
        codes = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    else:
        codes = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    scale = (torch.rand(n, k // group, generator=g) * 0.1 + 1e-3).to(scale_dtype)
    offset = (torch.randn(n, k // group, generator=g) * 0.5).to(scale_dtype) if with_offset else None
    return QuantizedWeight(codes, scale, offset, bits, group)


@pytest.mark.parametrize("bits,n,k,group,scale_dtype,with_offset", [
    (4, 7, 64, 32, torch.float16, True),
    (4, 3, 256, 128, torch.bfloat16, True),
    (4, 5, 96, 96, torch.float32, False),     # per channel, symmetric-style (no offset)
    (4, 1, 192, 64, torch.float32, True),
    (8, 7, 64, 32, torch.float16, False),
    (8, 4, 384, 128, torch.bfloat16, False),
    (8, 3, 83 * 2, 83 * 2, torch.float32, True),  # per channel of odd groups; an offset is allowed
])
def test_header_matches_quant_py(driver, bits, n, k, group, scale_dtype, with_offset):
    qw = random_weight(bits, n, k, group, scale_dtype, with_offset, seed=n * k + bits)
    codes, weights, repacked = run_driver(driver, qw)
    assert torch.equal(codes, qw.unpack().to(torch.int32))
    assert torch.equal(weights, qw.dequantize(torch.float32))
    if bits == 4:
        assert np.array_equal(repacked.reshape(n, k // 2), qw.qweight.numpy())
