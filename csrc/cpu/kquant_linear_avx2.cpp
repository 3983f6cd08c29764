// The ggml block GEMV (K-quants, Q5_0, Q5_1, Q8_0) on 256-bit integer dot products (cpu/vnni256.h): the VNNI
// kernels rows_k and rows_b32 of kquant_linear.cpp for CPUs without AVX512-VNNI. Read that file first: this one
// repeats their arithmetic with each 512-bit vector held as two 256-bit halves [lanes 0-7 | lanes 8-15]. The
// activations are prepared by vnni256::prepare_fixed_point as the int8 GEMV's (elements in order, [hi 32 | lo 32]
// per 32), so half h of 32 weights is 16 codes in element order against words 16h..16h+15 of each limb: the VNNI
// kernels' lanes 8h..8h+7, with the same int32 sums, converted and scaled by the same fp32 operations in the same
// order.
// (The int32 super-block sums of rows_k are exact, so how they are split over accumulators does not matter.)
//
// Compiled twice, like quant_linear_avx2.cpp: vpmaddwd + vpaddd (namespace madd) and AVX-VNNI (avx_vnni).
#ifndef LF_VNNI256
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/ggml_blocks.h"
#include "common/half_float.h"
#include "cpu/kernels.h"
#include "cpu/thread_pool.h"
#include "cpu/vnni256.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LF_KQUANT_VNNI256_X86 1

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define LF_VNNI256 madd
#define LF_VNNI256_DPWSSD 0
#include "cpu/kquant_linear_avx2.cpp"
#undef LF_VNNI256
#undef LF_VNNI256_DPWSSD
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")
#define LF_VNNI256 avx_vnni
#define LF_VNNI256_DPWSSD 1
#include "cpu/kquant_linear_avx2.cpp"
#undef LF_VNNI256
#undef LF_VNNI256_DPWSSD
#pragma GCC pop_options
#endif

namespace llama_fast {
namespace cpu {
namespace vnni256 {

bool kquant_supports(const std::vector<kquant::Segment>& segs) {
#ifdef LF_KQUANT_VNNI256_X86
  using ggml::BlockType;
  const auto has_kernel = [](const kquant::Segment& s) {
    switch (s.type) {
      case BlockType::kQ4K:
      case BlockType::kQ5K:
      case BlockType::kQ6K:
      case BlockType::kQ2K:
      case BlockType::kQ3K:
      case BlockType::kQ5_0:
      case BlockType::kQ5_1:
      case BlockType::kQ8_0: return true;
      default: return false;  // a type added to ggml_blocks.h after these kernels
    }
  };
  return available() && std::all_of(segs.begin(), segs.end(), has_kernel);
#else
  (void)segs;
  return false;
#endif
}

#ifdef LF_KQUANT_VNNI256_X86
namespace {

float load_x(bool bf16, const void* x, int64_t i) {
  return bf16 ? bf16_bits_to_float(static_cast<const uint16_t*>(x)[i]) : static_cast<const float*>(x)[i];
}

}  // namespace

// kquant_linear.cpp's linear_vnni with these kernels.
bool kquant_linear(bool bf16, const void* x, int64_t m, const std::vector<kquant::Segment>& segs, int64_t k, float* out,
                   int64_t ldo) {
  thread_local std::vector<int16_t> xp;
  thread_local std::vector<float> xsum32, xsum16, xscale;
  xp.resize(m * 2 * k);
  xsum32.resize(m * (k / 32));
  xsum16.resize(m * (k / 16));
  xscale.resize(m);
  const QuantWeight as_int8{nullptr, nullptr, nullptr, ScaleType::kF32, 8, 0, k, 32};  // in-order layout
  if (!prepare_fixed_point(bf16, x, m, as_int8, xp.data(), xsum32.data(), xscale.data())) return false;
  // The sums per 16 elements, for Q2_K's mins (one per 16 weights): those per 32 of the others come with prepare
  const bool need16 =
      std::any_of(segs.begin(), segs.end(), [](const kquant::Segment& s) { return s.type == ggml::BlockType::kQ2K; });
  for (int64_t i = 0; need16 && i < m * (k / 16); ++i) {
    float acc = 0.f;
    for (int e = 0; e < 16; ++e) acc += load_x(bf16, x, i * 16 + e);
    xsum16[i] = acc;
  }
  const int16_t* xs = xp.data();
  const float *s16 = xsum16.data(), *s32 = xsum32.data(), *sc = xscale.data();
  const bool dpwssd = uses_avx_vnni();
  int64_t col = 0;
  for (const kquant::Segment& s : segs) {
    parallel_for(s.rows, kquant::gemv_grain(s.type, k, s.rows), [&](int64_t n0, int64_t n1) {
      if (dpwssd)
        avx_vnni::kquant_rows(bf16, s, k, xs, s32, s16, sc, m, n0, n1, out + col, ldo);
      else
        madd::kquant_rows(bf16, s, k, xs, s32, s16, sc, m, n0, n1, out + col, ldo);
    });
    col += s.rows;
  }
  return true;
}
#else
bool kquant_linear(bool, const void*, int64_t, const std::vector<kquant::Segment>&, int64_t, float*, int64_t) {
  return false;
}
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

using ggml::BlockType;
using kquant::Segment;

constexpr int kPrefetchBytes = kquant::kBlockGemvPrefetchBytes, kL2PrefetchBytes = kquant::kBlockGemvL2PrefetchBytes;

inline float f16_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// Bytes 16h..16h+15 of p widened to 16 uint16: half h of the VNNI kernels' widen(p).
inline __m256i widen_half(const uint8_t* p, int h) { return _mm256_cvtepu8_epi16(load128(p + 16 * h)); }

// rows_b32: M activation rows x weight rows [n0, n1) of a Q5_0 / Q5_1 / Q8_0 segment (blocks of 32 weights with
// an fp16 d, and Q5_1's fp16 offset m). Per block, the 16 codes of half h (weights 16h..16h+15) dot both limbs,
// converted and multiplied by d into accumulator `h` of the block's parity (kSplit, as the VNNI kernel). Q5's
// codes: the qs bytes' low nibbles are weights 0-15 and the high ones 16-31; bit i of the 32 qh bits is weight i's
// fifth bit (Q5_1: +16 where set; Q5_0, code = q - 16: -16 where clear). Q8_0: 32 int8 codes.
template <BlockType T, int M, bool kTwoLimbs>
void rows_b32(const Segment& s, int64_t k, const int16_t* xp, const float* xsum32, const float* xscale, int64_t n0,
              int64_t n1, float* out, int64_t ldo) {
  constexpr int bb = ggml::block_bytes(T), qh_at = T == BlockType::kQ5_1 ? 4 : 2;
  constexpr int kSplit = M <= 2 ? 2 : 1;  // the VNNI kernel's fp32 accumulators per activation row
  const int64_t nblk = k / 32, rb = nblk * bb;
  const __m256i m4 = _mm256_set1_epi16(0x0F), sixteen = _mm256_set1_epi16(16);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i header_at = _mm256_mullo_epi32(lane, _mm256_set1_epi32(bb));
  const __m256i bit = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
                                        static_cast<int16_t>(0x8000));
  for (int64_t r = n0; r < n1; ++r) {
    const uint8_t* row = s.blocks + r * rb;
    __m256 acc[M][kSplit][2], off[M][2];
    for (int mm = 0; mm < M; ++mm) {
      off[mm][0] = off[mm][1] = _mm256_setzero_ps();
      for (int a = 0; a < kSplit; ++a) acc[mm][a][0] = acc[mm][a][1] = _mm256_setzero_ps();
    }
    for (int64_t blk0 = 0; blk0 < nblk; blk0 += 16) {
      const int nb = static_cast<int>(std::min<int64_t>(16, nblk - blk0));
      const uint8_t* g = row + blk0 * bb;
      // bytes 0-3 of each live block (d, and Q5_1's m) in two gathers, as the VNNI kernel; d as fp32 in dv for
      // broadcasts, m times its activations' sum into lane i of the offset term
      alignas(32) float dv[16];
      for (int h = 0; h < 2; ++h) {
        const int live = std::clamp(nb - 8 * h, 0, 8);
        if (live == 0) break;
        const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(live), lane);
        const __m256i head = _mm256_mask_i32gather_epi32(
            _mm256_setzero_si256(), reinterpret_cast<const int*>(g + 8 * h * bb), header_at, mask, 1);
        const __m256i low16 = _mm256_and_si256(head, _mm256_set1_epi32(0xFFFF));  // d, zero-extended
        const __m128i d16 = _mm_packus_epi32(_mm256_castsi256_si128(low16), _mm256_extracti128_si256(low16, 1));
        _mm256_store_ps(dv + 8 * h, _mm256_cvtph_ps(d16));
        if constexpr (T == BlockType::kQ5_1) {
          const __m256i high16 = _mm256_srli_epi32(head, 16);
          const __m256 m =
              _mm256_cvtph_ps(_mm_packus_epi32(_mm256_castsi256_si128(high16), _mm256_extracti128_si256(high16, 1)));
          for (int mm = 0; mm < M; ++mm)  // lanes past the live blocks: 0 * 0, as the VNNI kernel's masked load
            off[mm][h] = _mm256_fmadd_ps(m, _mm256_maskload_ps(xsum32 + mm * nblk + blk0 + 8 * h, mask), off[mm][h]);
        }
      }
      auto one = [&](int i, auto ac) {  // block i into accumulator a (a compile-time index)
        constexpr int a = decltype(ac)::value % kSplit;
        const uint8_t* b = g + i * bb;
        _mm_prefetch(reinterpret_cast<const char*>(b + kPrefetchBytes), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(b + kL2PrefetchBytes), _MM_HINT_T1);
        __m256i q[2];
        if constexpr (T == BlockType::kQ8_0) {
          q[0] = _mm256_cvtepi8_epi16(load128(b + 2));
          q[1] = _mm256_cvtepi8_epi16(load128(b + 18));
        } else {
          const __m256i w = _mm256_cvtepu8_epi16(load128(b + qh_at + 4));
          q[0] = _mm256_and_si256(w, m4);
          q[1] = _mm256_srli_epi16(w, 4);
          uint32_t qh;
          std::memcpy(&qh, b + qh_at, 4);
          for (int h = 0; h < 2; ++h) {
            const __m256i bits = _mm256_set1_epi16(static_cast<int16_t>(qh >> (16 * h)));
            const __m256i set = _mm256_cmpeq_epi16(_mm256_and_si256(bits, bit), bit);
            if constexpr (T == BlockType::kQ5_0)
              q[h] = _mm256_sub_epi16(q[h], _mm256_andnot_si256(set, sixteen));
            else
              q[h] = _mm256_add_epi16(q[h], _mm256_and_si256(set, sixteen));
          }
        }
        const __m256 d = _mm256_broadcast_ss(dv + i);
        const int16_t* xb = xp + 2 * 32 * (blk0 + i);
        for (int mm = 0; mm < M; ++mm)
          for (int h = 0; h < 2; ++h)
            acc[mm][a][h] = _mm256_fmadd_ps(limb_dot<kTwoLimbs>(q[h], xb + mm * 2 * k + 16 * h, 32), d, acc[mm][a][h]);
      };
      int i = 0;
      for (; i + 2 <= nb; i += 2) {
        one(i, std::integral_constant<int, 0>{});
        one(i + 1, std::integral_constant<int, 1>{});
      }
      if (i < nb) one(i, std::integral_constant<int, 0>{});
    }
    for (int mm = 0; mm < M; ++mm) {
      __m256 lo = acc[mm][0][0], hi = acc[mm][0][1];
      if constexpr (kSplit == 2) lo = _mm256_add_ps(lo, acc[mm][1][0]), hi = _mm256_add_ps(hi, acc[mm][1][1]);
      out[mm * ldo + r] = sum16(lo, hi) * xscale[mm] + sum16(off[mm][0], off[mm][1]);
    }
  }
}

// Q4_K / Q5_K: the eight 6-bit scales and mins of a super-block from its 12 packed bytes, all at once (the same
// unpacking as kquant_linear.cpp's k_scales_mins).
inline void k_scales_mins(const uint8_t* packed, int16_t* sc, uint8_t* mn) {
  uint32_t a[3];
  std::memcpy(a, packed, 12);
  const uint32_t low6 = 0x3f3f3f3f, low4 = 0x0f0f0f0f, top2 = 0x03030303;
  const uint32_t words[4] = {a[0] & low6, (a[2] & low4) | (((a[0] >> 6) & top2) << 4), a[1] & low6,
                             ((a[2] >> 4) & low4) | (((a[1] >> 6) & top2) << 4)};
  uint8_t bytes[16];
  std::memcpy(bytes, words, 16);
  for (int j = 0; j < 8; ++j) sc[j] = bytes[j];
  std::memcpy(mn, bytes + 8, 8);
}

// Q3_K: the sixteen 6-bit scales, unbiased (-32..31), as int16 (kquant_linear.cpp's q3k_scales).
inline void q3k_scales(const uint8_t* packed, int16_t* sc) {
  const __m128i lo8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed)), m4 = _mm_set1_epi8(0x0F);
  const __m128i low = _mm_unpacklo_epi64(_mm_and_si128(lo8, m4), _mm_and_si128(_mm_srli_epi16(lo8, 4), m4));
  uint32_t top;
  std::memcpy(&top, packed + 8, 4);
  const __m128i high = _mm_and_si128(_mm_srlv_epi32(_mm_set1_epi32(static_cast<int>(top)), _mm_setr_epi32(0, 2, 4, 6)),
                                     _mm_set1_epi8(3));
  const __m256i v = _mm256_cvtepu8_epi16(_mm_or_si128(low, _mm_slli_epi32(high, 4)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(sc), _mm256_sub_epi16(v, _mm256_set1_epi16(32)));
}

// Half of the codes of weights 32j..32j+31 of a K-quant block (kquant_linear.cpp's codes_k, on the half's 16
// lanes): `low` the widened bytes of qs / ql that hold them, `high` of qh / hmask.
template <BlockType T, int j>
inline __m256i codes_k(__m256i low, __m256i high) {
  const __m256i m4 = _mm256_set1_epi16(0x0F);
  if constexpr (T == BlockType::kQ6K) {
    constexpr int g = j & 3;
    const __m256i lo = (g >> 1) ? _mm256_srli_epi16(low, 4) : _mm256_and_si256(low, m4);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(high, 2 * g), _mm256_set1_epi16(3));
    return _mm256_sub_epi16(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), _mm256_set1_epi16(32));
  } else if constexpr (T == BlockType::kQ2K || T == BlockType::kQ3K) {
    constexpr int g = j & 3;  // 2-bit field g of each qs byte
    const __m256i q = _mm256_and_si256(_mm256_srli_epi16(low, 2 * g), _mm256_set1_epi16(3));
    if constexpr (T == BlockType::kQ2K) return q;
    // Q3_K: bit j of hmask[l] clear subtracts 4
    const __m256i clear = _mm256_cmpeq_epi16(_mm256_and_si256(high, _mm256_set1_epi16(1 << j)), _mm256_setzero_si256());
    return _mm256_sub_epi16(q, _mm256_and_si256(clear, _mm256_set1_epi16(4)));
  } else {
    __m256i q = (j & 1) ? _mm256_srli_epi16(low, 4) : _mm256_and_si256(low, m4);
    if constexpr (T == BlockType::kQ5K)
      q = _mm256_or_si256(q, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(high, j), _mm256_set1_epi16(1)), 4));
    return q;
  }
}

// rows_k: M activation rows x weight rows [n0, n1) of a K-quant segment. Per super-block the codes times their
// integer sub-block scales accumulate over both limbs in int32 lanes (exact: kquant_linear.cpp bounds them), then
// one conversion and one multiply by d, and the mins' fp32 term, as the VNNI kernel.
template <BlockType T, int M, bool kTwoLimbs>
void rows_k(const Segment& s, int64_t k, const int16_t* xp, const float* xsum32, const float* xsum16,
            const float* xscale, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  constexpr int bb = ggml::block_bytes(T);
  constexpr bool kSixteen = T == BlockType::kQ6K || T == BlockType::kQ2K || T == BlockType::kQ3K;  // 16 scales
  const int64_t nblk = k / 256, rb = nblk * bb;
  const __m256 limb = _mm256_set1_ps(32768.f);
  for (int64_t r = n0; r < n1; ++r) {
    const uint8_t* row = s.blocks + r * rb;
    __m256 acc[M][2], off16[M][2], off[M];
    for (int mm = 0; mm < M; ++mm)
      acc[mm][0] = acc[mm][1] = off16[mm][0] = off16[mm][1] = off[mm] = _mm256_setzero_ps();
    for (int64_t blk = 0; blk < nblk; ++blk) {
      const uint8_t* b = row + blk * bb;
      for (int p = 0; p < bb; p += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(b + kPrefetchBytes + p), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(b + kL2PrefetchBytes + p), _MM_HINT_T1);
      }
      __m256i ih[M][2], il[M][2];  // [activation row][lane half]
      for (int mm = 0; mm < M; ++mm) ih[mm][0] = ih[mm][1] = il[mm][0] = il[mm][1] = _mm256_setzero_si256();
      alignas(32) int16_t sc[16];  // Q4_K / Q5_K: 8 scales (one per 32); the others: 16 (one per 16)
      alignas(16) uint8_t mn[8];
      if constexpr (T == BlockType::kQ6K)
        _mm256_store_si256(reinterpret_cast<__m256i*>(sc), _mm256_cvtepi8_epi16(load128(b + 192)));
      else if constexpr (T == BlockType::kQ2K)
        _mm256_store_si256(reinterpret_cast<__m256i*>(sc),
                           _mm256_and_si256(_mm256_cvtepu8_epi16(load128(b)), _mm256_set1_epi16(0x0F)));
      else if constexpr (T == BlockType::kQ3K)
        q3k_scales(b + 96, sc);
      else
        k_scales_mins(b + 4, sc, mn);
      const int16_t* xb = xp + 2 * blk * 256;
      // chunk j (weights 32j..32j+31), half h: codes from `low` / `high`, times the scale of its 16 weights
      auto chunk = [&](auto jc, int h, __m256i low, __m256i high) {
        constexpr int j = decltype(jc)::value;
        const __m256i scv = _mm256_set1_epi16(kSixteen ? sc[2 * j + h] : sc[j]);
        const __m256i q = _mm256_mullo_epi16(codes_k<T, j>(low, high), scv);
        for (int mm = 0; mm < M; ++mm) {
          const int16_t* xc = xb + mm * 2 * k + 64 * j + 16 * h;
          ih[mm][h] = dot_pairs(ih[mm][h], q, load256(xc));
          if constexpr (kTwoLimbs) il[mm][h] = dot_pairs(il[mm][h], q, load256(xc + 32));
        }
      };
      for (int h = 0; h < 2; ++h) {
        if constexpr (kSixteen) {  // four chunks of 32 per 128-weight half hh
          auto half = [&](auto hc) {
            constexpr int hh = decltype(hc)::value;
            __m256i low0, low1, high;
            if constexpr (T == BlockType::kQ6K) {  // ql: 64 bytes per half, low nibbles then high; qh: 32
              high = widen_half(b + 128 + 32 * hh, h), low0 = widen_half(b + 64 * hh, h);
              low1 = widen_half(b + 64 * hh + 32, h);
            } else {  // Q2_K / Q3_K: 32 qs bytes per half, 2-bit field g is weights 32g..32g+31; Q3_K's hmask: 32
              high = T == BlockType::kQ3K ? widen_half(b, h) : _mm256_setzero_si256();
              low0 = low1 = widen_half(b + (T == BlockType::kQ2K ? 16 : 32) + 32 * hh, h);
            }
            chunk(std::integral_constant<int, 4 * hh>{}, h, low0, high);
            chunk(std::integral_constant<int, 4 * hh + 1>{}, h, low1, high);
            chunk(std::integral_constant<int, 4 * hh + 2>{}, h, low0, high);
            chunk(std::integral_constant<int, 4 * hh + 3>{}, h, low1, high);
          };
          half(std::integral_constant<int, 0>{});
          half(std::integral_constant<int, 1>{});
        } else {
          constexpr int qs = T == BlockType::kQ4K ? 16 : 48;
          const __m256i high = T == BlockType::kQ5K ? widen_half(b + 16, h) : _mm256_setzero_si256();
          auto pair = [&](auto pc) {
            constexpr int p = decltype(pc)::value;
            const __m256i low = widen_half(b + qs + 32 * p, h);
            chunk(std::integral_constant<int, 2 * p>{}, h, low, high);
            chunk(std::integral_constant<int, 2 * p + 1>{}, h, low, high);
          };
          pair(std::integral_constant<int, 0>{});
          pair(std::integral_constant<int, 1>{});
          pair(std::integral_constant<int, 2>{});
          pair(std::integral_constant<int, 3>{});
        }
      }
      constexpr int d_at = T == BlockType::kQ6K ? 208 : T == BlockType::kQ2K ? 80 : T == BlockType::kQ3K ? 108 : 0;
      const __m256 d = _mm256_set1_ps(f16_at(b + d_at));
      __m256 neg_min = _mm256_setzero_ps(), neg_min16[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
      if constexpr (T == BlockType::kQ4K || T == BlockType::kQ5K) {
        const __m256 m =
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(mn))));
        neg_min = _mm256_mul_ps(m, _mm256_set1_ps(-f16_at(b + 2)));  // -(dmin * m_j), as the dequantization
      } else if constexpr (T == BlockType::kQ2K) {                   // the mins: the high nibbles of the 16 scale bytes
        const __m128i m = _mm_and_si128(_mm_srli_epi16(load128(b), 4), _mm_set1_epi8(0x0F));
        const __m256 neg_dmin = _mm256_set1_ps(-f16_at(b + 82));
        neg_min16[0] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(m)), neg_dmin);
        neg_min16[1] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(m, 8))), neg_dmin);
      }
      for (int mm = 0; mm < M; ++mm) {
        for (int h = 0; h < 2; ++h) {
          __m256 f = _mm256_cvtepi32_ps(ih[mm][h]);
          if constexpr (kTwoLimbs) f = _mm256_fmadd_ps(f, limb, _mm256_cvtepi32_ps(il[mm][h]));
          acc[mm][h] = _mm256_fmadd_ps(f, d, acc[mm][h]);
        }
        if constexpr (T == BlockType::kQ4K || T == BlockType::kQ5K)
          off[mm] = _mm256_fmadd_ps(neg_min, _mm256_loadu_ps(xsum32 + mm * (k / 32) + blk * 8), off[mm]);
        if constexpr (T == BlockType::kQ2K)
          for (int h = 0; h < 2; ++h)
            off16[mm][h] =
                _mm256_fmadd_ps(neg_min16[h], _mm256_loadu_ps(xsum16 + mm * (k / 16) + blk * 16 + 8 * h), off16[mm][h]);
      }
    }
    for (int mm = 0; mm < M; ++mm) {  // the VNNI kernel's sums of the offset lanes, in its order
      const __m256 o = _mm256_add_ps(off[mm], _mm256_add_ps(off16[mm][0], off16[mm][1]));
      __m128 o4 = _mm_add_ps(_mm256_castps256_ps128(o), _mm256_extractf128_ps(o, 1));
      o4 = _mm_add_ps(o4, _mm_movehl_ps(o4, o4));
      o4 = _mm_add_ss(o4, _mm_movehdup_ps(o4));
      out[mm * ldo + r] = sum16(acc[mm][0], acc[mm][1]) * xscale[mm] + _mm_cvtss_f32(o4);
    }
  }
}

// All m activation rows against weight rows [n0, n1) of a segment, in steps of up to 4 activation rows (rows_b32)
// or 2 (rows_k, whose int32 accumulators take four registers per activation row).
template <BlockType T, bool kTwoLimbs>
void rows_all_m(const Segment& s, int64_t k, const int16_t* xp, const float* xsum32, const float* xsum16,
                const float* xscale, int64_t m, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  constexpr bool kSuper = ggml::block_weights(T) == 256;
  for (int64_t m0 = 0; m0 < m;) {
    const int64_t left = m - m0;
    auto step = [&](auto rows) {
      constexpr int M = decltype(rows)::value;
      const int16_t* x = xp + m0 * 2 * k;
      const float* s32 = xsum32 + m0 * (k / 32);
      if constexpr (kSuper)
        rows_k<T, M, kTwoLimbs>(s, k, x, s32, xsum16 + m0 * (k / 16), xscale + m0, n0, n1, out + m0 * ldo, ldo);
      else
        rows_b32<T, M, kTwoLimbs>(s, k, x, s32, xscale + m0, n0, n1, out + m0 * ldo, ldo);
      m0 += M;
    };
    if (!kSuper && left >= 4)
      step(std::integral_constant<int, 4>{});
    else if (left >= 2)
      step(std::integral_constant<int, 2>{});
    else
      step(std::integral_constant<int, 1>{});
  }
}

template <bool kTwoLimbs>
void rows_by_type(const Segment& s, int64_t k, const int16_t* xp, const float* xsum32, const float* xsum16,
                  const float* xscale, int64_t m, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  auto run = [&](auto tc) {
    rows_all_m<decltype(tc)::value, kTwoLimbs>(s, k, xp, xsum32, xsum16, xscale, m, n0, n1, out, ldo);
  };
  switch (s.type) {
    case BlockType::kQ4K: return run(std::integral_constant<BlockType, BlockType::kQ4K>{});
    case BlockType::kQ5K: return run(std::integral_constant<BlockType, BlockType::kQ5K>{});
    case BlockType::kQ6K: return run(std::integral_constant<BlockType, BlockType::kQ6K>{});
    case BlockType::kQ2K: return run(std::integral_constant<BlockType, BlockType::kQ2K>{});
    case BlockType::kQ3K: return run(std::integral_constant<BlockType, BlockType::kQ3K>{});
    case BlockType::kQ5_0: return run(std::integral_constant<BlockType, BlockType::kQ5_0>{});
    case BlockType::kQ8_0: return run(std::integral_constant<BlockType, BlockType::kQ8_0>{});
    default: return run(std::integral_constant<BlockType, BlockType::kQ5_1>{});  // kquant_supports: no other
  }
}

}  // namespace

// All m prepared activation rows against weight rows [n0, n1) of a segment (out + row, stride ldo).
void kquant_rows(bool bf16, const Segment& s, int64_t k, const int16_t* xp, const float* xsum32, const float* xsum16,
                 const float* xscale, int64_t m, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  if (bf16)
    rows_by_type<false>(s, k, xp, xsum32, xsum16, xscale, m, n0, n1, out, ldo);
  else
    rows_by_type<true>(s, k, xp, xsum32, xsum16, xscale, m, n0, n1, out, ldo);
}

}  // namespace LF_VNNI256
}  // namespace vnni256
}  // namespace cpu
}  // namespace llama_fast
#endif
