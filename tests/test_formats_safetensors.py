"""llama_fast.formats.safetensors against the safetensors package, both directions, and its errors."""
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama_fast.formats import safetensors as safetensors_format
from llama_fast.formats.safetensors import SafetensorsError, SafetensorsFile

TENSORS = {
    "f32": torch.randn(7, 83),
    "bf16": torch.randn(3, 5).to(torch.bfloat16),
    "f16": torch.randn(769).to(torch.float16),
    "i64": torch.arange(-3, 4),
    "u8": torch.arange(256, dtype=torch.uint8),
    "scalar": torch.tensor(2.5),
    "empty": torch.zeros(0, 4),
}


def test_we_read_what_safetensors_writes(tmp_path):
    save_file(TENSORS, tmp_path / "a.safetensors", metadata={"format": "pt"})
    st = SafetensorsFile(tmp_path / "a.safetensors")
    assert sorted(st.keys()) == sorted(TENSORS) and st.metadata == {"format": "pt"}
    for name, t in TENSORS.items():
        got = st.read(name)
        assert got.dtype == t.dtype and torch.equal(got, t), name
    out = torch.empty(7, 83)
    assert st.read("f32", out) is out and torch.equal(out, TENSORS["f32"])


def test_safetensors_reads_what_we_write(tmp_path):
    fused = torch.randn(10, 6)
    items = list(TENSORS.items()) + [("rows", fused[2:5])]   # a row slice of a bigger tensor
    safetensors_format.write(tmp_path / "b.safetensors", items)
    back = load_file(tmp_path / "b.safetensors")
    for name, t in items:
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name


def test_read_into_wrong_buffer(tmp_path):
    save_file({"x": torch.zeros(2, 3)}, tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match=r"out must be a contiguous CPU torch.float32 tensor of shape \[2, 3\]"):
        SafetensorsFile(tmp_path / "c.safetensors").read("x", torch.empty(3, 2))


def _raw_file(path, header: dict, data: bytes):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_size_mismatch_and_unknown_dtype(tmp_path):
    _raw_file(tmp_path / "d.safetensors", {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, bytes(16))
    with pytest.raises(SafetensorsError, match=r"tensor 'w': 12 bytes of data for shape \[2, 2\] F32 \(needs 16\)"):
        SafetensorsFile(tmp_path / "d.safetensors")
    _raw_file(tmp_path / "e.safetensors", {"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, bytes(2))
    with pytest.raises(SafetensorsError, match=r"corrupt safetensors header entry for tensor 'w'"):
        SafetensorsFile(tmp_path / "e.safetensors")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_read_rectangle_reads_the_rows_and_columns_of_a_slice(tmp_path, dtype):
    """What a tensor-parallel rank reads (llama_fast.parallel): equal to slicing the whole tensor (exact: the
    same bytes)."""
    from llama_fast.formats.regions import SplitsBlockError

    gen = torch.Generator().manual_seed(0)
    full = (torch.randn(6, 20, generator=gen) * 50).to(dtype)
    bias = torch.randn(6, generator=gen)
    path = tmp_path / "m.safetensors"
    safetensors_format.write(path, [("w", full), ("b", bias)])
    st = SafetensorsFile(path)
    assert torch.equal(st.read_rectangle("w", rows=(2, 5)), full[2:5])
    assert torch.equal(st.read_rectangle("w", cols=(4, 12)), full[:, 4:12])
    assert torch.equal(st.read_rectangle("b", rows=(1, 4)), bias[1:4])
    # packed int4 codes: two weights per byte, so weight columns 8..24 are bytes 4..12
    assert torch.equal(st.read_rectangle("w", cols=(8, 24), weights_per_element=2), full[:, 4:12])
    with pytest.raises(SplitsBlockError, match="input column 3 would split a block of 2"):
        st.read_rectangle("w", cols=(3, 9), weights_per_element=2)
