// ggml blocks (csrc/common/ggml_blocks.h) made fp32 a whole block at a time, for the prefill GEMM's weight tiles
// (gemm.cpp). Included once per ISA pass like cpu/simd.h (no include guard on purpose: each pass defines its own
// llama_fast::cpu::<isa>::dequantize_block, compiled for that instruction set).
//
// The same numbers as ggml::block_code / block_scales / dequant (kquant::dequantize_rows, the tests' reference):
// each weight is code * scale + offset, one multiply then one add (the build does not contract them into an fma:
// setup.py passes -ffp-contract=off), with the block's (scale, offset) per 16 weights from ggml::block_scales.
// Only the code extraction is written out per type, as loops over 16 or 32 consecutive weights whose byte and bit
// positions are fixed within the loop, so that the compiler vectorizes them (block_code takes any weight index
// and stays scalar). tests/ops/test_kquant_linear.py compares the GEMM's weights with kquant_dequantize bit for bit.
namespace llama_fast {
namespace cpu {
namespace LF_ISA {

// The fp16 at p as float: the F16C conversion where the pass has it (exact either way: every fp16 is a float),
// ggml's portable bit manipulation otherwise (a few dozen instructions, a per-weight cost on blocks of 32).
struct F16ToFloat {
  float operator()(const uint8_t* p) const {
#if LF_ISA_LEVEL >= 1
    uint16_t h;
    std::memcpy(&h, p, 2);
    return _cvtsh_ss(h);
#else
    return ggml::f16_at(p);
#endif
  }
};

// o[e] = weight e of the block at b (e < ggml::block_weights(T)).
template <ggml::BlockType T>
inline void dequantize_block(const uint8_t* b, float* o) {
  using ggml::BlockType;
  float sc[16], off[16];
  ggml::block_scales_with(T, b, sc, off, F16ToFloat{});
  if constexpr (T == BlockType::kQ4K || T == BlockType::kQ5K) {
    // 4 chunks of 64 weights: 32 qs bytes each, low nibbles weights 0-31 (sub-blocks 4c, 4c+1: one scale), high
    // nibbles 32-63 (4c+2, 4c+3); Q5_K's 5th bit of weight 32 g + l is bit g of qh[l]
    const uint8_t* qs = b + (T == BlockType::kQ4K ? 16 : 48);
    const uint8_t* qh = b + 16;
    for (int c = 0; c < 4; ++c) {
      const float s0 = sc[4 * c], o0 = off[4 * c], s1 = sc[4 * c + 2], o1 = off[4 * c + 2];
      for (int l = 0; l < 32; ++l) {
        int lo = qs[32 * c + l] & 0x0F, hi = qs[32 * c + l] >> 4;
        if constexpr (T == BlockType::kQ5K) {
          lo |= ((qh[l] >> (2 * c)) & 1) << 4;
          hi |= ((qh[l] >> (2 * c + 1)) & 1) << 4;
        }
        o[64 * c + l] = static_cast<float>(lo) * s0 + o0;
        o[64 * c + 32 + l] = static_cast<float>(hi) * s1 + o1;
      }
    }
  } else if constexpr (T == BlockType::kQ6K || T == BlockType::kQ2K || T == BlockType::kQ3K) {
    // two halves of 128 weights, four groups g of 32 each, weight 128 h + 32 g + l (sub-block 8 h + 2 g + l / 16)
    for (int h = 0; h < 2; ++h) {
      for (int g = 0; g < 4; ++g) {
        for (int s = 0; s < 2; ++s) {
          const int j = 8 * h + 2 * g + s;
          const float scale = sc[j], offset = off[j];
          float* out = o + 16 * j;
          for (int i = 0; i < 16; ++i) {
            const int l = 16 * s + i;
            int q;
            if constexpr (T == BlockType::kQ6K) {
              const int low = (b[64 * h + 32 * (g & 1) + l] >> (4 * (g >> 1))) & 0x0F;
              const int high = (b[128 + 32 * h + l] >> (2 * g)) & 3;
              q = (low | (high << 4)) - 32;
            } else if constexpr (T == BlockType::kQ2K) {
              q = (b[16 + 32 * h + l] >> (2 * g)) & 3;
            } else {  // Q3_K: a clear bit 4 h + g of hmask[l] subtracts 4
              q = ((b[32 + 32 * h + l] >> (2 * g)) & 3) - (((b[l] >> (4 * h + g)) & 1) ? 0 : 4);
            }
            out[i] = static_cast<float>(q) * scale + offset;
          }
        }
      }
    }
  } else if constexpr (T == BlockType::kQ8_0) {
    for (int e = 0; e < 32; ++e) o[e] = static_cast<float>(static_cast<int8_t>(b[2 + e])) * sc[0] + off[0];
  } else {  // Q5_0 / Q5_1: qh (32 bits) then qs[16]: low nibbles weights 0-15, high nibbles 16-31
    constexpr int start = T == BlockType::kQ5_0 ? 2 : 4;
    uint32_t qh;
    std::memcpy(&qh, b + start, 4);
    for (int i = 0; i < 16; ++i) {
      const int byte = b[start + 4 + i];
      int lo = (byte & 0x0F) | static_cast<int>(((qh >> i) & 1) << 4);
      int hi = (byte >> 4) | static_cast<int>(((qh >> (i + 16)) & 1) << 4);
      if constexpr (T == BlockType::kQ5_0) lo -= 16, hi -= 16;
      o[i] = static_cast<float>(lo) * sc[0] + off[0];
      o[16 + i] = static_cast<float>(hi) * sc[0] + off[0];
    }
  }
}

// `count` consecutive blocks of type T as fp32 o[0..count * block_weights).
template <ggml::BlockType T>
inline void dequantize_blocks(const uint8_t* blocks, int64_t count, float* o) {
  constexpr int bw = ggml::block_weights(T), bb = ggml::block_bytes(T);
  for (int64_t blk = 0; blk < count; ++blk) dequantize_block<T>(blocks + blk * bb, o + blk * bw);
}

// The same for a type known at run time: one of the types kquant::gemm_supports (kquant_linear.h) lists.
inline void dequantize_blocks(ggml::BlockType t, const uint8_t* blocks, int64_t count, float* o) {
  using ggml::BlockType;
  switch (t) {
    case BlockType::kQ4K: return dequantize_blocks<BlockType::kQ4K>(blocks, count, o);
    case BlockType::kQ5K: return dequantize_blocks<BlockType::kQ5K>(blocks, count, o);
    case BlockType::kQ6K: return dequantize_blocks<BlockType::kQ6K>(blocks, count, o);
    case BlockType::kQ2K: return dequantize_blocks<BlockType::kQ2K>(blocks, count, o);
    case BlockType::kQ3K: return dequantize_blocks<BlockType::kQ3K>(blocks, count, o);
    case BlockType::kQ5_0: return dequantize_blocks<BlockType::kQ5_0>(blocks, count, o);
    case BlockType::kQ8_0: return dequantize_blocks<BlockType::kQ8_0>(blocks, count, o);
    case BlockType::kQ5_1: return dequantize_blocks<BlockType::kQ5_1>(blocks, count, o);
    default: return;  // not reached: the callers route other types to their GEMV
  }
}

}  // namespace LF_ISA
}  // namespace cpu
}  // namespace llama_fast
