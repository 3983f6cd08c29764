// x @ W^T for W in ggml's K-quant / Q5_0 / Q5_1 / Q8_0 blocks, read as stored (csrc/common/ggml_blocks.h), and the
// torch op llama_fast::kquant_linear around it (llama_fast/kquants.py holds the weight).
//
// Decode (AVX512-VNNI, the top dispatch level): the activations are not rounded to 8 bits as llama.cpp rounds
// them (q8_K), but carried as 29-bit fixed point in two int16 limbs, prepared by vnni::prepare exactly as the
// int8 GEMV does (quant_linear_vnni.cpp; elements in order, [hi 32 | lo 32] per 32). Each 32 weights of a block
// are unpacked to 32 int16 codes in element order (a few shifts and masks per type) and multiplied with both
// limbs by vpdpwssd: lane l covers elements 2l, 2l+1, so lanes 0-7 meet sub-block 2j's scale and 8-15
// sub-block 2j+1's.
//   w . x = 2^-e * sum_j scale_j (code . X)_j + sum_j offset_j (sum x)_j       (j: sub-blocks)
// The K-quants (rows_k): their sub-block scales are small integers times one fp16 d per super-block, so each 32
// codes are multiplied by their integer scale in int16 and the whole super-block accumulates in int32 lanes; one
// conversion to fp32 and one multiply by d per super-block. Lane bound: 16 products per lane per super-block;
// q * sc lies in [0, 15*63] (Q4_K), [0, 31*63] (Q5_K), [-4064, 4096] (Q6_K: codes -32..31, scales -128..127),
// [0, 3*15] (Q2_K), [-128, 128] (Q3_K: codes -4..3, scales -32..31) and a limb in [-2^14, 2^14] (fp32 hi),
// [0, 32767] (lo) or [-32768, 32767] (bf16's one limb), so a lane stays in [-2^31, 16 * 4096 * 32768 = 2^31):
// exact. The mins go into an fp32 term per super-block: -dmin * sum_j m_j (sum x)_j over the sums per 32
// (Q4_K / Q5_K) or per 16 (Q2_K).
// Q5_0 / Q5_1 / Q8_0 (rows_b32): one fp16 d per 32 weights, no integer scale to fold, so each block's lanes
// (2 products of |code| <= 128 and a limb: below 2^23) are converted and multiplied by d; Q5_1's offsets m take
// the sums per 32. tests/ops/test_kquant_linear.py runs every type's extremes.
// Other CPUs (and rows holding inf / NaN): each weight row is dequantized exactly (ggml_blocks.h) into fp32
// and dotted in fp32. From cpu::quant_gemm_from_rows activation rows on (tuning.h; always for
// prefill-sized inputs) linear() runs the prefill GEMM of gemm.cpp instead, which dequantizes each weight once
// into its fp32 tiles (kquant::gemm); the portable ISA level, which has none, dequantizes bands of rows for
// ATen's GEMM beyond kMaxGemvRows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/ggml_blocks.h"
#include "common/half_float.h"
#include "cpu/cpu_features.h"
#include "cpu/gemm_amx.h"
#include "cpu/gemm_amx_quant.h"
#include "cpu/kernels.h"
#include "cpu/kquant_linear.h"
#include "cpu/quant_linear_vnni.h"
#include "cpu/thread_pool.h"
#include "cpu/tuning.h"
#include "cpu/vnni256.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LF_KQUANT_VNNI 1
#endif

namespace llama_fast {
namespace cpu {
namespace kquant {

using ggml::BlockType;

// Rows per parallel chunk: ~32 KiB of blocks, at least 4 rows.
inline int64_t row_grain(BlockType t, int64_t k) {
  return std::max<int64_t>(4, (int64_t{1} << 15) / std::max<int64_t>(row_bytes(t, k), 1));
}

int64_t gemv_grain(BlockType t, int64_t k, int64_t rows) {
  return std::max<int64_t>(row_grain(t, k), one_range_per_thread(rows, 1));
}

// Weight rows r0..r1 of a segment dequantized into fp32 [r1 - r0, K] (exact: ggml_blocks.h). The type is a
// template argument so that block_code's switch folds away and the per-weight loop vectorizes.
template <BlockType T>
void dequantize_rows_t(const Segment& s, int64_t k, int64_t r0, int64_t r1, float* out) {
  constexpr int bw = ggml::block_weights(T);
  const int bb = ggml::block_bytes(T);
  const int64_t rb = row_bytes(T, k);
  float scale[16], offset[16];
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = s.blocks + r * rb;
    float* o = out + (r - r0) * k;
    for (int64_t blk = 0; blk < k / bw; ++blk) {
      const uint8_t* b = row + blk * bb;
      ggml::block_scales(T, b, scale, offset);
      for (int e = 0; e < bw; ++e)
        o[blk * bw + e] = ggml::dequant(ggml::block_code(T, b, e), scale[e / 16], offset[e / 16]);
    }
  }
}

void dequantize_rows(const Segment& s, int64_t k, int64_t r0, int64_t r1, float* out) {
  switch (s.type) {
    case BlockType::kQ4K: return dequantize_rows_t<BlockType::kQ4K>(s, k, r0, r1, out);
    case BlockType::kQ5K: return dequantize_rows_t<BlockType::kQ5K>(s, k, r0, r1, out);
    case BlockType::kQ6K: return dequantize_rows_t<BlockType::kQ6K>(s, k, r0, r1, out);
    case BlockType::kQ2K: return dequantize_rows_t<BlockType::kQ2K>(s, k, r0, r1, out);
    case BlockType::kQ3K: return dequantize_rows_t<BlockType::kQ3K>(s, k, r0, r1, out);
    case BlockType::kQ5_0: return dequantize_rows_t<BlockType::kQ5_0>(s, k, r0, r1, out);
    case BlockType::kQ8_0: return dequantize_rows_t<BlockType::kQ8_0>(s, k, r0, r1, out);
    default: return dequantize_rows_t<BlockType::kQ5_1>(s, k, r0, r1, out);
  }
}

inline float load_x(bool bf16, const void* x, int64_t i) {
  return bf16 ? bf16_bits_to_float(static_cast<const uint16_t*>(x)[i]) : static_cast<const float*>(x)[i];
}

// The VNNI kernel runs at the avx512_vnni dispatch level and above (cpu_features.cpp); it needs no BF16.
bool has_vnni() {
#ifdef LF_KQUANT_VNNI
  return isa() >= Isa::kAvx512Vnni;
#else
  return false;
#endif
}

// Any CPU: out[mm * ldo + r] for rows [n0, n1) of a segment, fp32 dot products of exact weights.
void rows_portable(bool bf16, const void* x, int64_t m, const Segment& s, int64_t k, int64_t n0, int64_t n1, float* out,
                   int64_t ldo) {
  std::vector<float> w(k), xf(m * k);
  for (int64_t i = 0; i < m * k; ++i) xf[i] = load_x(bf16, x, i);
  for (int64_t r = n0; r < n1; ++r) {
    dequantize_rows(s, k, r, r + 1, w.data());
    for (int64_t mm = 0; mm < m; ++mm) {
      const float* xr = xf.data() + mm * k;
      // 16 running sums, one per lane: the compiler vectorizes this loop (one running sum waits an add's
      // latency per weight). K is a multiple of 32, so no tail is left.
      float lane[16] = {};
      for (int64_t i = 0; i < k; i += 16)
        for (int l = 0; l < 16; ++l) lane[l] += w[i + l] * xr[i + l];
      float acc = 0.f;
      for (int l = 0; l < 16; ++l) acc += lane[l];
      out[mm * ldo + r] = acc;
    }
  }
}

#ifdef LF_KQUANT_VNNI
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")

namespace {

inline __m512i widen(const uint8_t* p) {  // 32 bytes -> 32 uint16
  return _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

struct HardF16 {
  float operator()(const uint8_t* p) const {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return _cvtsh_ss(h);
  }
};

// Weights ahead of the current block to prefetch (bytes): the hardware prefetcher alone leaves a core well short
// of its share of the bandwidth on a stream read once (as in quant_linear_vnni.cpp). cpu::tuning().prefetch_bytes
// (from the L1d size; LLAMA_FAST_PREFETCH_BYTES overrides it).
inline int64_t prefetch_bytes() { return tuning().prefetch_bytes; }
// A second prefetch goes kL2PrefetchFactor (kquant_linear.h) times further, into L2.

// M activation rows x weight rows [n0, n1) of a Q5_0 / Q5_1 / Q8_0 segment: blocks of 32 weights, each with its
// own fp16 scale d (and Q5_1's fp16 offset m), so there is no integer scale to fold into the codes: every block's
// vpdpwssd lanes (two products each, |lane| <= 2 * 128 * 32768 = 2^23: exact in int32 and in fp32) are converted
// and multiplied by d in fp32. The headers of 16 blocks at a time come in one gather of their first 4 bytes
// (d, and m or the low half of qh) and one vcvtph2ps, so each block's d is a broadcast from memory in the inner
// loop; Q5_1's offset term sum_b m_b (sum x)_b takes one fma per 16 blocks with the sums per 32 (xsum32).
// Codes: the 16 qs bytes are broadcast to both 256-bit halves and widened, the low nibbles kept in words 0-15
// and the high ones in 16-31 (weights 0-15 / 16-31), then one masked op with the 32 qh bits as the mask adds
// the 5th bit (Q5_1: +16 where set; Q5_0, code = q - 16: -16 where clear). Q8_0: 32 int8 codes, sign-extended.
template <BlockType T, int M, bool kTwoLimbs>
void rows_b32(const Segment& s, int64_t k, const int16_t* xp, const float* xsum32, const float* xscale, int64_t n0,
              int64_t n1, float* out, int64_t ldo) {
  constexpr int bb = ggml::block_bytes(T), qh_at = T == BlockType::kQ5_1 ? 4 : 2;
  constexpr int kSplit = M <= 2 ? 2 : 1;  // fp32 accumulators per activation row (fma latency)
  const int64_t nblk = k / 32, rb = nblk * bb;
  const __m512 limb = _mm512_set1_ps(32768.f);
  const __m512i header_at = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                               _mm512_set1_epi32(bb));
  const __m512i nibble_shift = _mm512_mask_blend_epi16(0xFFFF0000u, _mm512_setzero_si512(), _mm512_set1_epi16(4));
  const __m512i m4 = _mm512_set1_epi16(0x0F), sixteen = _mm512_set1_epi16(16);
  // Up to this many blocks left in a row, their headers are converted one by one instead of gathered.
  constexpr int kScalarHeaders = 4;
  alignas(64) float dv[16];
  const int64_t ahead = prefetch_bytes(), far = kL2PrefetchFactor * ahead;
  for (int64_t r = n0; r < n1; ++r) {
    const uint8_t* row = s.blocks + r * rb;
    // the L2 prefetch stays inside the segment: past it, in a small weight (SmolLM2's q / k / v / o, 0.1-0.3 MB),
    // its lines were a measurable share of the traffic for nothing
    const bool far_inside = (r + 1) * rb + far <= s.rows * rb;
    __m512 acc[M][kSplit], off[M];
    for (int mm = 0; mm < M; ++mm) {
      off[mm] = _mm512_setzero_ps();
      for (int h = 0; h < kSplit; ++h) acc[mm][h] = _mm512_setzero_ps();
    }
    for (int64_t blk0 = 0; blk0 < nblk; blk0 += 16) {
      const int nb = static_cast<int>(std::min<int64_t>(16, nblk - blk0));
      const __mmask16 live = nb == 16 ? __mmask16(0xFFFF) : __mmask16((1u << nb) - 1);
      const uint8_t* g = row + blk0 * bb;
      __m512 m;  // Q5_1's offsets of the live blocks
      if (nb > kScalarHeaders) {
        // bytes 0-3 of each live block: d and the next two bytes (Q5_1's m); nothing outside the row
        const __m512i head = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, header_at, g, 1);
        _mm512_store_ps(dv, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(head)));
        if constexpr (T == BlockType::kQ5_1) m = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(head, 16)));
      } else {
        // A row's last few blocks (SmolLM2's K = 576: 16 + 2): a gather costs about as much whatever its lanes,
        // each scalar conversion a few instructions (the same numbers: fp16 -> fp32 is exact).
        alignas(64) float mv[16];
        for (int i = 0; i < nb; ++i) {
          dv[i] = HardF16{}(g + i * bb);
          if constexpr (T == BlockType::kQ5_1) mv[i] = HardF16{}(g + i * bb + 2);
        }
        if constexpr (T == BlockType::kQ5_1) m = _mm512_maskz_load_ps(live, mv);
      }
      if constexpr (T == BlockType::kQ5_1) {
        for (int mm = 0; mm < M; ++mm)
          off[mm] = _mm512_fmadd_ps(m, _mm512_maskz_loadu_ps(live, xsum32 + mm * nblk + blk0), off[mm]);
      }
      // block i into accumulator h (a compile-time index: a runtime one would keep acc in memory)
      auto one = [&](int i, auto hc) {
        constexpr int h = decltype(hc)::value % kSplit;
        const uint8_t* b = g + i * bb;
        _mm_prefetch(reinterpret_cast<const char*>(b + ahead), _MM_HINT_T0);
        if (far_inside) _mm_prefetch(reinterpret_cast<const char*>(b + far), _MM_HINT_T1);
        __m512i q;
        if constexpr (T == BlockType::kQ8_0) {
          q = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2)));
        } else {
          const __m512i w = _mm512_cvtepu8_epi16(
              _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + qh_at + 4))));
          q = _mm512_and_si512(_mm512_srlv_epi16(w, nibble_shift), m4);
          uint32_t qh;
          std::memcpy(&qh, b + qh_at, 4);
          if constexpr (T == BlockType::kQ5_0)
            q = _mm512_mask_sub_epi16(q, static_cast<__mmask32>(~qh), q, sixteen);
          else
            q = _mm512_mask_add_epi16(q, static_cast<__mmask32>(qh), q, sixteen);
        }
        const __m512 d = _mm512_set1_ps(dv[i]);
        const int16_t* xb = xp + 2 * 32 * (blk0 + i);
        for (int mm = 0; mm < M; ++mm) {
          const int16_t* xc = xb + mm * 2 * k;
          __m512 f = _mm512_cvtepi32_ps(_mm512_dpwssd_epi32(_mm512_setzero_si512(), q, _mm512_loadu_si512(xc)));
          if constexpr (kTwoLimbs)
            f = _mm512_fmadd_ps(
                f, limb,
                _mm512_cvtepi32_ps(_mm512_dpwssd_epi32(_mm512_setzero_si512(), q, _mm512_loadu_si512(xc + 32))));
          acc[mm][h] = _mm512_fmadd_ps(f, d, acc[mm][h]);
        }
      };
      int i = 0;
      for (; i + 2 <= nb; i += 2) {
        one(i, std::integral_constant<int, 0>{});
        one(i + 1, std::integral_constant<int, 1>{});
      }
      if (i < nb) one(i, std::integral_constant<int, 0>{});
    }
    for (int mm = 0; mm < M; ++mm) {
      __m512 a = acc[mm][0];
      if constexpr (kSplit == 2) a = _mm512_add_ps(a, acc[mm][1]);
      float o = _mm512_reduce_add_ps(a) * xscale[mm];
      if constexpr (T == BlockType::kQ5_1) o += _mm512_reduce_add_ps(off[mm]);
      out[mm * ldo + r] = o;
    }
  }
}

// Q4_K / Q5_K: the eight 6-bit scales and mins of a super-block from its 12 packed bytes, k_scale_min for every j
// at once, in vector registers: bytes 0-3 hold scales 0-3 and bits 4-5 of scales 4-7 in their top two bits,
// bytes 4-7 the same for the mins, bytes 8-11 the low nibbles of scales 4-7 and mins 4-7. Returns the scales as
// int16 in words 0-7 (for the chunks' permutes; the other words 0) and sets `mins` to the mins as fp32. Reads 16
// bytes from `packed` (the 4 after the scales are the block's first codes).
inline __m512i k_scales_mins(const uint8_t* packed, __m256* mins) {
  const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed));  // dwords a0 a1 a2 (a3: codes)
  const __m128i low6 = _mm_and_si128(a, _mm_set1_epi8(0x3f));                   // [sc 0-3, min 0-3, ...]
  // [a2 & 0x0f, (a2 >> 4) & 0x0f] | the top two bits of bytes 0-7 moved to bits 4-5: [sc 4-7, min 4-7]
  const __m128i nib =
      _mm_and_si128(_mm_srlv_epi32(_mm_shuffle_epi32(a, 0xAA), _mm_setr_epi32(0, 4, 0, 4)), _mm_set1_epi8(0x0f));
  const __m128i high = _mm_or_si128(nib, _mm_and_si128(_mm_srli_epi32(a, 2), _mm_set1_epi8(0x30)));
  const __m128i both = _mm_unpacklo_epi32(low6, high);  // bytes: sc 0-3, sc 4-7, min 0-3, min 4-7
  *mins = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(both, 8)));
  return _mm512_castsi128_si512(_mm_cvtepu8_epi16(both));
}

// Q3_K: the sixteen 6-bit scales of a super-block, unbiased (-32..31), as int16 in the low 256 bits, from its 12
// packed bytes (ggml_blocks.h, q3k_scale, for every j at once): bytes 0-7 hold the low nibbles (scales 0-7 low,
// 8-15 high), bytes 8-11 the top two bits (scale j at bits 2 (j >> 2) of byte 8 + (j & 3)).
inline __m512i q3k_scales(const uint8_t* packed) {
  const __m128i lo8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed)), m4 = _mm_set1_epi8(0x0F);
  const __m128i low = _mm_unpacklo_epi64(_mm_and_si128(lo8, m4), _mm_and_si128(_mm_srli_epi16(lo8, 4), m4));
  uint32_t top;
  std::memcpy(&top, packed + 8, 4);
  // scale j = 4 w + i takes bits 2w, 2w+1 of byte i: word w of [top, top >> 2, top >> 4, top >> 6]
  const __m128i high = _mm_and_si128(_mm_srlv_epi32(_mm_set1_epi32(static_cast<int>(top)), _mm_setr_epi32(0, 2, 4, 6)),
                                     _mm_set1_epi8(3));
  const __m256i sc = _mm256_cvtepu8_epi16(_mm_or_si128(low, _mm_slli_epi32(high, 4)));
  return _mm512_castsi256_si512(_mm256_sub_epi16(sc, _mm256_set1_epi16(32)));
}

// The codes of weights 32j..32j+31 of a K-quant block as int16 in element order. `low` holds the widened qs bytes
// of the chunk's 64-weight pair (Q4_K / Q5_K), its ql bytes (Q6_K) or its 128-weight half's qs bytes (Q2_K /
// Q3_K); `high` the widened qh (Q5_K / Q6_K) or hmask (Q3_K).
template <BlockType T, int j>
inline __m512i codes_k(__m512i low, __m512i high) {
  const __m512i m4 = _mm512_set1_epi16(0x0F);
  if constexpr (T == BlockType::kQ6K) {
    constexpr int g = j & 3;
    const __m512i lo = (g >> 1) ? _mm512_srli_epi16(low, 4) : _mm512_and_si512(low, m4);
    // the 2-bit field g of qh moved to bits 4-5 in one shift, then lo | (that & 0x30) in one vpternlog
    const __m512i hi = g < 2 ? _mm512_slli_epi16(high, 4 - 2 * g) : g == 2 ? high : _mm512_srli_epi16(high, 2);
    return _mm512_sub_epi16(_mm512_ternarylogic_epi32(lo, hi, _mm512_set1_epi16(0x30), 0xF8), _mm512_set1_epi16(32));
  } else if constexpr (T == BlockType::kQ2K || T == BlockType::kQ3K) {
    constexpr int g = j & 3;  // 2-bit field g of each qs byte
    const __m512i q = _mm512_and_si512(_mm512_srli_epi16(low, 2 * g), _mm512_set1_epi16(3));
    if constexpr (T == BlockType::kQ2K) return q;
    // Q3_K: bit j of hmask[l] clear subtracts 4
    const __mmask32 clear = _mm512_testn_epi16_mask(high, _mm512_set1_epi16(1 << j));
    return _mm512_mask_sub_epi16(q, clear, q, _mm512_set1_epi16(4));
  } else {
    const __m512i q = (j & 1) ? _mm512_srli_epi16(low, 4) : _mm512_and_si512(low, m4);
    if constexpr (T == BlockType::kQ4K) return q;
    // Q5_K: bit j of qh moved to bit 4 in one shift, then q | (that & 0x10) in one vpternlog
    const __m512i hi = j < 4 ? _mm512_slli_epi16(high, 4 - j) : j == 4 ? high : _mm512_srli_epi16(high, j - 4);
    return _mm512_ternarylogic_epi32(q, hi, _mm512_set1_epi16(0x10), 0xF8);
  }
}

// M activation rows x weight rows [n0, n1) of a K-quant segment (see the top of the file), R weight rows per pass:
// each 64-byte load of prepared activations feeds the vpdpwssd of R rows, and the R rows' independent chains
// overlap each super-block's tail (converts, fmas, the mins) with the next one's dot products. The integer sums
// are the same as with one row per pass, term for term: the results do not depend on R.
// xsum32 [M, K/32] / xsum16 [M, K/16]: the activations' sums per 32 / 16 elements (Q4_K, Q5_K / Q2_K mins).
template <BlockType T, int M, int R, bool kTwoLimbs>
void rows_k_pass(const Segment& s, int64_t k, const int16_t* xp, const float* xsum32, const float* xsum16,
                 const float* xscale, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  constexpr int bb = ggml::block_bytes(T);
  constexpr bool kSixteen = T == BlockType::kQ6K || T == BlockType::kQ2K || T == BlockType::kQ3K;  // 16 scales
  // int32 accumulators per limb and row: enough chains to hide vpdpwssd's latency
  constexpr int kSplit = M * R <= 2 ? 2 : 1;
  const int64_t nblk = k / 256, rb = nblk * bb;
  const int64_t ahead = std::max<int64_t>(1, prefetch_bytes() / (R * bb));  // blocks per stream
  const int64_t far = kL2PrefetchFactor * ahead;
  const __m512 limb = _mm512_set1_ps(32768.f);
  // Chunk j's scale vector, a permutation of the scales (vpermw: a shuffle, which runs beside the multiplies):
  // Q6_K / Q2_K / Q3_K [sc[2j] x 16 | sc[2j+1] x 16] of the 16 scales, Q4_K / Q5_K sc[j] x 32 of the 8
  __m512i scale_index[8];
  for (int j = 0; j < 8; ++j)
    scale_index[j] = kSixteen
                         ? _mm512_mask_blend_epi16(0xFFFF0000u, _mm512_set1_epi16(2 * j), _mm512_set1_epi16(2 * j + 1))
                         : _mm512_set1_epi16(j);
  for (int64_t r = n0; r < n1; r += R) {
    const uint8_t* row = s.blocks + r * rb;
    __m512 acc[M][R], off16[M][R];
    __m256 off[M][R];
    for (int mm = 0; mm < M; ++mm)
      for (int rr = 0; rr < R; ++rr)
        acc[mm][rr] = off16[mm][rr] = _mm512_setzero_ps(), off[mm][rr] = _mm256_setzero_ps();
    for (int64_t blk = 0; blk < nblk; ++blk) {
      // Each of the R row streams is prefetched `ahead` blocks on, the same ~prefetch_bytes() of weights ahead of
      // use in all as one row per pass; past the row's end that block lies in the row R rows further (a pass
      // later), not in the next row, which another stream of this pass is reading now.
      // The L2 prefetch goes the same way kL2PrefetchFactor times further.
      const int64_t to = ahead * bb + (blk + ahead) / nblk * (R - 1) * rb;
      const int64_t to_far = far * bb + (blk + far) / nblk * (R - 1) * rb;
      const uint8_t* b[R];
      for (int rr = 0; rr < R; ++rr) {
        b[rr] = row + rr * rb + blk * bb;
        for (int p = 0; p < bb; p += 64) {
          _mm_prefetch(reinterpret_cast<const char*>(b[rr] + to + p), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(b[rr] + to_far + p), _MM_HINT_T1);
        }
      }
      __m512i ih[M][R][kSplit], il[M][R][kSplit];
      for (int mm = 0; mm < M; ++mm)
        for (int rr = 0; rr < R; ++rr)
          for (int h = 0; h < kSplit; ++h) ih[mm][rr][h] = il[mm][rr][h] = _mm512_setzero_si512();
      __m512i sc16[R], high[R];
      __m256 mins[R];
      for (int rr = 0; rr < R; ++rr) {
        mins[rr] = _mm256_setzero_ps();
        if constexpr (T == BlockType::kQ6K)
          sc16[rr] = _mm512_castsi256_si512(
              _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b[rr] + 192))));
        else if constexpr (T == BlockType::kQ2K)
          sc16[rr] = _mm512_castsi256_si512(_mm256_and_si256(
              _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b[rr]))), _mm256_set1_epi16(0x0F)));
        else if constexpr (T == BlockType::kQ3K)
          sc16[rr] = q3k_scales(b[rr] + 96);
        else
          sc16[rr] = k_scales_mins(b[rr] + 4, &mins[rr]);
        high[rr] = T == BlockType::kQ5K   ? widen(b[rr] + 16)
                   : T == BlockType::kQ3K ? widen(b[rr])
                                          : _mm512_setzero_si512();
      }
      // Q4_K / Q5_K: chunk j's scale is one broadcast from memory (a load: no shuffle). The scales go through a
      // store, and the empty asm hides where sc_mem points so that the compiler cannot forward the stored vector
      // into register shuffles (vpextrw + vpbroadcastw: two shuffles per chunk, the loop's bound on Zen 4).
      alignas(16) int16_t sc_store[R * 8];
      const int16_t* sc_mem = sc_store;
      if constexpr (!kSixteen) {
        for (int rr = 0; rr < R; ++rr)
          _mm_store_si128(reinterpret_cast<__m128i*>(sc_store + 8 * rr), _mm512_castsi512_si128(sc16[rr]));
        asm("" : "+r"(sc_mem));
      }
      const int16_t* xb = xp + 2 * blk * 256;
      // chunk j (weights 32j..32j+31) of each row: low[rr] / hi_bits[rr] as codes_k takes them
      auto chunk = [&](auto jc, const __m512i* low, const __m512i* hi_bits) {
        constexpr int j = decltype(jc)::value;
        __m512i q[R];
        for (int rr = 0; rr < R; ++rr)
          q[rr] = _mm512_mullo_epi16(
              codes_k<T, j>(low[rr], hi_bits[rr]),
              kSixteen ? _mm512_permutexvar_epi16(scale_index[j], sc16[rr]) : _mm512_set1_epi16(sc_mem[rr * 8 + j]));
        for (int mm = 0; mm < M; ++mm) {
          const int16_t* xc = xb + mm * 2 * k + 64 * j;
          const __m512i xh = _mm512_loadu_si512(xc);
          for (int rr = 0; rr < R; ++rr)
            ih[mm][rr][j % kSplit] = _mm512_dpwssd_epi32(ih[mm][rr][j % kSplit], q[rr], xh);
          if constexpr (kTwoLimbs) {
            const __m512i xl = _mm512_loadu_si512(xc + 32);
            for (int rr = 0; rr < R; ++rr)
              il[mm][rr][j % kSplit] = _mm512_dpwssd_epi32(il[mm][rr][j % kSplit], q[rr], xl);
          }
        }
      };
      if constexpr (kSixteen) {  // four chunks of 32 per 128-weight half
        auto half = [&](auto hc) {
          constexpr int h = decltype(hc)::value;
          __m512i low0[R], low1[R], hi_bits[R];
          for (int rr = 0; rr < R; ++rr) {
            if constexpr (T == BlockType::kQ6K) {  // ql: 64 bytes per half, low nibbles then high; qh: 32
              hi_bits[rr] = widen(b[rr] + 128 + 32 * h), low0[rr] = widen(b[rr] + 64 * h),
              low1[rr] = widen(b[rr] + 64 * h + 32);
            } else {  // Q2_K / Q3_K: 32 qs bytes per half, 2-bit field g is weights 32g..32g+31
              hi_bits[rr] = high[rr], low0[rr] = low1[rr] = widen(b[rr] + (T == BlockType::kQ2K ? 16 : 32) + 32 * h);
            }
          }
          chunk(std::integral_constant<int, 4 * h>{}, low0, hi_bits);
          chunk(std::integral_constant<int, 4 * h + 1>{}, low1, hi_bits);
          chunk(std::integral_constant<int, 4 * h + 2>{}, low0, hi_bits);
          chunk(std::integral_constant<int, 4 * h + 3>{}, low1, hi_bits);
        };
        half(std::integral_constant<int, 0>{});
        half(std::integral_constant<int, 1>{});
      } else {
        constexpr int qs = T == BlockType::kQ4K ? 16 : 48;
        auto pair = [&](auto pc) {
          constexpr int p = decltype(pc)::value;
          __m512i low[R];
          for (int rr = 0; rr < R; ++rr) low[rr] = widen(b[rr] + qs + 32 * p);
          chunk(std::integral_constant<int, 2 * p>{}, low, high);
          chunk(std::integral_constant<int, 2 * p + 1>{}, low, high);
        };
        pair(std::integral_constant<int, 0>{});
        pair(std::integral_constant<int, 1>{});
        pair(std::integral_constant<int, 2>{});
        pair(std::integral_constant<int, 3>{});
      }
      constexpr int d_at = T == BlockType::kQ6K ? 208 : T == BlockType::kQ2K ? 80 : T == BlockType::kQ3K ? 108 : 0;
      for (int rr = 0; rr < R; ++rr) {
        const __m512 d = _mm512_set1_ps(HardF16{}(b[rr] + d_at));
        __m256 neg_min = _mm256_setzero_ps();
        __m512 neg_min16 = _mm512_setzero_ps();
        if constexpr (T == BlockType::kQ4K || T == BlockType::kQ5K) {
          neg_min = _mm256_mul_ps(mins[rr], _mm256_set1_ps(-HardF16{}(b[rr] + 2)));  // -(dmin * m_j), as dequantized
        } else if constexpr (T == BlockType::kQ2K) {  // the mins: the high nibbles of the 16 scale bytes
          const __m128i m = _mm_and_si128(_mm_srli_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b[rr])), 4),
                                          _mm_set1_epi8(0x0F));
          neg_min16 =
              _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(m)), _mm512_set1_ps(-HardF16{}(b[rr] + 82)));
        }
        for (int mm = 0; mm < M; ++mm) {
          __m512i hi = ih[mm][rr][0], lo = il[mm][rr][0];
          for (int h = 1; h < kSplit; ++h)
            hi = _mm512_add_epi32(hi, ih[mm][rr][h]), lo = _mm512_add_epi32(lo, il[mm][rr][h]);
          __m512 f = _mm512_cvtepi32_ps(hi);
          if constexpr (kTwoLimbs) f = _mm512_fmadd_ps(f, limb, _mm512_cvtepi32_ps(lo));
          acc[mm][rr] = _mm512_fmadd_ps(f, d, acc[mm][rr]);
          if constexpr (T == BlockType::kQ4K || T == BlockType::kQ5K)
            off[mm][rr] = _mm256_fmadd_ps(neg_min, _mm256_loadu_ps(xsum32 + mm * (k / 32) + blk * 8), off[mm][rr]);
          if constexpr (T == BlockType::kQ2K)
            off16[mm][rr] =
                _mm512_fmadd_ps(neg_min16, _mm512_loadu_ps(xsum16 + mm * (k / 16) + blk * 16), off16[mm][rr]);
        }
      }
    }
    for (int mm = 0; mm < M; ++mm)
      for (int rr = 0; rr < R; ++rr) {
        const __m256 o = _mm256_add_ps(off[mm][rr], _mm256_add_ps(_mm512_castps512_ps256(off16[mm][rr]),
                                                                  _mm512_extractf32x8_ps(off16[mm][rr], 1)));
        __m128 o4 = _mm_add_ps(_mm256_castps256_ps128(o), _mm256_extractf128_ps(o, 1));
        o4 = _mm_add_ps(o4, _mm_movehl_ps(o4, o4));
        o4 = _mm_add_ss(o4, _mm_movehdup_ps(o4));
        out[mm * ldo + r + rr] = _mm512_reduce_add_ps(acc[mm][rr]) * xscale[mm] + _mm_cvtss_f32(o4);
      }
  }
}

// rows_k_pass over weight rows [n0, n1). One activation row takes 4 weight rows per pass when the rows are long
// (K >= 8192: the prepared activations, 4K bytes, no longer fit in L1 beside the weight stream, and one row per
// pass reads them from L2 for every row), else one. Measured on Zen 4 (one core, CPU time, fp32 activations):
// Q4_K 2048 x 8192 streamed from DRAM 12.9 -> 20.3 G weights/s, Q6_K 10.3 -> 13.3; but at K = 2048 / 4096 four
// row streams of 8-16 blocks each read DRAM slower than one (Q4_K bf16 21.0 -> 14.6, Q6_K 15 -> 9-11 G
// weights/s; software prefetch distances from 2 to 32 KiB did not change it), though faster from L3 (Q4_K 20.8
// -> 25.9). 8 rows spilled registers in Q5_K / Q6_K. More activation rows already give each loaded block
// several uses: one weight row per pass.
template <BlockType T, int M, bool kTwoLimbs>
void rows_k(const Segment& s, int64_t k, const int16_t* xp, const float* xsum32, const float* xsum16,
            const float* xscale, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  int64_t n_pass = n0;
  if constexpr (M == 1) {
    constexpr int R = 4;
    if (k >= 8192) {
      n_pass = n0 + (n1 - n0) / R * R;
      rows_k_pass<T, M, R, kTwoLimbs>(s, k, xp, xsum32, xsum16, xscale, n0, n_pass, out, ldo);
    }
  }
  if (n_pass < n1) rows_k_pass<T, M, 1, kTwoLimbs>(s, k, xp, xsum32, xsum16, xscale, n_pass, n1, out, ldo);
}

// Calls body(std::integral_constant<int, M>{}, m0) over activation rows [0, m) in steps of M = kMax, 4, 2, 1 (the
// largest left): the kernels keep their accumulators per activation row in compile-time sized arrays.
template <int kMax, class Body>
void row_steps(int64_t m, Body body) {
  for (int64_t m0 = 0; m0 < m;) {
    const int64_t left = m - m0;
    if constexpr (kMax >= 8) {
      if (left >= 8) {
        body(std::integral_constant<int, 8>{}, m0);
        m0 += 8;
        continue;
      }
    }
    if (left >= 4) {
      body(std::integral_constant<int, 4>{}, m0);
      m0 += 4;
    } else if (left >= 2) {
      body(std::integral_constant<int, 2>{}, m0);
      m0 += 2;
    } else {
      body(std::integral_constant<int, 1>{}, m0);
      m0 += 1;
    }
  }
}

// All m activation rows against weight rows [n0, n1) of a segment: rows_k for the K-quants (at most 4
// activation rows per pass: its int32 accumulators fill the registers), rows_b32 for Q5_0 / Q5_1 / Q8_0 (8 per
// pass).
template <BlockType T, bool kTwoLimbs>
void rows_all_m(const Segment& s, int64_t k, const int16_t* xp, const float* xsum32, const float* xsum16,
                const float* xscale, int64_t m, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  constexpr bool kSuper = ggml::block_weights(T) == 256;
  row_steps<kSuper ? 4 : 8>(m, [&](auto rows, int64_t m0) {
    constexpr int M = decltype(rows)::value;
    const int16_t* x = xp + m0 * 2 * k;
    const float* s32 = xsum32 + m0 * (k / 32);
    if constexpr (kSuper)
      rows_k<T, M, kTwoLimbs>(s, k, x, s32, xsum16 + m0 * (k / 16), xscale + m0, n0, n1, out + m0 * ldo, ldo);
    else
      rows_b32<T, M, kTwoLimbs>(s, k, x, s32, xscale + m0, n0, n1, out + m0 * ldo, ldo);
  });
}

template <bool kTwoLimbs>
void rows_dispatch(const Segment& s, int64_t k, const int16_t* xp, const float* xsum32, const float* xsum16,
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
    default: return run(std::integral_constant<BlockType, BlockType::kQ5_1>{});
  }
}

}  // namespace

// False (nothing written) when x holds values the fixed point cannot carry.
bool linear_vnni(bool bf16, const void* x, int64_t m, const std::vector<Segment>& segs, int64_t k, float* out,
                 int64_t ldo) {
  thread_local std::vector<int16_t> xp;
  thread_local std::vector<float> xsum32, xsum16, xscale;
  xp.resize(m * 2 * k);
  xsum32.resize(m * (k / 32));
  xsum16.resize(m * (k / 16));
  xscale.resize(m);
  const QuantWeight as_int8{nullptr, nullptr, nullptr, ScaleType::kF32, 8, 0, k, 32};  // in-order layout
  if (!vnni::prepare(bf16, x, m, as_int8, xp.data(), xsum32.data(), xscale.data())) return false;
  // The sums per 16 elements, for Q2_K's mins (one per 16 weights): those per 32 of the others come with prepare
  const bool need16 = std::any_of(segs.begin(), segs.end(), [](const Segment& s) { return s.type == BlockType::kQ2K; });
  for (int64_t i = 0; need16 && i < m * (k / 16); ++i) {
    float acc = 0.f;
    for (int e = 0; e < 16; ++e) acc += load_x(bf16, x, i * 16 + e);
    xsum16[i] = acc;
  }
  const int16_t* xs = xp.data();
  const float *s16 = xsum16.data(), *s32 = xsum32.data(), *sc = xscale.data();
  int64_t col = 0;
  for (const Segment& s : segs) {
    parallel_for(s.rows, gemv_grain(s.type, k, s.rows), [&](int64_t n0, int64_t n1) {
      if (bf16)
        rows_dispatch<false>(s, k, xs, s32, s16, sc, m, n0, n1, out + col, ldo);
      else
        rows_dispatch<true>(s, k, xs, s32, s16, sc, m, n0, n1, out + col, ldo);
    });
    col += s.rows;
  }
  return true;
}

#pragma GCC pop_options
#else
bool linear_vnni(bool, const void*, int64_t, const std::vector<Segment>&, int64_t, float*, int64_t) { return false; }
#endif

bool gemm_available(const std::vector<Segment>& segs) {
  return prefill_gemm_available() &&
         std::all_of(segs.begin(), segs.end(), [](const Segment& s) { return gemm_supports(s.type); });
}

// The GEMV / GEMM switch of a weight (tuning.h): the largest of its segments' (a fused weight moves to the GEMM
// when every part of it gains).
int64_t gemm_from_rows(const std::vector<Segment>& segs) {
  int64_t rows = 1;
  for (const Segment& s : segs)
    rows = std::max(rows, quant_gemm_from_rows(ggml::block_weights(s.type) == 256 ? QuantGemm::kGgmlSuper
                                                                                  : QuantGemm::kGgmlBlock32));
  return rows;
}

void linear(bool bf16, const void* x, int64_t m, const std::vector<Segment>& segs, int64_t k, float* out) {
  int64_t n = 0;
  for (const Segment& s : segs) n += s.rows;
  // enough rows that dequantizing each weight once and multiplying in the GEMM's register tile wins (tuning.h)
  if (m >= gemm_from_rows(segs) && gemm_available(segs)) return gemm(bf16, x, m, segs, k, out);
  // from fewer rows where the AMX GEMM takes every segment (gemm() then runs it: tuning.h)
  const bool super_blocks =
      std::any_of(segs.begin(), segs.end(), [](const Segment& s) { return ggml::block_weights(s.type) == 256; });
  if (m >= amx_kquant_from_rows(super_blocks) && amx_kquant_available(segs, k)) return gemm(bf16, x, m, segs, k, out);
  if (has_vnni() && linear_vnni(bf16, x, m, segs, k, out, n)) return;
  // AVX2 without any VNNI: fp32 FMAs on the codes (kquant_linear_fma.cpp), which beat the integer kernels there
  if (fma_gemv::use_for(segs) && fma_gemv::linear(bf16, x, m, segs, k, out, n)) return;
  // No AVX512-VNNI: the same arithmetic on 256-bit vectors (kquant_linear_avx2.cpp)
  if (vnni256::kquant_supports(segs) && vnni256::kquant_linear(bf16, x, m, segs, k, out, n)) return;
  int64_t col = 0;
  for (const Segment& s : segs) {
    parallel_for(s.rows, row_grain(s.type, k),
                 [&](int64_t n0, int64_t n1) { rows_portable(bf16, x, m, s, k, n0, n1, out + col, n); });
    col += s.rows;
  }
}

}  // namespace kquant
}  // namespace cpu

namespace {

// Activation rows up to which kquant::linear runs where gemm.cpp's GEMM does not take the weight (the portable ISA
// level, or a block type it does not decode): beyond, dequantize bands of rows and multiply with ATen's GEMM.
// The VNNI kernel takes prefill-sized inputs too: it reads each ~32 KiB chunk of blocks once from memory and then
// from cache for every 4 activation rows, on the work-claiming pool. The dequantize + at::mm path spent 10x
// longer in OpenMP barriers than in arithmetic on a busy 2-core machine (128-token prefill of a 115M-parameter
// Q4_K_M model: 7.3 s against 1.0 s). The portable path dots each row in scalar fp32: small m only.
// Up to cpu::kMaxGemvRows (the CPU decode plan's largest step) on every CPU, so that the plan and this op run
// the same kernel (kquant::linear, which picks GEMV or GEMM by the rows).
constexpr int64_t kMaxGemvRows = cpu::kMaxGemvRows, kMaxVnniRows = 1024;

// The op, or (amx_only) its test hook: [fp32 out [m, N]] from the AMX GEMM, [] where that does not run.
std::vector<at::Tensor> kquant_linear_impl(const at::Tensor& x, at::TensorList blocks, at::IntArrayRef types,
                                           const std::optional<at::Tensor>& bias, bool amx_only) {
  const char* op = amx_only ? "cpu_kquant_linear_amx" : "kquant_linear";
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(!blocks.empty() && blocks.size() == types.size(), op, ": need one type per block tensor, got ",
              blocks.size(), " tensors and ", types.size(), " types");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension");
  const int64_t k = x.size(-1);
  std::vector<cpu::kquant::Segment> segs;
  int64_t n = 0;
  for (size_t i = 0; i < blocks.size(); ++i) {
    TORCH_CHECK(ggml::valid_type(static_cast<int>(types[i])), op, ": unknown block type id ", types[i]);
    const auto t = static_cast<ggml::BlockType>(types[i]);
    const auto& b = blocks[i];
    TORCH_CHECK(b.device().is_cpu() && b.scalar_type() == at::kByte && b.dim() == 2 && b.is_contiguous(), op,
                ": blocks must be contiguous 2-D uint8 CPU tensors, got ", b.scalar_type(), " ", b.sizes());
    TORCH_CHECK(k > 0 && k % ggml::block_weights(t) == 0, op, ": K=", k, " is not a multiple of the block size ",
                ggml::block_weights(t), " of type id ", types[i]);
    TORCH_CHECK(b.size(1) == cpu::kquant::row_bytes(t, k), op, ": blocks of type id ", types[i], " for K=", k,
                " must have ", cpu::kquant::row_bytes(t, k), " bytes per row, got ", b.size(1));
    segs.push_back({t, b.data_ptr<uint8_t>(), b.size(0)});
    n += b.size(0);
  }
  if (bias.has_value())
    TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == n, op, ": bias must be a CPU [", n,
                "] tensor, got ", bias->sizes());
  if (amx_only) {  // the test hook's path: the AMX GEMM or nothing
    std::vector<at::Tensor> result;
    if (!cpu::amx_bf16_available() || !cpu::amx_kquant_supports(segs, k)) return result;
    const int64_t m = x.numel() / k;
    const auto xc = x.contiguous();
    auto out = at::empty({m, n}, x.options().dtype(at::kFloat));
    if (!cpu::gemm_amx_kquant(x.scalar_type() == at::kBFloat16, xc.data_ptr(), m, segs, k, out.data_ptr<float>()))
      return result;
    result.push_back(out);
    return result;
  }
  auto sizes = x.sizes().vec();
  sizes.back() = n;
  const int64_t m = x.numel() / k;
  const auto xc = x.contiguous();
  auto out = at::empty({m, n}, x.options().dtype(at::kFloat));
  if (m > 0 && n > 0) {
    if (m <= (cpu::kquant::has_vnni() ? kMaxVnniRows : kMaxGemvRows) || cpu::kquant::gemm_available(segs)) {
      cpu::kquant::linear(x.scalar_type() == at::kBFloat16, xc.data_ptr(), m, segs, k, out.data_ptr<float>());
    } else {
      // Prefill: a band of exact fp32 rows at a time (fits L2), then a GEMM.
      const auto x2 = xc.reshape({m, k}).to(at::kFloat);
      const int64_t band = std::max<int64_t>(16, (int64_t{1} << 20) / k);
      auto tile = at::empty({band, k}, x.options().dtype(at::kFloat));
      int64_t col = 0;
      for (const auto& s : segs) {
        for (int64_t r0 = 0; r0 < s.rows; r0 += band) {
          const int64_t r1 = std::min(s.rows, r0 + band);
          float* tp = tile.data_ptr<float>();
          // the work-claiming pool (thread_pool.h), not OpenMP: its barrier stalled on a busy machine
          cpu::parallel_for(r1 - r0, 8, [&](int64_t a, int64_t b) {
            cpu::kquant::dequantize_rows(s, k, r0 + a, r0 + b, tp + a * k);
          });
          out.narrow(1, col + r0, r1 - r0).copy_(at::mm(x2, tile.narrow(0, 0, r1 - r0).t()));
        }
        col += s.rows;
      }
    }
  }
  if (bias.has_value()) out.add_(bias->to(at::kFloat));
  return {out.to(x.scalar_type()).reshape(sizes)};
}

at::Tensor kquant_linear(const at::Tensor& x, at::TensorList blocks, at::IntArrayRef types,
                         const std::optional<at::Tensor>& bias) {
  return kquant_linear_impl(x, blocks, types, bias, false)[0];
}

// Test hook: kquant_linear on the AMX GEMM (gemm_amx_quant.cpp) whatever the row count and ISA level: [fp32 out of
// x flattened to [m, K]], or [] where it does not run (no AMX, LLAMA_FAST_AMX=0, a block type it does not take, x
// holding inf / NaN): so that tests know that they reach the kernel itself.
std::vector<at::Tensor> cpu_kquant_linear_amx(const at::Tensor& x, at::TensorList blocks, at::IntArrayRef types) {
  return kquant_linear_impl(x, blocks, types, std::nullopt, true);
}

// The dequantized weight (the kernels' own decoding), for tests: fp32 [N, K].
at::Tensor kquant_dequantize(const at::Tensor& blocks, int64_t type, int64_t k) {
  const char* op = "kquant_dequantize";
  TORCH_CHECK(ggml::valid_type(static_cast<int>(type)), op, ": unknown block type id ", type);
  const auto t = static_cast<ggml::BlockType>(type);
  TORCH_CHECK(
      blocks.device().is_cpu() && blocks.scalar_type() == at::kByte && blocks.dim() == 2 && blocks.is_contiguous(), op,
      ": blocks must be contiguous 2-D uint8");
  TORCH_CHECK(k > 0 && k % ggml::block_weights(t) == 0 && blocks.size(1) == cpu::kquant::row_bytes(t, k), op,
              ": blocks ", blocks.sizes(), " do not hold rows of K=", k);
  auto out = at::empty({blocks.size(0), k}, blocks.options().dtype(at::kFloat));
  const cpu::kquant::Segment s{t, blocks.data_ptr<uint8_t>(), blocks.size(0)};
  cpu::kquant::dequantize_rows(s, k, 0, s.rows, out.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llama_fast, m) {
  // x @ W^T (+ bias) for W stacked from row segments of ggml block types (llama_fast.kquants.TYPE_IDS).
  m.def("kquant_linear(Tensor x, Tensor[] blocks, int[] types, Tensor? bias) -> Tensor");
  m.def("kquant_dequantize(Tensor blocks, int type, int k) -> Tensor");
  // kquant_linear forced onto the AMX GEMM (tests): [out], or [] where that kernel does not run.
  m.def("cpu_kquant_linear_amx(Tensor x, Tensor[] blocks, int[] types) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(llama_fast, CPU, m) {
  m.impl("kquant_linear", &kquant_linear);
  m.impl("kquant_dequantize", &kquant_dequantize);
  m.impl("cpu_kquant_linear_amx", &cpu_kquant_linear_amx);
}

}  // namespace llama_fast
