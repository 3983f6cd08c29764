// Online-softmax bookkeeping shared by the attention kernels (CUDA flash-decoding and prefill, and any CPU
// kernel that streams keys): a partial softmax over a chunk of keys is (m, l, o) with m the running max of
// the scaled scores, l = sum exp(s - m), o = sum exp(s - m) * v. Chunks merge exactly; an empty chunk has
// m = -inf, l = 0 and contributes nothing.
#pragma once
#include <cmath>

#include "common/half_float.h"

namespace llama_fast {
namespace softmax {

// exp(m_old - m_new), the factor that rescales a partial computed against m_old; 0 for an empty partial.
LF_HD float rescale(float m_old, float m_new) { return m_old == -INFINITY ? 0.0f : expf(m_old - m_new); }

// The weight exp(s - m) of one score against the running max; masked scores (-inf) weigh 0.
LF_HD float weight(float s, float m) { return s == -INFINITY ? 0.0f : expf(s - m); }

// Folds partial (m_b, l_b) into the running (m, l); returns the factors to apply to o and o_b:
// o_merged = o * *scale_a + o_b * *scale_b.
LF_HD void merge(float& m, float& l, float m_b, float l_b, float* scale_a, float* scale_b) {
  const float m_new = fmaxf(m, m_b);
  *scale_a = rescale(m, m_new);
  *scale_b = rescale(m_b, m_new);
  l = l * *scale_a + l_b * *scale_b;
  m = m_new;
}

// 1 / l, or 0 when no key was valid (the op contract: such a query row gives zeros).
LF_HD float inverse_sum(float l) { return l > 0.0f ? 1.0f / l : 0.0f; }

}  // namespace softmax
}  // namespace llama_fast
