// Torch-side helpers shared by the CPU op wrappers (ops_cpu.cpp) and the decode plan (decode_step.cpp): the
// translation of tensor dtypes into what the torch-free kernels of kernels.h take.
#pragma once
#include <torch/all.h>

#include "cpu/kernels.h"

namespace llama_fast {
namespace cpu {

inline bool is_bf16(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16; }

// The kernels' tag for the dtype of a quantized weight's scales / offsets; anything else is `op`'s error.
inline ScaleType scale_type(const at::Tensor& s, const char* op) {
  switch (s.scalar_type()) {
    case at::kFloat: return ScaleType::kF32;
    case at::kHalf: return ScaleType::kF16;
    case at::kBFloat16: return ScaleType::kBF16;
    default: TORCH_CHECK(false, op, ": scale must be float32, float16 or bfloat16, got ", s.scalar_type());
  }
}

// A [B, T, H, D] tensor with a contiguous last dimension, as the kernels take it.
inline Strided4 strided4(const at::Tensor& t) {
  return Strided4{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.size(2)};
}

}  // namespace cpu
}  // namespace llama_fast
