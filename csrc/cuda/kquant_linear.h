// Torch-free launcher of the ggml block GEMV (kquant_linear.cu); kquant_linear_op.cpp checks the arguments.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

#include "cuda/launch.h"

namespace llama_fast {
namespace cuda {

struct KQuantLinearArgs {
  const void* x;          // [m, k] activations (dtype dt), contiguous
  const uint8_t* blocks;  // [n, k / block_weights * block_bytes] of block type `type` (ggml_blocks.h)
  const void* bias;       // [n] or null
  void* out;              // [m, ldo] (dtype dt): columns 0..n-1 written
  int type;               // ggml::BlockType
  int64_t m, n, k, ldo;
};

// out = x @ W^T (+ bias), fp32 accumulation; any m (passes of up to 8 activation rows).
cudaError_t kquant_linear(DType dt, const KQuantLinearArgs& a, cudaStream_t stream);

}  // namespace cuda
}  // namespace llama_fast
