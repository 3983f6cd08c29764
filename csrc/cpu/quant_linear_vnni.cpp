// int4 / int8 GEMV on AVX512-VNNI integer dot products: the decode path of quant_linear on CPUs with VNNI.
//
// Why integers: the fp32 paths spend a convert (or a table permute) and an FMA per 16 weights, which made int4
// decode compute-bound at a third of the memory bandwidth, and bf16 dot products run at half rate on the CPUs
// we measured. vpdpwssd multiplies 32 pairs of int16 and accumulates them into 16 int32 lanes in one
// instruction at full rate. The activations are not rounded to 8 bits (which costs llama.cpp accuracy):
// each fp32 row becomes 29-bit fixed point, x = X * 2^-e with |X| < 2^29 (e from the row's absolute
// maximum), carried in two int16 limbs X = hi * 2^15 + lo (lo in 0..32767). Its error, at most 2^-30 of the
// row's maximum, is below fp32 rounding of the dot product. A bf16 row has 8 significant bits, so one limb of
// 15-bit fixed point (error 2^-16 of the maximum) is already below the bf16 rounding of the output.
//
// int4, per 64-element chunk of a weight row (32 packed bytes): vpmovzxbw widens the bytes to words; the low
// nibbles (and 0xF) are elements 2j, the high ones (shift by 4) elements 2j+1, so x is prepared once per
// call, per chunk, as [hi even | hi odd | lo even | lo odd]. Lane l of a dot product covers elements
// 4l..4l+3: lanes 0-7 the chunk's first 32 elements, 8-15 the second, so a group of 32 (GGUF's Q4_0 / Q4_1
// blocks) takes its scale from one half of the scale vector.
// int8, per 32 elements: vpmovsxbw widens 32 codes to words in order, and x is prepared as [hi | lo] per 32
// elements in order (the layout of int4's last half chunk).
// Partial sums stay below 2^24 per chunk, so their conversion to fp32 is exact.
//   w . x = 2^-e * sum_g s_g * (q . X)_g + sum_g m_g * (sum x)_g
#include "cpu/quant_linear_vnni.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/kquant_linear.h"
#include "cpu/tuning.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LF_INT4_VNNI 1
#endif
// The weight stream is software-prefetched cpu::tuning().prefetch_bytes ahead (chosen from the L1d size). The
// hardware prefetcher alone left a core at half its share of the DRAM bandwidth (the weights are read once per
// call, and the kernel's compute does not overlap the misses enough); 8 KiB ahead doubled it (6.0 -> 3.0 ns per
// 64 int4 weights on one core, measured on a Zen 4-class core). Prefetching past the end of a thread's band only
// warms the caches for the thread next to it.

namespace llama_fast {
namespace cpu {
namespace vnni {

bool supports(const QuantWeight& w) {
#ifdef LF_INT4_VNNI
  return (w.bits == 4 || w.bits == 8) && w.group_size % 32 == 0 && w.k % w.group_size == 0 && isa() >= Isa::kAvx512Vnni;
#else
  (void)w;
  return false;
#endif
}

#ifdef LF_INT4_VNNI
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")

namespace {

inline __m512 bf16x16_to_ps(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

// 16 consecutive activations from element i of an fp32 or bf16 row, as fp32.
inline __m512 load_x16(bool bf16, const void* x, int64_t i) {
  if (bf16)
    return bf16x16_to_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(x) + i)));
  return _mm512_loadu_ps(static_cast<const float*>(x) + i);
}

inline void store16(int16_t* p, __m512i v) {  // 16 int32 lanes already in int16 range
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(v));
}

// Prepares 32 elements (x0 = elements 0-15, x1 = 16-31), scaled by 2^e, as limbs: with `deinterleave`, the even
// elements at p and the odd ones at p + stride (int4), else elements 0-15 at p and 16-31 at p + stride (int8);
// the lo limbs `lo_offset` further. Returns the sum of the represented values (in units of 2^-e).
inline float prepare_half(__m512 x0, __m512 x1, __m512 scale, bool two_limbs, int16_t* p, int64_t stride,
                          int64_t lo_offset, bool deinterleave) {
  const __m512i even_idx = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd_idx = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  const __m512i a = _mm512_cvtps_epi32(_mm512_mul_ps(x0, scale));  // round to nearest
  const __m512i b = _mm512_cvtps_epi32(_mm512_mul_ps(x1, scale));
  const __m512i even = deinterleave ? _mm512_permutex2var_epi32(a, even_idx, b) : a;
  const __m512i odd = deinterleave ? _mm512_permutex2var_epi32(a, odd_idx, b) : b;
  if (two_limbs) {
    const __m512i mask = _mm512_set1_epi32(0x7fff);
    store16(p, _mm512_srai_epi32(even, 15));
    store16(p + stride, _mm512_srai_epi32(odd, 15));
    store16(p + lo_offset, _mm512_and_si512(even, mask));
    store16(p + stride + lo_offset, _mm512_and_si512(odd, mask));
  } else {  // |value| <= 2^15: saturate the one value that may round up to 32768
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtsepi32_epi16(even));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + stride), _mm512_cvtsepi32_epi16(odd));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + lo_offset), _mm256_setzero_si256());
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + stride + lo_offset), _mm256_setzero_si256());
    const __m512i lim = _mm512_set1_epi32(32767);
    return _mm512_reduce_add_ps(
        _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_min_epi32(a, lim), _mm512_min_epi32(b, lim))));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_cvtepi32_ps(a), _mm512_cvtepi32_ps(b)));
}

// 16 scales / offsets from element i of a [N, G] array (masked), as fp32.
inline __m512 load_scales16(const void* p, ScaleType t, int64_t i, __mmask16 mask) {
  switch (t) {
    case ScaleType::kF32: return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(p) + i);
    case ScaleType::kF16: return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(p) + i));
    default: return bf16x16_to_ps(_mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(p) + i));
  }
}

// Per weight row r of a block: its scales as fp32, one per 32 elements, in sc[r * K/32 ...] (so that the inner
// loops need no division by the group size), and the lanes of the offset term sum_g m_g * xsum_g per
// activation row (reduced together with the dot product's: one horizontal sum per output).
template <int R, int M>
void row_scales(const QuantWeight& w, const float* xsum, int64_t row, float* sc, __m512 (&off)[R][M]) {
  const int64_t gs = w.group_size, groups = w.k / gs, halves = w.k / 32;
  for (int r = 0; r < R; ++r) {
    __m512 ov[M];
    for (int mm = 0; mm < M; ++mm) ov[mm] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g += 16) {
      const __mmask16 mask = groups - g >= 16 ? __mmask16(0xffff) : __mmask16((1u << (groups - g)) - 1);
      const int64_t gi = (row + r) * groups + g;
      _mm512_mask_storeu_ps(sc + r * halves + g, mask, load_scales16(w.scale, w.scale_type, gi, mask));
      if (w.offset) {
        const __m512 o = load_scales16(w.offset, w.scale_type, gi, mask);
        for (int mm = 0; mm < M; ++mm)
          ov[mm] = _mm512_fmadd_ps(o, _mm512_maskz_loadu_ps(mask, xsum + mm * groups + g), ov[mm]);
      }
    }
    for (int mm = 0; mm < M; ++mm) off[r][mm] = ov[mm];  // summed with the dot product's lanes at the end
    if (gs != 32) {  // spread the group scales over their 32-element units, back to front (in place)
      float* sr = sc + r * halves;
      for (int64_t h = halves - 1; h >= 0; --h) sr[h] = sr[h * 32 / gs];
    }
  }
}

// int4: R weight rows x M activation rows. sc: scratch for R x (K / 32) fp32 scales (row_scales).
template <int R, int M, bool kTwoLimbs>
void block(const QuantWeight& w, const int16_t* xp, const float* xsum, const float* xscale, int64_t row, float* out,
           int64_t ldo, float* sc) {
  const int64_t k = w.k, halves = k / 32;
  const uint8_t* q = static_cast<const uint8_t*>(w.q);
  const int64_t ahead = tuning().prefetch_bytes;
  const bool into_l2 = tuning().int4_prefetch_into_l2;
  __m512 off[R][M];
  row_scales<R, M>(w, xsum, row, sc, off);
  const __m512i nibble = _mm512_set1_epi16(0x0f);
  const __m512 limb = _mm512_set1_ps(32768.f);
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int mm = 0; mm < M; ++mm) acc[r][mm] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 64 <= k; c += 64) {
    __m512 sv[R];
    for (int r = 0; r < R; ++r)
      sv[r] =
          _mm512_insertf32x8(_mm512_set1_ps(sc[r * halves + c / 32]), _mm256_set1_ps(sc[r * halves + c / 32 + 1]), 1);
    for (int r = 0; r < R; ++r) {
      const uint8_t* qc = q + (row + r) * (k / 2) + c / 2;
      if (into_l2)
        _mm_prefetch(reinterpret_cast<const char*>(qc + ahead), _MM_HINT_T1);
      else
        _mm_prefetch(reinterpret_cast<const char*>(qc + ahead), _MM_HINT_T0);
      const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qc)));
      const __m512i wl = _mm512_and_si512(b, nibble);
      const __m512i wh = _mm512_srli_epi16(b, 4);
      for (int mm = 0; mm < M; ++mm) {
        const int16_t* xc = xp + mm * 2 * k + 2 * c;
        __m512i ih = _mm512_dpwssd_epi32(_mm512_setzero_si512(), wl, _mm512_loadu_si512(xc));
        ih = _mm512_dpwssd_epi32(ih, wh, _mm512_loadu_si512(xc + 32));
        __m512 f = _mm512_cvtepi32_ps(ih);
        if (kTwoLimbs) {
          __m512i il = _mm512_dpwssd_epi32(_mm512_setzero_si512(), wl, _mm512_loadu_si512(xc + 64));
          il = _mm512_dpwssd_epi32(il, wh, _mm512_loadu_si512(xc + 96));
          f = _mm512_fmadd_ps(f, limb, _mm512_cvtepi32_ps(il));
        }
        acc[r][mm] = _mm512_fmadd_ps(f, sv[r], acc[r][mm]);
      }
    }
  }
  if (c < k) {  // a last half chunk of 32 elements (16 bytes), all in one group
    for (int r = 0; r < R; ++r) {
      const __m512 s = _mm512_set1_ps(sc[r * halves + c / 32]);
      const __m256i b =
          _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + (row + r) * (k / 2) + c / 2)));
      const __m256i wl = _mm256_and_si256(b, _mm512_castsi512_si256(nibble));
      const __m256i wh = _mm256_srli_epi16(b, 4);
      for (int mm = 0; mm < M; ++mm) {
        const __m256i* xc = reinterpret_cast<const __m256i*>(xp + mm * 2 * k + 2 * c);
        __m256i ih = _mm256_dpwssd_epi32(_mm256_setzero_si256(), wl, _mm256_loadu_si256(xc));
        ih = _mm256_dpwssd_epi32(ih, wh, _mm256_loadu_si256(xc + 1));
        __m256 f = _mm256_cvtepi32_ps(ih);
        if (kTwoLimbs) {
          __m256i il = _mm256_dpwssd_epi32(_mm256_setzero_si256(), wl, _mm256_loadu_si256(xc + 2));
          il = _mm256_dpwssd_epi32(il, wh, _mm256_loadu_si256(xc + 3));
          f = _mm256_fmadd_ps(f, _mm512_castps512_ps256(limb), _mm256_cvtepi32_ps(il));
        }
        acc[r][mm] = _mm512_fmadd_ps(_mm512_zextps256_ps512(f), s, acc[r][mm]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int mm = 0; mm < M; ++mm)
      out[mm * ldo + row + r] =
          _mm512_reduce_add_ps(_mm512_fmadd_ps(acc[r][mm], _mm512_set1_ps(xscale[mm]), off[r][mm]));
}

// The int8 counterpart of block(): R weight rows x M activation rows, 32 codes per step. Besides the L1
// prefetch, one into L2 kquant::kL2PrefetchFactor times further ahead (kquant_linear.h: the L1 prefetches alone fill
// the core's fill buffers).
template <int R, int M, bool kTwoLimbs>
void block8(const QuantWeight& w, const int16_t* xp, const float* xsum, const float* xscale, int64_t row, float* out,
            int64_t ldo, float* sc) {
  const int64_t k = w.k, halves = k / 32;
  const int8_t* q = static_cast<const int8_t*>(w.q);
  const int64_t ahead = tuning().prefetch_bytes;
  __m512 off[R][M];
  row_scales<R, M>(w, xsum, row, sc, off);
  const __m512 limb = _mm512_set1_ps(32768.f);
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int mm = 0; mm < M; ++mm) acc[r][mm] = _mm512_setzero_ps();
  for (int64_t c = 0; c < k; c += 32) {
    for (int r = 0; r < R; ++r) {
      const __m512 s = _mm512_set1_ps(sc[r * halves + c / 32]);
      const int8_t* qc = q + (row + r) * k + c;
      _mm_prefetch(reinterpret_cast<const char*>(qc + ahead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(qc + kquant::kL2PrefetchFactor * ahead), _MM_HINT_T1);
      const __m512i b = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qc)));
      for (int mm = 0; mm < M; ++mm) {
        const int16_t* xc = xp + mm * 2 * k + 2 * c;
        __m512 f = _mm512_cvtepi32_ps(_mm512_dpwssd_epi32(_mm512_setzero_si512(), b, _mm512_loadu_si512(xc)));
        if (kTwoLimbs)
          f = _mm512_fmadd_ps(
              f, limb, _mm512_cvtepi32_ps(_mm512_dpwssd_epi32(_mm512_setzero_si512(), b, _mm512_loadu_si512(xc + 32))));
        acc[r][mm] = _mm512_fmadd_ps(f, s, acc[r][mm]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int mm = 0; mm < M; ++mm)
      out[mm * ldo + row + r] =
          _mm512_reduce_add_ps(_mm512_fmadd_ps(acc[r][mm], _mm512_set1_ps(xscale[mm]), off[r][mm]));
}

template <int M, bool kTwoLimbs>
void rows_m(const QuantWeight& w, const int16_t* xp, const float* xsum, const float* xscale, int64_t n0, int64_t n1,
            float* out, int64_t ldo) {
  // int4 weight rows per step: enough independent accumulators to hide the latency of its longer integer chain,
  // few enough for 32 vector registers. int8 reads one weight row at a time: several rows interleaved are as many
  // short streams K bytes apart, which an AMD Zen 4 core's prefetchers followed at ~9 GB/s against ~13 for one
  // sequential stream (SmolLM2 Q8_0, one thread; llama.cpp's GEMV also reads rows one after another). int4 at
  // M = 1 measured the same either way there (its integer work, not the stream, is its limit), so it keeps 4.
  constexpr int R = M == 1 ? 4 : (M <= 4 ? 2 : 1);
  thread_local std::vector<float> sc;
  sc.resize(static_cast<size_t>(R * (w.k / 32) + 16));
  int64_t row = n0;
  if (w.bits == 8) {
    for (; row < n1; ++row) block8<1, M, kTwoLimbs>(w, xp, xsum, xscale, row, out, ldo, sc.data());
    return;
  }
  for (; row + R <= n1; row += R) block<R, M, kTwoLimbs>(w, xp, xsum, xscale, row, out, ldo, sc.data());
  for (; row < n1; ++row) block<1, M, kTwoLimbs>(w, xp, xsum, xscale, row, out, ldo, sc.data());
}

template <bool kTwoLimbs>
void rows_limbs(const QuantWeight& w, const int16_t* xp, const float* xsum, const float* xscale, int64_t m, int64_t n0,
                int64_t n1, float* out, int64_t ldo) {
  switch (m) {
    case 1: return rows_m<1, kTwoLimbs>(w, xp, xsum, xscale, n0, n1, out, ldo);
    case 2: return rows_m<2, kTwoLimbs>(w, xp, xsum, xscale, n0, n1, out, ldo);
    case 3: return rows_m<3, kTwoLimbs>(w, xp, xsum, xscale, n0, n1, out, ldo);
    case 4: return rows_m<4, kTwoLimbs>(w, xp, xsum, xscale, n0, n1, out, ldo);
    case 5: return rows_m<5, kTwoLimbs>(w, xp, xsum, xscale, n0, n1, out, ldo);
    case 6: return rows_m<6, kTwoLimbs>(w, xp, xsum, xscale, n0, n1, out, ldo);
    case 7: return rows_m<7, kTwoLimbs>(w, xp, xsum, xscale, n0, n1, out, ldo);
    default: return rows_m<8, kTwoLimbs>(w, xp, xsum, xscale, n0, n1, out, ldo);
  }
}

}  // namespace

bool prepare(bool bf16, const void* x, int64_t m, const QuantWeight& w, int16_t* xp, float* xsum, float* xscale) {
  const int64_t k = w.k, gs = w.group_size, groups = k / gs;
  const bool two_limbs = !bf16;
  std::fill(xsum, xsum + m * groups, 0.f);
  for (int64_t r = 0; r < m; ++r) {
    const void* xr = bf16 ? static_cast<const void*>(static_cast<const uint16_t*>(x) + r * k)
                          : static_cast<const void*>(static_cast<const float*>(x) + r * k);
    __m512 vmax = _mm512_setzero_ps();
    __mmask16 nan = 0;  // max_ps may drop a NaN operand, so NaNs are looked for separately, in the same pass
    for (int64_t i = 0; i < k; i += 16) {
      const __m512 v = load_x16(bf16, xr, i);
      vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
    const float amax = _mm512_reduce_max_ps(vmax);
    if (nan || !std::isfinite(amax)) return false;
    // x * 2^e with |x * 2^e| < 2^29 (two limbs) or <= 2^15 (one limb, saturated)
    int exp2 = 0;
    if (amax > 0.f) std::frexp(amax, &exp2);  // amax < 2^exp2
    const int e = (two_limbs ? 29 : 15) - exp2;
    if (e > 127) return false;  // a row of subnormal-sized values: 2^e would overflow fp32
    const __m512 scale = _mm512_set1_ps(std::ldexp(1.f, e));
    xscale[r] = std::ldexp(1.f, -e);
    int16_t* pr = xp + r * 2 * k;
    float* sr = xsum + r * groups;
    int64_t c = 0;
    for (; w.bits == 4 && c + 64 <= k; c += 64) {  // first half chunk -> words 0-15 of each part, second -> 16-31
      int16_t* p = pr + 2 * c;
      sr[c / gs] += prepare_half(load_x16(bf16, xr, c), load_x16(bf16, xr, c + 16), scale, two_limbs, p, 32, 64, true);
      sr[(c + 32) / gs] +=
          prepare_half(load_x16(bf16, xr, c + 32), load_x16(bf16, xr, c + 48), scale, two_limbs, p + 16, 32, 64, true);
    }
    // int4's last half chunk [hi even 16 | hi odd 16 | lo even 16 | lo odd 16]; int8 in order: [hi 32 | lo 32]
    for (; c < k; c += 32)
      sr[c / gs] +=
          prepare_half(load_x16(bf16, xr, c), load_x16(bf16, xr, c + 16), scale, two_limbs, pr + 2 * c, 16, 32,
                       /*deinterleave=*/w.bits == 4);
    for (int64_t g = 0; g < groups; ++g) sr[g] *= xscale[r];
  }
  return true;
}

void rows(const QuantWeight& w, const int16_t* xp, const float* xsum, const float* xscale, int64_t m, bool two_limbs,
          int64_t n0, int64_t n1, float* out, int64_t ldo) {
  if (two_limbs)
    rows_limbs<true>(w, xp, xsum, xscale, m, n0, n1, out, ldo);
  else
    rows_limbs<false>(w, xp, xsum, xscale, m, n0, n1, out, ldo);
}

#pragma GCC pop_options
#else
bool prepare(bool, const void*, int64_t, const QuantWeight&, int16_t*, float*, float*) { return false; }
void rows(const QuantWeight&, const int16_t*, const float*, const float*, int64_t, bool, int64_t, int64_t, float*,
          int64_t) {}
#endif

}  // namespace vnni
}  // namespace cpu
}  // namespace llama_fast
