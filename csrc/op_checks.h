// Argument checks shared by the op wrappers of every backend (csrc/cpu/ops_cpu.cpp, csrc/cuda/ops_cuda.cpp): one
// wording per problem, naming the op and the argument, so that the backends report bad input alike. Device and
// dtype-set checks stay with each backend (what it takes differs).
#pragma once
#include <torch/all.h>

namespace llama_fast {

inline void check_contiguous(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (got strides ", t.strides(), ")");
}

// `t` must have the activations' dtype (that of `ref`).
inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(),
              " differs from the activations' dtype ", ref.scalar_type());
}

// A [B, T, H, D] tensor whose last dimension is contiguous (q / k / v may be views into a fused projection).
inline void check_bthd(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D [B, T, H, D], got shape ", t.sizes());
  TORCH_CHECK(t.stride(3) == 1 || t.size(3) <= 1, op, ": ", name,
              " must have a contiguous last dimension (stride 1), got strides ", t.strides());
}

// An optional bias of a linear op: [n], contiguous, in the activations' dtype (device checked by the caller).
inline void check_bias_shape(const at::Tensor& bias, const at::Tensor& x, int64_t n, const char* op) {
  check_same_dtype(bias, x, op, "bias");
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == n, op, ": bias must be [", n, "], got ", bias.sizes());
  check_contiguous(bias, op, "bias");
}

}  // namespace llama_fast
