// The torch-free entry of the ggml block GEMV (kquant_linear.cpp): what the op llama_fast::kquant_linear and
// the CPU decode plan (decode_step.cpp) both call, so that the two compute the same numbers.
#pragma once
#include <cstdint>
#include <vector>

#include "common/ggml_blocks.h"

namespace llama_fast {
namespace cpu {
namespace kquant {

struct Segment {  // rows of one block type
  ggml::BlockType type;
  const uint8_t* blocks;  // [rows, K / block_weights * block_bytes]
  int64_t rows;
};

inline int64_t row_bytes(ggml::BlockType t, int64_t k) { return k / ggml::block_weights(t) * ggml::block_bytes(t); }

// out[m, N] (fp32, row stride N) = x[m, K] @ W^T over the segments (stacked along N); x fp32 or bf16 bits.
// Meant for decode (m up to a few rows: every row is one more pass of the arithmetic over the blocks).
void linear(bool bf16, const void* x, int64_t m, const std::vector<Segment>& segs, int64_t k, float* out);

}  // namespace kquant
}  // namespace cpu
}  // namespace llama_fast
