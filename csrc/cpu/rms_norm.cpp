// RMSNorm on the CPU. Portable scalar code for now; the CPU-kernel work vectorizes it (AVX2 / AVX-512).
#include <cmath>

#include "common/half_float.h"
#include "cpu/kernels.h"

namespace llama_fast {
namespace cpu {

void rms_norm_f32(const float* x, const float* w, float* y, int64_t rows, int64_t hidden, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * hidden;
    float* yr = y + r * hidden;
    float ss = 0.f;
    for (int64_t i = 0; i < hidden; ++i) ss += xr[i] * xr[i];
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(hidden) + eps);
    for (int64_t i = 0; i < hidden; ++i) yr[i] = xr[i] * inv * w[i];
  }
}

void rms_norm_bf16(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t rows, int64_t hidden, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* xr = x + r * hidden;
    uint16_t* yr = y + r * hidden;
    float ss = 0.f;
    for (int64_t i = 0; i < hidden; ++i) {
      const float v = bf16_bits_to_float(xr[i]);
      ss += v * v;
    }
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(hidden) + eps);
    // Like transformers: normalize in fp32, round to the input dtype, then multiply by the weight.
    for (int64_t i = 0; i < hidden; ++i) {
      const float normed = bf16_bits_to_float(float_to_bf16_bits(bf16_bits_to_float(xr[i]) * inv));
      yr[i] = float_to_bf16_bits(normed * bf16_bits_to_float(w[i]));
    }
  }
}

}  // namespace cpu
}  // namespace llama_fast
