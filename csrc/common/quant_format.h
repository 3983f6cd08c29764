// The serialized weight-only format (llama_fast/quant.py documents the same thing for Python), shared by the
// CPU and CUDA kernels as __host__ __device__ inline functions so the CPU tests exercise the definitions.
//
//   w[n][k] = q[n][k] * scale[n][k / g] + offset[n][k / g]
//
// int8: q is int8 [N][K], offset absent (zero).
// int4: q in 0..15, uint8 [N][K/2]; element k = 2j is the LOW nibble of byte j, k = 2j+1 the HIGH nibble.
#pragma once
#include <cstdint>

#include "common/half_float.h"

namespace llama_fast {
namespace quant {

// The code of element k of an int4 row (row = that row's K/2 packed bytes).
LF_HD int int4_code(const uint8_t* row, int64_t k) {
  const uint8_t byte = row[k >> 1];
  return (k & 1) ? (byte >> 4) : (byte & 0x0F);
}

LF_HD uint8_t int4_pack_pair(int even_code, int odd_code) {
  return static_cast<uint8_t>((even_code & 0x0F) | ((odd_code & 0x0F) << 4));
}

// One element of the dequantized weight; offset may be 0 for int8.
LF_HD float dequant_value(int code, float scale, float offset) { return static_cast<float>(code) * scale + offset; }

}  // namespace quant
}  // namespace llama_fast
