// Decoding 16 consecutive weight codes (one 16-element chunk of a row, inside one quantization group) into
// fp32, shared by the GEMV and the GEMM. int4 uses the LOP3 magic-number conversion of
// csrc/common/int4_magic.h (two codes per instruction, exact); int8 is sign-extended per byte.
#pragma once
#include <cuda_fp16.h>

#include <cstdint>

#include "common/int4_magic.h"

namespace llama_fast {
namespace cuda {

// The codes of 8 int4 elements packed in `word`, as floats in element order.
__device__ __forceinline__ void int4x8_codes(uint32_t word, float q[8]) {
  const __half2 bias = __halves2half2(__ushort_as_half(0x6400), __ushort_as_half(0x6400));  // (1024, 1024)
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t bits = quant::int4_pair_as_half2_bits(word, i);
    const float2 f = __half22float2(__hsub2(*reinterpret_cast<const __half2*>(&bits), bias));
    q[quant::int4_pair_element(i, 0)] = f.x;
    q[quant::int4_pair_element(i, 1)] = f.y;
  }
}

__device__ __forceinline__ void int8x4_codes(uint32_t word, float q[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) q[i] = static_cast<float>(static_cast<int8_t>((word >> (8 * i)) & 0xFFu));
}

// kCodes (16 or 32 for int4, 16 for int8) codes starting at element k of a row (k a multiple of kCodes):
// int4 reads 8 or 16 bytes, int8 16 bytes, in one load.
template <int kBits, int kCodes = 16>
__device__ __forceinline__ void load_codes(const uint8_t* row, int64_t k, float* q) {
  static_assert(kCodes == 16 || (kBits == 4 && kCodes == 32), "16 codes, or 32 int4 codes");
  if constexpr (kBits == 4 && kCodes == 32) {
    const uint4 w = *reinterpret_cast<const uint4*>(row + k / 2);
    int4x8_codes(w.x, q);
    int4x8_codes(w.y, q + 8);
    int4x8_codes(w.z, q + 16);
    int4x8_codes(w.w, q + 24);
  } else if constexpr (kBits == 4) {
    const uint2 w = *reinterpret_cast<const uint2*>(row + k / 2);
    int4x8_codes(w.x, q);
    int4x8_codes(w.y, q + 8);
  } else {
    const uint4 w = *reinterpret_cast<const uint4*>(row + k);
    int8x4_codes(w.x, q);
    int8x4_codes(w.y, q + 4);
    int8x4_codes(w.z, q + 8);
    int8x4_codes(w.w, q + 12);
  }
}

}  // namespace cuda
}  // namespace llama_fast
