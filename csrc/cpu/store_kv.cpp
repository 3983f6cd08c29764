// Writes new keys/values into the static KV cache at per-token slots. A cache in the activations' dtype takes a
// plain copy; a bf16 / fp16 cache rounds each value once (nearest even); an int8 cache quantizes each
// (token, kv head) row of D values symmetrically with its own fp32 scale. A decode step stores a few rows per
// layer, so this is scalar code: the attention that reads the cache is where the bytes are.
#include <cmath>
#include <cstring>

#include "common/fp16_bits.h"
#include "common/half_float.h"
#include "cpu/kernels.h"

namespace llama_fast {
namespace cpu {
namespace {

float load(const void* src, bool bf16, int64_t i) {
  return bf16 ? bf16_bits_to_float(static_cast<const uint16_t*>(src)[i]) : static_cast<const float*>(src)[i];
}

// One row of D values at src (activations) into the cache row dst (its scale at *scale for int8).
void store_row(bool src_bf16, const void* src, KvType type, void* dst, float* scale, int64_t d) {
  switch (type) {
    case KvType::kF32:
    case KvType::kBF16:
      if ((type == KvType::kBF16) == src_bf16) {
        std::memcpy(dst, src, d * (src_bf16 ? 2 : 4));
      } else if (type == KvType::kF32) {  // bf16 -> fp32: exact
        for (int64_t i = 0; i < d; ++i) static_cast<float*>(dst)[i] = load(src, src_bf16, i);
      } else {
        for (int64_t i = 0; i < d; ++i) static_cast<uint16_t*>(dst)[i] = float_to_bf16_bits(load(src, src_bf16, i));
      }
      return;
    case KvType::kF16:
      for (int64_t i = 0; i < d; ++i) static_cast<uint16_t*>(dst)[i] = float_to_half_bits(load(src, src_bf16, i));
      return;
    case KvType::kI8: {
      // scale = max|x| / 127 and q = round(x / scale), both one correctly rounded fp32 division and rounding
      // half to even, as llama_fast/ops/reference.py's quantize_kv_rows computes them: the two agree bit for bit.
      float amax = 0.f;
      bool finite = true;
      for (int64_t i = 0; i < d; ++i) {
        const float x = load(src, src_bf16, i);
        finite = finite && std::isfinite(x);
        amax = std::max(amax, std::fabs(x));
      }
      int8_t* q = static_cast<int8_t*>(dst);
      if (!finite || amax == 0.f) {
        *scale = finite ? 0.f : std::numeric_limits<float>::quiet_NaN();
        std::memset(q, 0, d);
        return;
      }
      const float s = amax / 127.f;
      *scale = s;
      for (int64_t i = 0; i < d; ++i) {
        const float r = std::nearbyint(load(src, src_bf16, i) / s);  // |r| <= 127 since |x| <= amax
        q[i] = static_cast<int8_t>(std::max(-127.f, std::min(127.f, r)));
      }
      return;
    }
  }
}

int64_t element_size(KvType type) { return type == KvType::kF32 ? 4 : type == KvType::kI8 ? 1 : 2; }

}  // namespace

void store_kv(bool src_bf16, const KvCache& cache, const void* k, int64_t k_sb, int64_t k_st, const void* v,
              int64_t v_sb, int64_t v_st, const void* slots, bool slots_int64, int64_t batch, int64_t seq) {
  const int64_t src_es = src_bf16 ? 2 : 4, dst_es = element_size(cache.type), d = cache.head_dim;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t t = 0; t < seq; ++t) {
      const int64_t i = b * seq + t;
      const int64_t slot = slots_int64 ? static_cast<const int64_t*>(slots)[i] : static_cast<const int32_t*>(slots)[i];
      if (slot < 0) continue;  // left padding
      for (int64_t h = 0; h < cache.heads; ++h) {
        const int64_t row = (b * cache.len + slot) * cache.heads + h;  // cache row (token, head)
        const int64_t src_off = h * d * src_es;
        float* ks = cache.k_scale ? cache.k_scale + row : nullptr;
        float* vs = cache.v_scale ? cache.v_scale + row : nullptr;
        store_row(src_bf16, static_cast<const char*>(k) + (b * k_sb + t * k_st) * src_es + src_off, cache.type,
                  static_cast<char*>(cache.k) + row * d * dst_es, ks, d);
        store_row(src_bf16, static_cast<const char*>(v) + (b * v_sb + t * v_st) * src_es + src_off, cache.type,
                  static_cast<char*>(cache.v) + row * d * dst_es, vs, d);
      }
    }
  }
}

}  // namespace cpu
}  // namespace llama_fast
