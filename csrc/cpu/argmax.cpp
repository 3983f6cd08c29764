// Greedy decoding's choice on the CPU: per row of scores, the first index of the maximum, a NaN counting as the
// maximum (the first NaN wins), which is what torch.argmax and max(dim).indices return.
//
// Why a kernel: ATen's reduction over a vocabulary-sized row runs element by element (~1 ms for 8 rows of 49152
// bf16 scores on a Zen 4 core, more than a small model's batched step spends outside its linears) and, over
// several rows, forks ATen's OpenMP team, whose threads then spin on the cores that our pool needs for the next
// decode step (see aten_causal_prefill in ops_cpu.cpp).
//
// One vector pass per row finds each block's maximum (NaN lanes ignored by the max, noted separately) and the first
// block whose maximum beats every block before it; the first maximal element then lies in that block, which a
// scalar scan searches. Comparisons are exact in fp32 (a bf16 score widens exactly), and -0 == +0 as in torch.
#ifndef LF_ISA
#include "cpu/kernels.h"
#include "cpu/thread_pool.h"
#define LF_ISA_SELF "cpu/argmax.cpp"
#include "cpu/foreach_isa.h"

namespace llama_fast {
namespace cpu {

void argmax_rows(bool bf16, const void* scores, int64_t rows, int64_t n, int64_t ld, int64_t* out) {
  parallel_for(rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      LF_CPU_DISPATCH_DTYPE(bf16, T, LF_DISPATCH(argmax_row<T>, static_cast<const T*>(scores) + r * ld, n, out + r));
  });
}

}  // namespace cpu
}  // namespace llama_fast

#else  // one ISA pass

namespace llama_fast {
namespace cpu {
namespace LF_ISA {

inline bool any_nan(VecF v) {
#if LF_ISA_LEVEL == 2
  return _mm512_cmp_ps_mask(v.v, v.v, _CMP_UNORD_Q) != 0;
#elif LF_ISA_LEVEL == 1
  return _mm256_movemask_ps(_mm256_cmp_ps(v.v, v.v, _CMP_UNORD_Q)) != 0;
#else
  return std::isnan(v.v);
#endif
}

template <typename T>
void argmax_row(const T* x, int64_t n, int64_t* out) {
  constexpr int W = VecF::W;
  constexpr int64_t kBlock = 256;  // elements per block: a multiple of every W
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  float best = kNegInf;
  int64_t best_block = 0;  // all -inf: element 0, as torch
  bool nan = false;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t end = std::min(n, b + kBlock);
    VecF m = VecF::set1(kNegInf);
    int64_t i = b;
    for (; i + W <= end; i += W) {
      const VecF v = VecF::load(x + i);
      nan |= any_nan(v);
      m = VecF::max(v, m);  // a NaN in v gives m (the second operand)
    }
    float block_max = m.hmax();
    for (; i < end; ++i) {
      const float v = to_f32(x[i]);
      nan |= std::isnan(v);
      block_max = v > block_max ? v : block_max;
    }
    if (block_max > best) {  // strictly: an equal maximum further on is not the first
      best = block_max;
      best_block = b;
    }
  }
  if (nan) {
    for (int64_t i = 0; i < n; ++i) {
      if (std::isnan(to_f32(x[i]))) {
        *out = i;
        return;
      }
    }
  }
  const int64_t end = std::min(n, best_block + kBlock);
  for (int64_t i = best_block; i < end; ++i) {
    if (to_f32(x[i]) == best) {
      *out = i;
      return;
    }
  }
  *out = best_block;  // not reached: the block holds its maximum
}

}  // namespace LF_ISA
}  // namespace cpu
}  // namespace llama_fast
#endif
