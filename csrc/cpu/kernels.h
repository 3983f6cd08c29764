// Torch-free CPU kernels: raw pointers, row-major contiguous data. bf16 is passed as uint16_t bit patterns.
#pragma once
#include <cstdint>

namespace llama_fast {
namespace cpu {

// y[r, :] = x[r, :] * rsqrt(mean(x[r, :]^2) + eps) * w, accumulated in fp32.
void rms_norm_f32(const float* x, const float* w, float* y, int64_t rows, int64_t hidden, float eps);
void rms_norm_bf16(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t rows, int64_t hidden, float eps);

}  // namespace cpu
}  // namespace llama_fast
