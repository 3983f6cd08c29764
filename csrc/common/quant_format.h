// The serialized weight-only format (llama_fast/quant.py documents the same thing for Python), shared by the
// CPU and CUDA kernels as __host__ __device__ inline functions so the CPU tests exercise the definitions
// (tests/cpp/quant_format_test.cpp, driven by tests/test_quant_format_cpp.py).
//
//   w[n][k] = q[n][k] * scale[n][k / g] + offset[n][k / g]        (g = group_size; g = K is per channel)
//
// int8: q is int8 [N][K], offset absent (zero).
// int4: q in 0..15, uint8 [N][K/2]; element k = 2j is the LOW nibble of byte j, k = 2j+1 the HIGH nibble.
// scale / offset: [N][K / g], fp16, bf16 or fp32 in memory; these helpers take them already widened to float
// (the kernel owns the load, e.g. common/half_float.h), so one definition serves every scale dtype.
//
// Rounding: dequant_value is one multiply then one add in fp32, as quant.py's dequantize. nvcc contracts that
// into an fma by default, which differs from PyTorch in the last bit; kernels are compared with a tolerance,
// this header's CPU test (compiled with -ffp-contract=off) bit for bit.
#pragma once
#include <cstdint>

#include "common/half_float.h"

namespace llama_fast {
namespace quant {

constexpr int kInt4Max = 15;    // int4 codes are 0..15
constexpr int kInt8Min = -128;  // int8 codes are -128..127
constexpr int kInt8Max = 127;

// Bytes per row of codes for K input elements.
LF_HD int64_t row_bytes(int bits, int64_t k) { return bits == 4 ? k / 2 : k; }

// The scale / offset column holding element k.
LF_HD int64_t group_of(int64_t k, int64_t group_size) { return k / group_size; }

// The code of element k of an int4 row (row = that row's K/2 packed bytes).
LF_HD int int4_code(const uint8_t* row, int64_t k) {
  const uint8_t byte = row[k >> 1];
  return (k & 1) ? (byte >> 4) : (byte & 0x0F);
}

// The code of element k of an int8 row.
LF_HD int int8_code(const int8_t* row, int64_t k) { return row[k]; }

LF_HD uint8_t int4_pack_pair(int even_code, int odd_code) {
  return static_cast<uint8_t>((even_code & 0x0F) | ((odd_code & 0x0F) << 4));
}

// One element of the dequantized weight; offset is 0 for int8.
LF_HD float dequant_value(int code, float scale, float offset) { return static_cast<float>(code) * scale + offset; }

// Element k of a row, given that row's scales and offsets widened to float (offsets may be null).
LF_HD float dequant_int4(const uint8_t* row, const float* scales, const float* offsets, int64_t k, int64_t group_size) {
  const int64_t g = group_of(k, group_size);
  return dequant_value(int4_code(row, k), scales[g], offsets ? offsets[g] : 0.0f);
}

LF_HD float dequant_int8(const int8_t* row, const float* scales, const float* offsets, int64_t k, int64_t group_size) {
  const int64_t g = group_of(k, group_size);
  return dequant_value(int8_code(row, k), scales[g], offsets ? offsets[g] : 0.0f);
}

// Packs K codes (0..15, K even) into K/2 bytes.
LF_HD void int4_pack_row(const int* codes, int64_t k, uint8_t* out) {
  for (int64_t j = 0; j < k / 2; ++j) out[j] = int4_pack_pair(codes[2 * j], codes[2 * j + 1]);
}

}  // namespace quant
}  // namespace llama_fast
