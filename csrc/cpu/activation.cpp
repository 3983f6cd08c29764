// silu(gate) * up over [rows, 2I] = [gate | up] (the gate/up projection's fused output), in fp32.
#ifndef LF_ISA
#include "cpu/kernels.h"
#define LF_ISA_SELF "cpu/activation.cpp"
#include "cpu/foreach_isa.h"

namespace llama_fast {
namespace cpu {

void silu_and_mul(bool bf16, const void* gate_up, void* out, int64_t rows, int64_t inter) {
#pragma omp parallel for schedule(static) if (rows * inter >= 65536)
  for (int64_t r = 0; r < rows; ++r) {
    if (bf16) {
      LF_DISPATCH(silu_mul_row, static_cast<const uint16_t*>(gate_up) + r * 2 * inter,
                  static_cast<uint16_t*>(out) + r * inter, inter);
    } else {
      LF_DISPATCH(silu_mul_row, static_cast<const float*>(gate_up) + r * 2 * inter,
                  static_cast<float*>(out) + r * inter, inter);
    }
  }
}

}  // namespace cpu
}  // namespace llama_fast

#else  // one ISA pass

namespace llama_fast {
namespace cpu {
namespace LF_ISA {

template <typename T>
void silu_mul_row(const T* gate_up, T* out, int64_t inter) {
  constexpr int W = VecF::W;
  const T* up = gate_up + inter;
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

}  // namespace LF_ISA
}  // namespace cpu
}  // namespace llama_fast
#endif
