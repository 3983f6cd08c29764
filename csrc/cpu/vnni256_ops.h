// The building blocks of the vnni256 kernels (cpu/vnni256.h), compiled once per pass: a kernel file includes this
// header inside each pass's `#pragma GCC target` region with LF_VNNI256 naming the pass's namespace and
// LF_VNNI256_DPWSSD 1 where the pass may use AVX-VNNI (no include guard on purpose, as cpu/simd.h).
namespace llama_fast {
namespace cpu {
namespace vnni256 {
namespace LF_VNNI256 {

// acc + the products of a and b (int16) summed in pairs into int32 lanes: what vpdpwssd computes, in one AVX-VNNI
// instruction or as vpmaddwd + vpaddd. Both wrap modulo 2^32 (vpmaddwd's one overflow, two products of
// -32768 * -32768, wraps as vpdpwssd's sum does; and no weight code is -32768), so the lanes are the same.
inline __m256i dot_pairs(__m256i acc, __m256i a, __m256i b) {
#if LF_VNNI256_DPWSSD
  return _mm256_dpwssd_avx_epi32(acc, a, b);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}

inline __m256i load256(const int16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline __m256i load256(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline __m128i load128(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
inline __m128i load128(const int8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }

// The fp32 value of 16 codes (int16 lanes) dotted with 16 prepared activations per limb, as the VNNI kernels form
// it: the hi limb's int32 pair sums converted, times 2^15, plus the lo limb's (at `lo_at` int16 further).
template <bool kTwoLimbs>
inline __m256 limb_dot(__m256i codes, const int16_t* x, int64_t lo_at) {
  __m256 f = _mm256_cvtepi32_ps(dot_pairs(_mm256_setzero_si256(), codes, load256(x)));
  if constexpr (kTwoLimbs)
    f = _mm256_fmadd_ps(f, _mm256_set1_ps(32768.f),
                        _mm256_cvtepi32_ps(dot_pairs(_mm256_setzero_si256(), codes, load256(x + lo_at))));
  return f;
}

// The same for two code vectors whose sums share lanes (int4's low and high nibbles; x of the high ones at
// `second_at`): each limb's two dot products accumulate into one int32 lane before the conversion.
template <bool kTwoLimbs>
inline __m256 limb_dot2(__m256i a, __m256i b, const int16_t* x, int64_t second_at, int64_t lo_at) {
  __m256 f = _mm256_cvtepi32_ps(dot_pairs(dot_pairs(_mm256_setzero_si256(), a, load256(x)), b, load256(x + second_at)));
  if constexpr (kTwoLimbs) {
    const __m256i il =
        dot_pairs(dot_pairs(_mm256_setzero_si256(), a, load256(x + lo_at)), b, load256(x + lo_at + second_at));
    f = _mm256_fmadd_ps(f, _mm256_set1_ps(32768.f), _mm256_cvtepi32_ps(il));
  }
  return f;
}

// The sum of 16 fp32 lanes held as two halves [lo | hi], added in the order of GCC's _mm512_reduce_add_ps, which
// the VNNI kernels use: the halves, then the two 128-bit halves of that, then lanes {0,1} + {2,3}, then the two
// left. (fp32 addition is commutative, so only this tree matters, not the operands' order within each add.)
inline float sum16(__m256 lo, __m256 hi) {
  const __m256 t3 = _mm256_add_ps(hi, lo);
  const __m128 t6 = _mm_add_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
  const __m128 t8 = _mm_add_ps(t6, _mm_shuffle_ps(t6, t6, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(t8) + _mm_cvtss_f32(_mm_shuffle_ps(t8, t8, 1));
}

}  // namespace LF_VNNI256
}  // namespace vnni256
}  // namespace cpu
}  // namespace llama_fast
