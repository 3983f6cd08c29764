"""Writes a dense (F32 or F16) copy of a quantized GGUF file, so llama.cpp can be benchmarked on the same
weights as a dense llama_fast / transformers model (the demo model ships as Q4_1 only)."""
from __future__ import annotations

import os

import numpy as np


def write_dense_gguf(src: str, dst: str, kind: str = "F32") -> str:
    import gguf

    if os.path.exists(dst):
        return dst
    target = {"F32": (gguf.GGMLQuantizationType.F32, np.float32),
              "F16": (gguf.GGMLQuantizationType.F16, np.float16)}[kind]
    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    tmp = dst + ".tmp"
    writer = gguf.GGUFWriter(tmp, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        if field.name == gguf.Keys.General.FILE_TYPE:
            writer.add_file_type(0 if kind == "F32" else 1)
            continue
        copy_field(writer, field)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        # llama.cpp keeps 1-D tensors (norms) in F32
        qtype, np_dtype = target if data.ndim > 1 else (gguf.GGMLQuantizationType.F32, np.float32)
        writer.add_tensor(t.name, data.astype(np_dtype), raw_dtype=qtype)
    return finish(writer, tmp, dst)


def copy_field(writer, field) -> None:
    """Copies one metadata field of a gguf.GGUFReader into a gguf.GGUFWriter, keeping its value types."""
    import gguf

    vtype = field.types[0]
    sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
    writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)


def finish(writer, tmp: str, dst: str) -> str:
    """Writes out a gguf.GGUFWriter opened on `tmp` and moves the file to `dst` (no half-written dst)."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, dst)
    return dst
