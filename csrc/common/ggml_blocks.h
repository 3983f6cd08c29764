// ggml's block-quantized weights that llama_fast keeps in the file's bytes (llama_fast/kquants.py documents the
// layouts): the K-quants Q4_K, Q5_K, Q6_K, Q2_K, Q3_K (super-blocks of 256 weights) and Q5_0 / Q5_1 / Q8_0 (blocks
// of 32; Q8_0 only as a segment of a weight fused with other ggml types, see kquants.py). Shared by the CPU and CUDA
// kernels as __host__ __device__ inline functions.
//
// Every type decodes as  w = code * scale + offset  with an integer code per weight and an fp32 (scale, offset)
// per sub-block of 16 weights, computed exactly as gguf.quants does (d * sc in fp32, offset = -(dmin * m)),
// so a kernel that multiplies then adds reproduces the reference dequantization bit for bit. A weight row of K
// elements is K / block_weights blocks of block_bytes each, back to back.
#pragma once
#include <cstdint>

#include "common/fp16_bits.h"

namespace llama_fast {
namespace ggml {

// The ids llama_fast.kquants.TYPE_IDS gives the types.
enum class BlockType : int { kQ4K = 0, kQ5K = 1, kQ6K = 2, kQ2K = 3, kQ3K = 4, kQ5_0 = 5, kQ5_1 = 6, kQ8_0 = 7 };
constexpr int kNumBlockTypes = 8;
constexpr int kSubBlock = 16;  // weights per (scale, offset) pair

LF_HD bool valid_type(int t) { return t >= 0 && t < kNumBlockTypes; }

LF_HD constexpr int block_weights(BlockType t) {
  return t == BlockType::kQ5_0 || t == BlockType::kQ5_1 || t == BlockType::kQ8_0 ? 32 : 256;
}

LF_HD constexpr int block_bytes(BlockType t) {
  switch (t) {
    case BlockType::kQ4K: return 144;
    case BlockType::kQ5K: return 176;
    case BlockType::kQ6K: return 210;
    case BlockType::kQ2K: return 84;
    case BlockType::kQ3K: return 110;
    case BlockType::kQ5_0: return 22;
    case BlockType::kQ8_0: return 34;
    default: return 24;  // kQ5_1
  }
}

// Whether the type has a non-zero offset (a "min"): the kernels skip the offset term for the others.
LF_HD bool has_offset(BlockType t) {
  return t == BlockType::kQ4K || t == BlockType::kQ5K || t == BlockType::kQ2K || t == BlockType::kQ5_1;
}

LF_HD float f16_at(const uint8_t* p) { return half_bits_to_float(static_cast<uint16_t>(p[0] | (p[1] << 8))); }

// Q4_K / Q5_K: the 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes.
LF_HD void k_scale_min(const uint8_t* s, int j, int* sc, int* m) {
  if (j < 4) {
    *sc = s[j] & 63;
    *m = s[j + 4] & 63;
  } else {
    *sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
    *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// Q3_K: the 6-bit scale of sub-block j (0..15), unbiased (-32..31).
LF_HD int q3k_scale(const uint8_t* s, int j) {
  const int low = j < 8 ? (s[j] & 0x0F) : (s[j - 8] >> 4);
  const int high = (s[8 + (j & 3)] >> (2 * (j >> 2))) & 3;
  return (low | (high << 4)) - 32;
}

// The (scale, offset) of sub-block j (16 weights: j < block_weights / 16) of one block. offset is -0.0 for
// types without a min (x + -0.0 == x for every x, so the dequantized value is the bare product).
// `f16_at(p)` reads the fp16 at p as float (exact; a kernel may pass a hardware conversion).
template <class F16>
LF_HD void sub_block_scale_with(BlockType t, const uint8_t* b, int j, float* scale, float* offset, F16 f16_at) {
  switch (t) {
    case BlockType::kQ4K:
    case BlockType::kQ5K: {  // 6-bit scale and min per 32 weights
      int sc, m;
      k_scale_min(b + 4, j >> 1, &sc, &m);
      *scale = f16_at(b) * static_cast<float>(sc);
      *offset = -(f16_at(b + 2) * static_cast<float>(m));
      return;
    }
    case BlockType::kQ6K:
      *scale = f16_at(b + 208) * static_cast<float>(static_cast<int8_t>(b[192 + j]));
      *offset = -0.0f;
      return;
    case BlockType::kQ2K:
      *scale = f16_at(b + 80) * static_cast<float>(b[j] & 0x0F);
      *offset = -(f16_at(b + 82) * static_cast<float>(b[j] >> 4));
      return;
    case BlockType::kQ3K:
      *scale = f16_at(b + 108) * static_cast<float>(q3k_scale(b + 96, j));
      *offset = -0.0f;
      return;
    case BlockType::kQ5_0:
    case BlockType::kQ8_0:
      *scale = f16_at(b);
      *offset = -0.0f;
      return;
    default:  // kQ5_1
      *scale = f16_at(b);
      *offset = f16_at(b + 2);
      return;
  }
}

// The (scale, offset) of every sub-block of 16 weights of one block: block_weights / 16 of each.
template <class F16>
LF_HD void block_scales_with(BlockType t, const uint8_t* b, float* scale, float* offset, F16 f16_at) {
  const int subs = block_weights(t) / kSubBlock;
  const bool pairs = t == BlockType::kQ4K || t == BlockType::kQ5K || block_weights(t) == 32;
  for (int j = 0; j < subs; j += pairs ? 2 : 1) {
    sub_block_scale_with(t, b, j, scale + j, offset + j, f16_at);
    if (pairs) scale[j + 1] = scale[j], offset[j + 1] = offset[j];  // one pair per 32 weights
  }
}

struct SoftF16 {
  LF_HD float operator()(const uint8_t* p) const { return f16_at(p); }
};

LF_HD void block_scales(BlockType t, const uint8_t* b, float* scale, float* offset) {
  block_scales_with(t, b, scale, offset, SoftF16{});
}

// The integer code of weight e of one block (e < block_weights).
LF_HD int block_code(BlockType t, const uint8_t* b, int e) {
  switch (t) {
    case BlockType::kQ4K:
    case BlockType::kQ5K: {
      // 32 bytes per 64 weights: the low nibbles are weights 0..31 of the chunk, the high ones 32..63
      const uint8_t* qs = b + (t == BlockType::kQ4K ? 16 : 48);
      const int chunk = e >> 6, l = e & 31, high = (e >> 5) & 1;
      int q = (qs[32 * chunk + l] >> (4 * high)) & 0x0F;
      if (t == BlockType::kQ5K) q |= ((b[16 + l] >> (e >> 5)) & 1) << 4;  // bit j of qh[l]: weight 32 j + l
      return q;
    }
    case BlockType::kQ6K: {
      // per half of 128: ql[64], qh[32]; group g = 32-weight quarter: low nibbles of ql[0..31] / ql[32..63],
      // then the high nibbles; qh[l] holds the 2 high bits of the four groups
      const int half = e >> 7, g = (e >> 5) & 3, l = e & 31;
      const int low = (b[64 * half + 32 * (g & 1) + l] >> (4 * (g >> 1))) & 0x0F;
      const int high = (b[128 + 32 * half + l] >> (2 * g)) & 3;
      return (low | (high << 4)) - 32;
    }
    case BlockType::kQ2K: {
      const int half = e >> 7, g = (e >> 5) & 3, l = e & 31;
      return (b[16 + 32 * half + l] >> (2 * g)) & 3;
    }
    case BlockType::kQ3K: {
      const int half = e >> 7, g = (e >> 5) & 3, l = e & 31;
      const int low = (b[32 + 32 * half + l] >> (2 * g)) & 3;
      const int hbit = (b[l] >> (e >> 5)) & 1;
      return low - (hbit ? 0 : 4);  // a clear high bit subtracts 4
    }
    case BlockType::kQ8_0:  // d, then 32 int8 codes in order
      return static_cast<int8_t>(b[2 + e]);
    default: {  // kQ5_0 / kQ5_1: qs[16] low nibbles = weights 0..15, high = 16..31; qh bit e = 5th bit
      const int start = t == BlockType::kQ5_0 ? 2 : 4;
      const int low = (b[start + 4 + (e & 15)] >> (4 * (e >> 4))) & 0x0F;
      const int high = (b[start + (e >> 3)] >> (e & 7)) & 1;
      const int q = low | (high << 4);
      return t == BlockType::kQ5_0 ? q - 16 : q;
    }
  }
}

// One dequantized weight, given its block's scales (block_scales): one multiply, then one add.
LF_HD float dequant(int code, float scale, float offset) { return static_cast<float>(code) * scale + offset; }

}  // namespace ggml
}  // namespace llama_fast
