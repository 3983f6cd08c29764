// RMSNorm and the fused residual-add + RMSNorm of the pre-norm decoder layer. One row per task; the row is
// read twice (sum of squares, then scale), which stays in L1 for any realistic hidden size.
#ifndef LF_ISA
#include "cpu/kernels.h"
#include "cpu/thread_pool.h"
#define LF_ISA_SELF "cpu/rms_norm.cpp"
#include "cpu/foreach_isa.h"

namespace llama_fast {
namespace cpu {

namespace {
int64_t rows_per_chunk(int64_t hidden) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(hidden, 1)); }
}  // namespace

void rms_norm(bool bf16, const void* x, const void* w, void* y, int64_t rows, int64_t hidden, float eps) {
  parallel_for(rows, rows_per_chunk(hidden), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t o = r * hidden;
      LF_CPU_DISPATCH_DTYPE(bf16, T,
                            LF_DISPATCH(rms_norm_row, static_cast<const T*>(x) + o, static_cast<const T*>(w),
                                        static_cast<T*>(y) + o, hidden, eps));
    }
  });
}

void fused_add_rms_norm(bool bf16, const void* x, const void* residual, const void* w, void* y, void* new_residual,
                        int64_t rows, int64_t hidden, float eps) {
  parallel_for(rows, rows_per_chunk(hidden), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t o = r * hidden;
      LF_CPU_DISPATCH_DTYPE(bf16, T, {
        LF_DISPATCH(add_rows, static_cast<const T*>(x) + o, static_cast<const T*>(residual) + o,
                    static_cast<T*>(new_residual) + o, hidden);
        LF_DISPATCH(rms_norm_row, static_cast<const T*>(new_residual) + o, static_cast<const T*>(w),
                    static_cast<T*>(y) + o, hidden, eps);
      });
    }
  });
}

}  // namespace cpu
}  // namespace llama_fast

#else  // one ISA pass

namespace llama_fast {
namespace cpu {
namespace LF_ISA {

template <typename T>
void add_rows(const T* a, const T* b, T* out, int64_t n) {
  constexpr int W = VecF::W;
  int64_t i = 0;
  for (; i + W <= n; i += W) (VecF::load(a + i) + VecF::load(b + i)).store(out + i);
  for (; i < n; ++i) out[i] = from_f32<T>(to_f32(a[i]) + to_f32(b[i]));
}

template <typename T>
void rms_norm_row(const T* x, const T* w, T* y, int64_t n, float eps) {
  constexpr int W = VecF::W;
  VecF acc0 = VecF::zero(), acc1 = VecF::zero();
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    VecF a = VecF::load(x + i), b = VecF::load(x + i + W);
    acc0 = VecF::fma(a, a, acc0);
    acc1 = VecF::fma(b, b, acc1);
  }
  for (; i + W <= n; i += W) {
    VecF a = VecF::load(x + i);
    acc0 = VecF::fma(a, a, acc0);
  }
  float ss = (acc0 + acc1).sum();
  for (; i < n; ++i) ss += to_f32(x[i]) * to_f32(x[i]);
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
  const VecF vinv = VecF::set1(inv);
  i = 0;
  if constexpr (std::is_same<T, float>::value) {
    for (; i + W <= n; i += W) (VecF::load(w + i) * (VecF::load(x + i) * vinv)).store(y + i);
    for (; i < n; ++i) y[i] = w[i] * (x[i] * inv);
  } else {
    // transformers rounds the normalized row to bf16 before the weight multiply: round twice, like it.
    alignas(64) uint16_t tmp[VecF::W];
    for (; i + W <= n; i += W) {
      (VecF::load(x + i) * vinv).store(tmp);
      (VecF::load(w + i) * VecF::load(tmp)).store(y + i);
    }
    for (; i < n; ++i) {
      const float normed = to_f32(from_f32<T>(to_f32(x[i]) * inv));
      y[i] = from_f32<T>(to_f32(w[i]) * normed);
    }
  }
}

}  // namespace LF_ISA
}  // namespace cpu
}  // namespace llama_fast
#endif
