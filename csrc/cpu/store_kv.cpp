// Writes new keys/values into the static KV cache at per-token slots (a plain copy: no SIMD pass needed).
#include <cstring>

#include "cpu/kernels.h"

namespace llama_fast {
namespace cpu {

void store_kv(int64_t elem_size, void* k_cache, void* v_cache, const void* k, int64_t k_sb, int64_t k_st, const void* v,
              int64_t v_sb, int64_t v_st, const void* slots, bool slots_int64, int64_t batch, int64_t seq,
              int64_t cache_len, int64_t row_elems) {
  const int64_t row_bytes = row_elems * elem_size;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t t = 0; t < seq; ++t) {
      const int64_t i = b * seq + t;
      const int64_t slot = slots_int64 ? static_cast<const int64_t*>(slots)[i] : static_cast<const int32_t*>(slots)[i];
      if (slot < 0) continue;  // left padding
      const int64_t dst = (b * cache_len + slot) * row_bytes;
      std::memcpy(static_cast<char*>(k_cache) + dst, static_cast<const char*>(k) + (b * k_sb + t * k_st) * elem_size,
                  row_bytes);
      std::memcpy(static_cast<char*>(v_cache) + dst, static_cast<const char*>(v) + (b * v_sb + t * v_st) * elem_size,
                  row_bytes);
    }
  }
}

}  // namespace cpu
}  // namespace llama_fast
