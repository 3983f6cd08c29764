// int4 / int8 GEMV on 256-bit integer dot products (cpu/vnni256.h): quant_linear_vnni.cpp's kernel for CPUs
// without AVX512-VNNI. Read that file first; this one repeats its arithmetic with each 512-bit vector held as two
// 256-bit halves [lanes 0-7 | lanes 8-15].
//
// The prepared activations keep vnni::prepare's layout, which suits 256-bit vectors as it is. int4, per 64-element
// chunk [hi even 32 | hi odd 32 | lo even 32 | lo odd 32]: the chunk's bytes 0-15 hold elements 0-31, whose even
// and odd elements are words 0-15 of the even and odd parts (lanes 0-7 of the VNNI kernel's sums), bytes 16-31
// elements 32-63 (words 16-31: lanes 8-15). int8, per 32 elements [hi 32 | lo 32]: codes 0-15 meet words 0-15.
// So half h of a chunk is one 256-bit vector of codes against the same activations the VNNI kernel's lanes
// 8h..8h+7 see, with the same int32 sums.
//
// Compiled twice (the file includes itself, like cpu/foreach_isa.h): namespace madd with vpmaddwd + vpaddd for
// AVX2, namespace avx_vnni with AVX-VNNI's vpdpwssd; rows() picks one at run time.
//
// fp32-FMA kernel (madd::fma_*, as kquant_linear_fma.cpp does for ggml blocks): on AVX2 cores without VNNI
// (cpu::fp32_fma_gemv) prepare() may lay the activations out as fp32 in the same xp buffer (2K int16 = K fp32 per
// row; int4 permuted per 16 to [even 8 | odd 8], the nibbles' order), their fp32 sums per group in xsum (offsets),
// and xscale -1, the mark rows() reads (the fixed point's xscale is 2^-e > 0), so quant_linear.cpp's calls need no
// change. Per 32 weights the codes become four fp32 vectors (int8: vpmovsxbd from the row; int4: vpmovzxbd of 8
// bytes, mask / shift), one vmulps + three FMAs per activation row, one FMA with the group's scale. Measured on
// Zen 3 (docs/KERNELS.md) it loses at one row to the integer kernel here (whose int8 work is one vpmovsxbw per 16
// codes and no fp16 per block, unlike the ggml integer kernel) and wins for int8 from 2 fp32 rows, where the
// conversion is shared: the default takes it only there; LLAMA_FAST_FMA_GEMV=1 forces it for every int4 / int8
// call (tests/ops/test_fma_gemv_forced.py), 0 never. The error is an fp32 dot product's in another order (the
// reference comparison's tolerance, not the VNNI kernels' bits). kquant_linear_avx2.cpp, which reads only the
// fixed point, prepares with prepare_fixed_point().
#ifndef LF_VNNI256
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/quant_scales.h"
#include "cpu/tuning.h"
#include "cpu/vnni256.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LF_VNNI256_X86 1

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define LF_VNNI256 madd
#define LF_VNNI256_DPWSSD 0
#include "cpu/quant_linear_avx2.cpp"
#undef LF_VNNI256
#undef LF_VNNI256_DPWSSD
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")
#define LF_VNNI256 avx_vnni
#define LF_VNNI256_DPWSSD 1
#include "cpu/quant_linear_avx2.cpp"
#undef LF_VNNI256
#undef LF_VNNI256_DPWSSD
#pragma GCC pop_options
#endif

namespace llama_fast {
namespace cpu {
namespace vnni256 {

bool available() {
#ifdef LF_VNNI256_X86
  return isa() == Isa::kAvx2 || isa() == Isa::kAvx512;
#else
  return false;
#endif
}

bool uses_avx_vnni() {
  static const bool use = [] {
    const char* env = std::getenv("LLAMA_FAST_AVX_VNNI");
    return has_avx_vnni() && !(env != nullptr && std::strcmp(env, "0") == 0);
  }();
  return use;
}

bool supports(const QuantWeight& w) {
  return (w.bits == 4 || w.bits == 8) && w.group_size % 32 == 0 && w.k % w.group_size == 0 && available();
}

#ifdef LF_VNNI256_X86
// Where the fp32-FMA kernel runs (file header): int8 with fp32 activations from this many rows on CPUs where
// cpu::fp32_fma_gemv() holds, every int4 / int8 call when LLAMA_FAST_FMA_GEMV=1 forces it.
constexpr int64_t kFmaFromRows = 2;

bool prepare(bool bf16, const void* x, int64_t m, const QuantWeight& w, int16_t* xp, float* xsum, float* xscale) {
  if (fp32_fma_gemv() && (fp32_fma_gemv_forced() || (w.bits == 8 && !bf16 && m >= kFmaFromRows)))
    return madd::fma_prepare(bf16, x, m, w, xp, xsum, xscale);
  return madd::prepare(bf16, x, m, w, xp, xsum, xscale);
}

bool prepare_fixed_point(bool bf16, const void* x, int64_t m, const QuantWeight& w, int16_t* xp, float* xsum,
                         float* xscale) {
  return madd::prepare(bf16, x, m, w, xp, xsum, xscale);
}

void rows(const QuantWeight& w, const int16_t* xp, const float* xsum, const float* xscale, int64_t m, bool two_limbs,
          int64_t n0, int64_t n1, float* out, int64_t ldo) {
  if (xscale[0] < 0.f)  // fma_prepare's layout
    madd::fma_rows(w, xp, xsum, m, n0, n1, out, ldo);
  else if (uses_avx_vnni())
    avx_vnni::rows(w, xp, xsum, xscale, m, two_limbs, n0, n1, out, ldo);
  else
    madd::rows(w, xp, xsum, xscale, m, two_limbs, n0, n1, out, ldo);
}
#else
bool prepare(bool, const void*, int64_t, const QuantWeight&, int16_t*, float*, float*) { return false; }
bool prepare_fixed_point(bool, const void*, int64_t, const QuantWeight&, int16_t*, float*, float*) { return false; }
void rows(const QuantWeight&, const int16_t*, const float*, const float*, int64_t, bool, int64_t, int64_t, float*,
          int64_t) {}
#endif

}  // namespace vnni256
}  // namespace cpu
}  // namespace llama_fast

#else  // one pass: namespace vnni256::LF_VNNI256

#include "cpu/vnni256_ops.h"

namespace llama_fast {
namespace cpu {
namespace vnni256 {
namespace LF_VNNI256 {
namespace {

inline __m256 bf16x8_to_ps(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }

// 8 consecutive activations from element i of an fp32 or bf16 row, as fp32.
inline __m256 load_x8(bool bf16, const void* x, int64_t i) {
  if (bf16) return bf16x8_to_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i)));
  return _mm256_loadu_ps(static_cast<const float*>(x) + i);
}

// 16 int32 lanes [lo | hi] (already in int16 range, or saturated) as 16 int16 at p.
inline void store16(int16_t* p, __m256i lo, __m256i hi) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), _MM_SHUFFLE(3, 1, 2, 0)));
}

// The even (kOdd = false) or odd lanes of the 16 int32 [u | v], in order.
template <bool kOdd>
inline __m256i pick_lanes(__m256i u, __m256i v) {
  constexpr int sel = kOdd ? _MM_SHUFFLE(3, 1, 3, 1) : _MM_SHUFFLE(2, 0, 2, 0);
  const __m256 s = _mm256_shuffle_ps(_mm256_castsi256_ps(u), _mm256_castsi256_ps(v), sel);  // per 128: u u v v
  return _mm256_permute4x64_epi64(_mm256_castps_si256(s), _MM_SHUFFLE(3, 1, 2, 0));
}

// vnni::prepare's prepare_half: 32 elements x[0..32) (four vectors of 8), scaled by 2^e, as limbs; with
// `deinterleave` the even elements at p and the odd ones at p + stride (int4), else elements 0-15 at p and 16-31
// at p + stride (int8); the lo limbs `lo_offset` further. Returns the sum of the represented values (units of
// 2^-e), added as vnni::prepare adds them (lane i of a + b, then sum16).
inline float prepare_half(const __m256 (&x)[4], __m256 scale, bool two_limbs, int16_t* p, int64_t stride,
                          int64_t lo_offset, bool deinterleave) {
  __m256i v[4];  // a = elements 0-15 (v0, v1), b = 16-31 (v2, v3); round to nearest
  for (int i = 0; i < 4; ++i) v[i] = _mm256_cvtps_epi32(_mm256_mul_ps(x[i], scale));
  __m256i even[2] = {v[0], v[1]}, odd[2] = {v[2], v[3]};
  if (deinterleave) {
    even[0] = pick_lanes<false>(v[0], v[1]), even[1] = pick_lanes<false>(v[2], v[3]);
    odd[0] = pick_lanes<true>(v[0], v[1]), odd[1] = pick_lanes<true>(v[2], v[3]);
  }
  if (two_limbs) {
    const __m256i mask = _mm256_set1_epi32(0x7fff);
    store16(p, _mm256_srai_epi32(even[0], 15), _mm256_srai_epi32(even[1], 15));
    store16(p + stride, _mm256_srai_epi32(odd[0], 15), _mm256_srai_epi32(odd[1], 15));
    store16(p + lo_offset, _mm256_and_si256(even[0], mask), _mm256_and_si256(even[1], mask));
    store16(p + stride + lo_offset, _mm256_and_si256(odd[0], mask), _mm256_and_si256(odd[1], mask));
    return sum16(_mm256_add_ps(_mm256_cvtepi32_ps(v[0]), _mm256_cvtepi32_ps(v[2])),
                 _mm256_add_ps(_mm256_cvtepi32_ps(v[1]), _mm256_cvtepi32_ps(v[3])));
  }
  // |value| <= 2^15: the packs saturate the one value that may round up to 32768
  store16(p, even[0], even[1]);
  store16(p + stride, odd[0], odd[1]);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + lo_offset), _mm256_setzero_si256());
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + stride + lo_offset), _mm256_setzero_si256());
  const __m256i lim = _mm256_set1_epi32(32767);
  auto clamped_sum = [&](__m256i a, __m256i b) {
    return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_min_epi32(a, lim), _mm256_min_epi32(b, lim)));
  };
  return sum16(clamped_sum(v[0], v[2]), clamped_sum(v[1], v[3]));
}

// 8 scales / offsets from element i of a [N, G] array, as fp32.
inline __m256 load_scales8(const void* p, ScaleType t, int64_t i) {
  switch (t) {
    case ScaleType::kF32: return _mm256_loadu_ps(static_cast<const float*>(p) + i);
    case ScaleType::kF16:
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)));
    default:
      return bf16x8_to_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)));
  }
}

// Elements [end - count, end) of a scale / offset array as fp32 in lanes 0..count-1 and 0 in the others (the VNNI
// kernel's masked loads), for 0 < count < 8 <= end: the 8 elements ending at `end` (inside the array) moved down.
inline __m256 load_scales_tail(const void* p, ScaleType t, int64_t end, int64_t count, __m256i live) {
  const __m256i from = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(8 - count));
  return _mm256_and_ps(_mm256_permutevar8x32_ps(load_scales8(p, t, end - 8), from), _mm256_castsi256_ps(live));
}

// The VNNI kernel's row_scales: per weight row r, its scales as fp32 one per 32 elements in sc[r * K/32 ...], and
// the 16 lanes [lo | hi] of its offset term sum_g m_g * xsum_g per activation row in off[r][mm] (group g in lane
// g % 16, summed with the dot product's lanes at the end). Groups 8 at a time, the last G % 8 in lanes loaded
// whole and moved (a vector built from scalar stores would stall the vector load that follows it).
template <int R, int M>
void row_scales(const QuantWeight& w, const float* xsum, int64_t row, float* sc, float (&off)[R][M][16]) {
  const int64_t gs = w.group_size, groups = w.k / gs, halves = w.k / 32, full = groups / 8 * 8;
  for (int r = 0; r < R; ++r) {
    const int64_t g0 = (row + r) * groups;
    __m256 ov[M][2];
    for (int mm = 0; mm < M; ++mm) ov[mm][0] = ov[mm][1] = _mm256_setzero_ps();
    auto eight = [&](int64_t g, auto hc) {  // groups g..g+7 into lanes 8h..8h+7 (h a compile-time index)
      constexpr int h = decltype(hc)::value;
      _mm256_storeu_ps(sc + r * halves + g, load_scales8(w.scale, w.scale_type, g0 + g));
      if (w.offset) {
        const __m256 o = load_scales8(w.offset, w.scale_type, g0 + g);
        for (int mm = 0; mm < M; ++mm)
          ov[mm][h] = _mm256_fmadd_ps(o, _mm256_loadu_ps(xsum + mm * groups + g), ov[mm][h]);
      }
    };
    int64_t g = 0;
    for (; g + 16 <= full; g += 16) {
      eight(g, std::integral_constant<int, 0>{});
      eight(g + 8, std::integral_constant<int, 1>{});
    }
    if (g < full) eight(g, std::integral_constant<int, 0>{});
    for (int mm = 0; mm < M; ++mm) {
      _mm256_store_ps(off[r][mm], ov[mm][0]);
      _mm256_store_ps(off[r][mm] + 8, ov[mm][1]);
    }
    const int64_t tail = groups - full;
    // The last G % 8 groups: lanes (full % 16) + 0..tail-1, the others 0. No masked loads or stores: on AMD cores
    // (Zen 2/3) vmaskmovps is microcoded, and once per row it cost ~10% of the GEMV at K = 576 (18 groups). The 8
    // values ending at the row's last group are loaded whole and moved down (full > 0: they lie inside the row),
    // and the scales stored whole: sc has 8 floats of slack (rows_m), and lanes past the tail land on the next
    // row's scales, which that row writes afterwards.
    if (tail > 0 && full > 0) {
      const __m256i live =
          _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(tail)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      _mm256_storeu_ps(sc + r * halves + full, load_scales_tail(w.scale, w.scale_type, g0 + groups, tail, live));
      if (w.offset) {
        const int h = (full / 8) % 2;
        const __m256 o = load_scales_tail(w.offset, w.scale_type, g0 + groups, tail, live);
        for (int mm = 0; mm < M; ++mm)
          _mm256_store_ps(off[r][mm] + 8 * h,
                          _mm256_fmadd_ps(o, load_scales_tail(xsum + mm * groups, ScaleType::kF32, groups, tail, live),
                                          _mm256_load_ps(off[r][mm] + 8 * h)));
      }
    } else {  // fewer than 8 groups in a row: one by one (std::fma: the same single rounding as a lane's)
      for (int64_t g = full; g < groups; ++g) {
        sc[r * halves + g] = scale_at(w.scale, w.scale_type, g0 + g);
        if (w.offset) {
          const float o = scale_at(w.offset, w.scale_type, g0 + g);
          for (int mm = 0; mm < M; ++mm) off[r][mm][g % 16] = std::fma(o, xsum[mm * groups + g], off[r][mm][g % 16]);
        }
      }
    }
    if (gs != 32) {  // spread the group scales over their 32-element units, back to front (in place)
      float* sr = sc + r * halves;
      for (int64_t h = halves - 1; h >= 0; --h) sr[h] = sr[h * 32 / gs];
    }
  }
}

// out[mm * ldo + row + r] from the accumulated lanes [lo | hi], as the VNNI kernel ends: acc * xscale + offset lanes,
// summed.
template <int R, int M>
void finish(const __m256 (&acc)[R][M][2], const float (&off)[R][M][16], const float* xscale, int64_t row, float* out,
            int64_t ldo) {
  for (int r = 0; r < R; ++r)
    for (int mm = 0; mm < M; ++mm) {
      const __m256 xs = _mm256_set1_ps(xscale[mm]);
      out[mm * ldo + row + r] = sum16(_mm256_fmadd_ps(acc[r][mm][0], xs, _mm256_load_ps(off[r][mm])),
                                      _mm256_fmadd_ps(acc[r][mm][1], xs, _mm256_load_ps(off[r][mm] + 8)));
    }
}

// int4: R weight rows x M activation rows (the VNNI kernel's block()). sc: scratch for R x (K / 32) fp32 scales.
template <int R, int M, bool kTwoLimbs>
void block4(const QuantWeight& w, const int16_t* xp, const float* xsum, const float* xscale, int64_t row, float* out,
            int64_t ldo, float* sc) {
  const int64_t k = w.k, halves = k / 32;
  const uint8_t* q = static_cast<const uint8_t*>(w.q);
  const int64_t ahead = tuning().prefetch_bytes;
  alignas(32) float off[R][M][16];
  row_scales<R, M>(w, xsum, row, sc, off);
  const __m256i nibble = _mm256_set1_epi16(0x0f);
  __m256 acc[R][M][2];
  for (int r = 0; r < R; ++r)
    for (int mm = 0; mm < M; ++mm) acc[r][mm][0] = acc[r][mm][1] = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 64 <= k; c += 64) {
    for (int r = 0; r < R; ++r) {
      const uint8_t* qc = q + (row + r) * (k / 2) + c / 2;
      _mm_prefetch(reinterpret_cast<const char*>(qc + ahead), _MM_HINT_T0);
      for (int h = 0; h < 2; ++h) {  // bytes 16h..16h+15: elements 32h..32h+31, lanes 8h..8h+7
        const __m256i b = _mm256_cvtepu8_epi16(load128(qc + 16 * h));
        const __m256i wl = _mm256_and_si256(b, nibble), wh = _mm256_srli_epi16(b, 4);
        const __m256 s = _mm256_broadcast_ss(sc + r * halves + c / 32 + h);
        for (int mm = 0; mm < M; ++mm) {
          const int16_t* xc = xp + mm * 2 * k + 2 * c + 16 * h;
          acc[r][mm][h] = _mm256_fmadd_ps(limb_dot2<kTwoLimbs>(wl, wh, xc, 32, 64), s, acc[r][mm][h]);
        }
      }
    }
  }
  if (c < k) {  // a last half chunk of 32 elements (16 bytes), all in one group: lanes 0-7 only
    for (int r = 0; r < R; ++r) {
      const __m256 s = _mm256_broadcast_ss(sc + r * halves + c / 32);
      const __m256i b = _mm256_cvtepu8_epi16(load128(q + (row + r) * (k / 2) + c / 2));
      const __m256i wl = _mm256_and_si256(b, nibble), wh = _mm256_srli_epi16(b, 4);
      for (int mm = 0; mm < M; ++mm) {
        const int16_t* xc = xp + mm * 2 * k + 2 * c;
        acc[r][mm][0] = _mm256_fmadd_ps(limb_dot2<kTwoLimbs>(wl, wh, xc, 16, 32), s, acc[r][mm][0]);
      }
    }
  }
  finish<R, M>(acc, off, xscale, row, out, ldo);
}

// int8: R weight rows x M activation rows, 32 codes per step (the VNNI kernel's block8()).
template <int R, int M, bool kTwoLimbs>
void block8(const QuantWeight& w, const int16_t* xp, const float* xsum, const float* xscale, int64_t row, float* out,
            int64_t ldo, float* sc) {
  const int64_t k = w.k, halves = k / 32;
  const int8_t* q = static_cast<const int8_t*>(w.q);
  const int64_t ahead = tuning().prefetch_bytes;
  alignas(32) float off[R][M][16];
  row_scales<R, M>(w, xsum, row, sc, off);
  __m256 acc[R][M][2];
  for (int r = 0; r < R; ++r)
    for (int mm = 0; mm < M; ++mm) acc[r][mm][0] = acc[r][mm][1] = _mm256_setzero_ps();
  for (int64_t c = 0; c < k; c += 32) {
    for (int r = 0; r < R; ++r) {
      const __m256 s = _mm256_broadcast_ss(sc + r * halves + c / 32);
      const int8_t* qc = q + (row + r) * k + c;
      _mm_prefetch(reinterpret_cast<const char*>(qc + ahead), _MM_HINT_T0);
      for (int h = 0; h < 2; ++h) {  // codes 16h..16h+15: lanes 8h..8h+7
        const __m256i b = _mm256_cvtepi8_epi16(load128(qc + 16 * h));
        for (int mm = 0; mm < M; ++mm) {
          const int16_t* xc = xp + mm * 2 * k + 2 * c + 16 * h;
          acc[r][mm][h] = _mm256_fmadd_ps(limb_dot<kTwoLimbs>(b, xc, 32), s, acc[r][mm][h]);
        }
      }
    }
  }
  finish<R, M>(acc, off, xscale, row, out, ldo);
}

template <int M, bool kTwoLimbs>
void rows_m(const QuantWeight& w, const int16_t* xp, const float* xsum, const float* xscale, int64_t n0, int64_t n1,
            float* out, int64_t ldo) {
  // Rows per step: enough independent accumulators to hide the latency, few enough for 16 vector registers (each
  // row and activation row holds two).
  constexpr int R = M == 1 ? 2 : 1;
  thread_local std::vector<float> sc;
  sc.resize(static_cast<size_t>(R * (w.k / 32) + 8));  // + 8: row_scales stores a row's last scales whole
  int64_t row = n0;
  if (w.bits == 8) {
    for (; row + R <= n1; row += R) block8<R, M, kTwoLimbs>(w, xp, xsum, xscale, row, out, ldo, sc.data());
    for (; row < n1; ++row) block8<1, M, kTwoLimbs>(w, xp, xsum, xscale, row, out, ldo, sc.data());
    return;
  }
  for (; row + R <= n1; row += R) block4<R, M, kTwoLimbs>(w, xp, xsum, xscale, row, out, ldo, sc.data());
  for (; row < n1; ++row) block4<1, M, kTwoLimbs>(w, xp, xsum, xscale, row, out, ldo, sc.data());
}

// Up to 4 activation rows per pass over the weight rows (8 accumulators of 16 fp32 lanes fill the registers); a
// thread's band of weight rows is still in cache for the next 4.
template <bool kTwoLimbs>
void rows_limbs(const QuantWeight& w, const int16_t* xp, const float* xsum, const float* xscale, int64_t m, int64_t n0,
                int64_t n1, float* out, int64_t ldo) {
  const int64_t groups = w.k / w.group_size;
  for (int64_t m0 = 0; m0 < m; m0 += 4) {
    const int16_t* x = xp + m0 * 2 * w.k;
    const float *s = xsum + m0 * groups, *xs = xscale + m0;
    float* o = out + m0 * ldo;
    switch (std::min<int64_t>(4, m - m0)) {
      case 1: rows_m<1, kTwoLimbs>(w, x, s, xs, n0, n1, o, ldo); break;
      case 2: rows_m<2, kTwoLimbs>(w, x, s, xs, n0, n1, o, ldo); break;
      case 3: rows_m<3, kTwoLimbs>(w, x, s, xs, n0, n1, o, ldo); break;
      default: rows_m<4, kTwoLimbs>(w, x, s, xs, n0, n1, o, ldo); break;
    }
  }
}

#if !LF_VNNI256_DPWSSD
// The fp32-FMA kernel (file header): R weight rows x M activation rows, x the fp32 activations as fma_prepare
// lays them out. Per 32 weights (a chunk) the codes become four vectors of 8 fp32 values (exact: small integers),
// dotted with the activations by one vmulps and three FMAs into a chunk sum, which one FMA with the chunk's scale
// adds to one of two accumulators (chunks alternate: the FMA latency). The group's scale is read where its first
// chunk starts (one scalar conversion; no per-row table of scales: with K = 576 a row is 18 chunks, and
// row_scales' pass cost more than the conversions), its offset times the activations' group sum goes to a scalar.
template <ScaleType ST>
inline float scale_f32(const void* p, int64_t i) {
  if constexpr (ST == ScaleType::kF32) return static_cast<const float*>(p)[i];
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  if constexpr (ST == ScaleType::kF16) return _cvtsh_ss(h);
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <int R, int M, int kBits, ScaleType ST>
void fma_block(const QuantWeight& w, const float* x, const float* xsum, int64_t row, float* out, int64_t ldo) {
  const int64_t k = w.k, gs = w.group_size, groups = k / gs;
  const int64_t ahead = tuning().prefetch_bytes;
  constexpr bool int4 = kBits == 4;
  const int64_t row_bytes = int4 ? k / 2 : k;
  const uint8_t* q = static_cast<const uint8_t*>(w.q);
  __m256 acc[R][M][2];
  float offs[R][M];
  for (int r = 0; r < R; ++r)
    for (int mm = 0; mm < M; ++mm) acc[r][mm][0] = acc[r][mm][1] = _mm256_setzero_ps(), offs[r][mm] = 0.f;
  __m256 s[R];
  const __m256i nibble = _mm256_set1_epi32(0x0f);
  auto chunk = [&](int64_t c, auto hc) {
    constexpr int h = decltype(hc)::value;
    const bool new_group = gs == 32 || c % gs == 0;
    for (int r = 0; r < R; ++r) {
      if (new_group) {
        const int64_t gi = (row + r) * groups + c / gs;
        s[r] = _mm256_set1_ps(scale_f32<ST>(w.scale, gi));
        if (w.offset) {
          const float o = scale_f32<ST>(w.offset, gi);
          for (int mm = 0; mm < M; ++mm) offs[r][mm] = std::fma(o, xsum[mm * groups + c / gs], offs[r][mm]);
        }
      }
      __m256 wv[4];
      if constexpr (int4) {  // 16 bytes: byte j holds elements 2j (low nibble) and 2j + 1; vector 2i + 1 the odd ones
                             // of 2i
        const uint8_t* qc = q + (row + r) * row_bytes + c / 2;
        if (h == 0) _mm_prefetch(reinterpret_cast<const char*>(qc + ahead), _MM_HINT_T0);
        for (int i = 0; i < 2; ++i) {
          const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qc + 8 * i)));
          wv[2 * i] = _mm256_cvtepi32_ps(_mm256_and_si256(b, nibble));
          wv[2 * i + 1] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
        }
      } else {  // vpmovsxbd straight from the row, 8 codes each
        const uint8_t* qc = q + (row + r) * row_bytes + c;
        _mm_prefetch(reinterpret_cast<const char*>(qc + ahead), _MM_HINT_T0);
        for (int e = 0; e < 4; ++e)
          wv[e] =
              _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qc + 8 * e))));
      }
      for (int mm = 0; mm < M; ++mm) {
        const float* xc = x + mm * k + c;
        __m256 t = _mm256_mul_ps(wv[0], _mm256_loadu_ps(xc));
        t = _mm256_fmadd_ps(wv[1], _mm256_loadu_ps(xc + 8), t);
        t = _mm256_fmadd_ps(wv[2], _mm256_loadu_ps(xc + 16), t);
        t = _mm256_fmadd_ps(wv[3], _mm256_loadu_ps(xc + 24), t);
        acc[r][mm][h] = _mm256_fmadd_ps(t, s[r], acc[r][mm][h]);
      }
    }
  };
  int64_t c = 0;
  for (; c + 64 <= k; c += 64) {
    chunk(c, std::integral_constant<int, 0>{});
    chunk(c + 32, std::integral_constant<int, 1>{});
  }
  if (c < k) chunk(c, std::integral_constant<int, 0>{});
  for (int r = 0; r < R; ++r)
    for (int mm = 0; mm < M; ++mm) out[mm * ldo + row + r] = sum16(acc[r][mm][0], acc[r][mm][1]) + offs[r][mm];
}

template <int M, int R, int kBits, ScaleType ST>
void fma_rows_mr(const QuantWeight& w, const float* x, const float* xsum, int64_t n0, int64_t n1, float* out,
                 int64_t ldo) {
  int64_t row = n0;
  for (; row + R <= n1; row += R) fma_block<R, M, kBits, ST>(w, x, xsum, row, out, ldo);
  for (; row < n1; ++row) fma_block<1, M, kBits, ST>(w, x, xsum, row, out, ldo);
}

template <int M, int kBits>
void fma_rows_mb(const QuantWeight& w, const float* x, const float* xsum, int64_t n0, int64_t n1, float* out,
                 int64_t ldo) {
  constexpr int R = M == 1 ? 2 : 1;  // as rows_m (one row at a time measured no faster for M = 1)
  switch (w.scale_type) {
    case ScaleType::kF32: return fma_rows_mr<M, R, kBits, ScaleType::kF32>(w, x, xsum, n0, n1, out, ldo);
    case ScaleType::kF16: return fma_rows_mr<M, R, kBits, ScaleType::kF16>(w, x, xsum, n0, n1, out, ldo);
    default: return fma_rows_mr<M, R, kBits, ScaleType::kBF16>(w, x, xsum, n0, n1, out, ldo);
  }
}

template <int M>
void fma_rows_m(const QuantWeight& w, const float* x, const float* xsum, int64_t n0, int64_t n1, float* out,
                int64_t ldo) {
  if (w.bits == 8)
    fma_rows_mb<M, 8>(w, x, xsum, n0, n1, out, ldo);
  else
    fma_rows_mb<M, 4>(w, x, xsum, n0, n1, out, ldo);
}
#endif

}  // namespace

#if !LF_VNNI256_DPWSSD
// vnni::prepare, 8 lanes at a time (see quant_linear_vnni.cpp): the same fixed point, layout and sums.
bool prepare(bool bf16, const void* x, int64_t m, const QuantWeight& w, int16_t* xp, float* xsum, float* xscale) {
  const int64_t k = w.k, gs = w.group_size, groups = k / gs;
  const bool two_limbs = !bf16;
  std::fill(xsum, xsum + m * groups, 0.f);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int64_t r = 0; r < m; ++r) {
    const void* xr = bf16 ? static_cast<const void*>(static_cast<const uint16_t*>(x) + r * k)
                          : static_cast<const void*>(static_cast<const float*>(x) + r * k);
    __m256 vmax = _mm256_setzero_ps(), nan = _mm256_setzero_ps();  // max_ps may drop a NaN: look for them apart
    for (int64_t i = 0; i < k; i += 8) {
      const __m256 v = load_x8(bf16, xr, i);
      vmax = _mm256_max_ps(vmax, _mm256_and_ps(v, abs_mask));
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, vmax);
    const float amax = *std::max_element(lanes, lanes + 8);  // max is exact in any order
    if (_mm256_movemask_ps(nan) != 0 || !std::isfinite(amax)) return false;
    int exp2 = 0;
    if (amax > 0.f) std::frexp(amax, &exp2);  // amax < 2^exp2
    const int e = (two_limbs ? 29 : 15) - exp2;
    if (e > 127) return false;  // a row of subnormal-sized values: 2^e would overflow fp32
    const __m256 scale = _mm256_set1_ps(std::ldexp(1.f, e));
    xscale[r] = std::ldexp(1.f, -e);
    int16_t* pr = xp + r * 2 * k;
    float* sr = xsum + r * groups;
    auto load32 = [&](int64_t c, __m256(&v)[4]) {
      for (int i = 0; i < 4; ++i) v[i] = load_x8(bf16, xr, c + 8 * i);
    };
    __m256 v[4];
    int64_t c = 0;
    for (; w.bits == 4 && c + 64 <= k; c += 64) {  // first half chunk -> words 0-15 of each part, second -> 16-31
      int16_t* p = pr + 2 * c;
      load32(c, v);
      sr[c / gs] += prepare_half(v, scale, two_limbs, p, 32, 64, true);
      load32(c + 32, v);
      sr[(c + 32) / gs] += prepare_half(v, scale, two_limbs, p + 16, 32, 64, true);
    }
    // int4's last half chunk [hi even 16 | hi odd 16 | lo even 16 | lo odd 16]; int8 in order: [hi 32 | lo 32]
    for (; c < k; c += 32) {
      load32(c, v);
      sr[c / gs] += prepare_half(v, scale, two_limbs, pr + 2 * c, 16, 32, /*deinterleave=*/w.bits == 4);
    }
    for (int64_t g = 0; g < groups; ++g) sr[g] *= xscale[r];
  }
  return true;
}

// The fp32-FMA kernel's preparation, into vnni::prepare's buffers (file header): xp (2K int16 per row) holds the
// activations as K fp32, per 16 elements [even 8 | odd 8] for int4 (the nibbles' order), in order for int8; xsum
// their fp32 sums per group (for the offsets; order-free); xscale -1, which prepare never writes (2^-e > 0;
// a negative marker, not 0, survives denormals-are-zero), so that rows() knows the layout whatever m it is handed.
// False (the exact portable path) for inf / NaN activations or sums, as prepare.
bool fma_prepare(bool bf16, const void* x, int64_t m, const QuantWeight& w, int16_t* xp, float* xsum, float* xscale) {
  const int64_t k = w.k, gs = w.group_size, groups = k / gs;
  __m256 bad = _mm256_setzero_ps();
  for (int64_t r = 0; r < m; ++r) {
    const void* xr = bf16 ? static_cast<const void*>(static_cast<const uint16_t*>(x) + r * k)
                          : static_cast<const void*>(static_cast<const float*>(x) + r * k);
    float* dst = reinterpret_cast<float*>(xp) + r * k;
    float* sr = xsum + r * groups;
    for (int64_t g = 0; g < groups; ++g) {
      __m256 sum = _mm256_setzero_ps();
      for (int64_t i = g * gs; i < (g + 1) * gs; i += 16) {
        __m256 a = load_x8(bf16, xr, i), b = load_x8(bf16, xr, i + 8);
        sum = _mm256_add_ps(sum, _mm256_add_ps(a, b));
        if (w.bits == 4) {
          const __m256 even = _mm256_castsi256_ps(pick_lanes<false>(_mm256_castps_si256(a), _mm256_castps_si256(b)));
          const __m256 odd = _mm256_castsi256_ps(pick_lanes<true>(_mm256_castps_si256(a), _mm256_castps_si256(b)));
          a = even, b = odd;
        }
        _mm256_storeu_ps(dst + i, a);
        _mm256_storeu_ps(dst + i + 8, b);
      }
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, sum);
      float t = 0.f;
      for (float v : lanes) t += v;
      sr[g] = t;
    }
    // inf / NaN anywhere in the row makes some group's sum inf or NaN, and so do sums that overflow: t - t is NaN
    for (int64_t g = 0; g + 8 <= groups; g += 8) {
      const __m256 v = _mm256_loadu_ps(sr + g);
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_sub_ps(v, v), _mm256_setzero_ps(), _CMP_NEQ_UQ));
    }
    for (int64_t g = groups / 8 * 8; g < groups; ++g)
      if (!std::isfinite(sr[g])) return false;
    xscale[r] = -1.f;
  }
  return _mm256_movemask_ps(bad) == 0;
}

void fma_rows(const QuantWeight& w, const int16_t* xp, const float* xsum, int64_t m, int64_t n0, int64_t n1, float* out,
              int64_t ldo) {
  const int64_t groups = w.k / w.group_size;
  const float* xf = reinterpret_cast<const float*>(xp);
  for (int64_t m0 = 0; m0 < m; m0 += 4) {
    const float* x = xf + m0 * w.k;
    const float* s = xsum + m0 * groups;
    float* o = out + m0 * ldo;
    switch (std::min<int64_t>(4, m - m0)) {
      case 1: fma_rows_m<1>(w, x, s, n0, n1, o, ldo); break;
      case 2: fma_rows_m<2>(w, x, s, n0, n1, o, ldo); break;
      case 3: fma_rows_m<3>(w, x, s, n0, n1, o, ldo); break;
      default: fma_rows_m<4>(w, x, s, n0, n1, o, ldo); break;
    }
  }
}
#endif

void rows(const QuantWeight& w, const int16_t* xp, const float* xsum, const float* xscale, int64_t m, bool two_limbs,
          int64_t n0, int64_t n1, float* out, int64_t ldo) {
  if (two_limbs)
    rows_limbs<true>(w, xp, xsum, xscale, m, n0, n1, out, ldo);
  else
    rows_limbs<false>(w, xp, xsum, xscale, m, n0, n1, out, ldo);
}

}  // namespace LF_VNNI256
}  // namespace vnni256
}  // namespace cpu
}  // namespace llama_fast
#endif
