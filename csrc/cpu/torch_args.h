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

// The kernels' tag for a KV cache's element type (float32, bfloat16, float16 or int8); anything else is `op`'s
// error.
inline KvType kv_type(const at::Tensor& cache, const char* op) {
  switch (cache.scalar_type()) {
    case at::kFloat: return KvType::kF32;
    case at::kBFloat16: return KvType::kBF16;
    case at::kHalf: return KvType::kF16;
    case at::kChar: return KvType::kI8;
    default:
      TORCH_CHECK(false, op, ": the KV cache must be float32, bfloat16, float16 or int8 (kv_cache_dtype), got ",
                  cache.scalar_type());
  }
}

// The scales of an int8 KV cache `kv` ([B, S, Hkv, D]): fp32 [B, S, Hkv] with a contiguous last dimension and
// the same B, Hkv (S may differ only when `same_len` is false: attention reads a prefix of the cache).
inline void check_kv_scale(const at::Tensor& scale, const at::Tensor& kv, const char* op, const char* name) {
  TORCH_CHECK(scale.device().is_cpu() && scale.scalar_type() == at::kFloat && scale.dim() == 3, op, ": ", name,
              " must be a float32 CPU tensor [B, S, Hkv], got ", scale.scalar_type(), " ", scale.sizes(), " on ",
              scale.device());
  TORCH_CHECK(scale.size(0) == kv.size(0) && scale.size(1) == kv.size(1) && scale.size(2) == kv.size(2), op, ": ", name,
              " shape ", scale.sizes(), " does not match the int8 cache's [B, S, Hkv] = ", kv.sizes().slice(0, 3));
  TORCH_CHECK(scale.stride(2) == 1 || scale.size(2) <= 1, op, ": ", name, " must have a contiguous last dimension");
}

// A [B, T, H, D] tensor with a contiguous last dimension, as the kernels take it.
inline Strided4 strided4(const at::Tensor& t) {
  return Strided4{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.size(2)};
}

}  // namespace cpu
}  // namespace llama_fast
