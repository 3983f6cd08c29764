// silu(gate) * up over [rows, 2I] = [gate | up] (the gate/up projection's fused output), in fp32.
#ifndef LF_ISA
#include "cpu/kernels.h"
#include "cpu/thread_pool.h"
#define LF_ISA_SELF "cpu/silu_and_mul.cpp"
#include "cpu/foreach_isa.h"

namespace llama_fast {
namespace cpu {

void silu_and_mul(bool bf16, const void* gate_up, void* out, int64_t rows, int64_t inter) {
  // chunks of whole rows, or of a row's columns when there are few rows (decode: one row of I = 1536+).
  // Below ~16K elements (a few microseconds on one core) the work stays on the calling thread: a fork/join
  // costs as much, and far more when the helper thread is not running right now.
  if (rows < 4) {
    const int64_t grain = rows * inter < 16384 ? inter : 4096;
    for (int64_t r = 0; r < rows; ++r) {
      parallel_for(inter, grain, [&](int64_t c0, int64_t c1) {
        LF_CPU_DISPATCH_DTYPE(bf16, T, {
          const T* g = static_cast<const T*>(gate_up) + r * 2 * inter;
          LF_DISPATCH(silu_mul_span, g + c0, g + inter + c0, static_cast<T*>(out) + r * inter + c0, c1 - c0);
        });
      });
    }
    return;
  }
  parallel_for(rows, std::max<int64_t>(1, 8192 / std::max<int64_t>(inter, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      LF_CPU_DISPATCH_DTYPE(bf16, T,
                            LF_DISPATCH(silu_mul_row, static_cast<const T*>(gate_up) + r * 2 * inter,
                                        static_cast<T*>(out) + r * inter, inter));
  });
}

}  // namespace cpu
}  // namespace llama_fast

#else  // one ISA pass

namespace llama_fast {
namespace cpu {
namespace LF_ISA {

template <typename T>
void silu_mul_span(const T* gate_up, const T* up, T* out, int64_t inter) {
  constexpr int W = VecF::W;
  const VecF one = VecF::set1(1.f), zero = VecF::zero();
  int64_t i = 0;
  for (; i + W <= inter; i += W) {
    VecF g = VecF::load(gate_up + i);
    (g / (one + exp(zero - g)) * VecF::load(up + i)).store(out + i);
  }
  for (; i < inter; ++i) {
    const float g = to_f32(gate_up[i]);
    out[i] = from_f32<T>(g / (1.f + std::exp(-g)) * to_f32(up[i]));
  }
}

template <typename T>
void silu_mul_row(const T* gate_up, T* out, int64_t inter) {
  silu_mul_span(gate_up, gate_up + inter, out, inter);
}

}  // namespace LF_ISA
}  // namespace cpu
}  // namespace llama_fast
#endif
