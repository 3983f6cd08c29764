// Rotary position embedding in place, HF rotate_half convention: for d < D/2,
//   x'[d] = x[d] * cos[p, d] - x[d + D/2] * sin[p, d],   x'[d + D/2] = x[d + D/2] * cos[p, d] + x[d] * sin[p, d].
// One task per (batch, token): the cos/sin rows are loaded once for all q and k heads of that token.
#ifndef LF_ISA
#include "cpu/kernels.h"
#include "cpu/thread_pool.h"
#define LF_ISA_SELF "cpu/rotary.cpp"
#include "cpu/foreach_isa.h"

namespace llama_fast {
namespace cpu {

void rotary(bool bf16, Strided4 q, Strided4 k, const void* positions, bool positions_int64, const float* cos,
            const float* sin, int64_t batch, int64_t seq, int64_t head_dim) {
  const int64_t half = head_dim / 2;
  const int64_t tokens = batch * seq;
  const int64_t per_token = (q.heads + k.heads) * head_dim;
  parallel_for(tokens, std::max<int64_t>(1, 16384 / std::max<int64_t>(per_token, 1)), [&](int64_t t0, int64_t t1) {
    for (int64_t bt = t0; bt < t1; ++bt) {
      const int64_t b = bt / seq, t = bt % seq;
      const int64_t pos =
          positions_int64 ? static_cast<const int64_t*>(positions)[bt] : static_cast<const int32_t*>(positions)[bt];
      const float* c = cos + pos * half;
      const float* s = sin + pos * half;
      for (const Strided4* x : {&q, &k}) {
        for (int64_t h = 0; h < x->heads; ++h) {
          const int64_t off = b * x->sb + t * x->st + h * x->sh;
          if (bf16)
            LF_DISPATCH(rotate_head, static_cast<uint16_t*>(x->data) + off, c, s, half);
          else
            LF_DISPATCH(rotate_head, static_cast<float*>(x->data) + off, c, s, half);
        }
      }
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
void rotate_head(T* x, const float* c, const float* s, int64_t half) {
  constexpr int W = VecF::W;
  T* x2 = x + half;
  int64_t i = 0;
  for (; i + W <= half; i += W) {
    VecF a = VecF::load(x + i), b = VecF::load(x2 + i), cv = VecF::load(c + i), sv = VecF::load(s + i);
    (a * cv - b * sv).store(x + i);
    (b * cv + a * sv).store(x2 + i);
  }
  for (; i < half; ++i) {
    const float a = to_f32(x[i]), b = to_f32(x2[i]);
    x[i] = from_f32<T>(a * c[i] - b * s[i]);
    x2[i] = from_f32<T>(b * c[i] + a * s[i]);
  }
}

}  // namespace LF_ISA
}  // namespace cpu
}  // namespace llama_fast
#endif
