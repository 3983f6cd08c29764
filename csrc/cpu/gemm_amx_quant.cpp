// The int4 / int8 weight-only quantized GEMM on Intel AMX, exact in the activations (docs/AMX_PLAN.md).
//
// TDPBF16PS multiplies bf16 tiles into fp32 tiles. Rounding the activations to bf16 would change the model, so
// nothing is rounded:
// - the weight codes (int4 0..15, int8 -128..127) have at most 8 significant bits: exact in bf16;
// - an fp32 activation x is the exact sum of three bf16 digits: hi = x truncated to bf16 (its top 8 significand
//   bits), mid = (x - hi) truncated, lo = x - hi - mid. x - hi holds the low 16 significand bits of x (exact in
//   fp32, same exponent range), mid its top 8 of those, lo the last 8: each digit exact in bf16 as long as it is
//   normal (|x| >= 2^-103, see the row scaling below). A bf16 activation is one digit.
// So a tile product of codes and digits is exact in fp32, and per group of K (a multiple of 32, one or more
// TDPBF16PS depths, or 16, half of one) C_g = sum over digits of codes . digits is the fp32 sum of the exact
// products codes . x. Then, in fp32 vector registers, out += scale * C_g + offset * sum_g(x), the factored form of
// sum (code scale + offset) x that the other quantized kernels use (quant_linear.cpp), rounded in another order;
// bias added, rounded once to the output dtype.
//
// Denormals: TDPBF16PS reads bf16 denormals as zero and flushes fp32 denormal results. A row whose largest
// magnitude lies outside [2^-64, 2^64] (tiny or huge activations) is multiplied by a power of two that brings it
// into [1, 2) before the split (exact: only the exponent changes) and each group's C by the inverse (exact unless
// the true value is itself denormal); in every row, digits below 2^-126 then stand for elements below 2^-103, i.e.
// below 2^-39 of the row's largest element for an unscaled row, 2^-103 for a scaled one: they are dropped (an error
// below 2^-120 of the row's scale per element, far under the fp32 rounding of the sum).
// inf / NaN cannot be split (inf - inf): the activations are checked while packed and the call returns false so
// that the caller takes its fp32 path, which propagates them as the reference does.
//
// Layout: the weights are the tiles' A operand (16 weight rows x 32 codes: a row's codes in K order, as stored,
// no transpose), the activations B (32 K x 16 activation rows in TDPBF16PS's pair layout, packed once per call),
// so the accumulator is C^T: 16 weight rows x 16 activation rows, and the per-row scale / offset of a weight row is
// a broadcast in the epilogue while the activation sums and row scalings are vectors. Each thread takes a range of
// pairs of 16-row weight blocks; per K chunk (~512) it unpacks both blocks' codes to bf16 once (int4: nibbles ->
// words -> a 16-entry bf16 table by vpermw; int8: bytes -> fp32 -> bf16) and runs them against every 16-row block
// of activations of the pass (pass_blocks; their tiles re-read per weight pair): per group,
// 2 C tiles (tmm0-1 for even groups, tmm2-3 for odd ones), 2 A tiles (tmm4-5), the digits' B tiles alternating in
// tmm6-7, so each B load feeds two multiplies; a group's C tiles are stored and read back by the epilogue only after
// the next group's multiplies are issued (software pipelining). The fp32 sums of the two weight blocks x 16
// activation rows wait in a per-thread buffer until the last K chunk, then are transposed and written to out[m][n].
//
// Weights: the loop is a template on the weight side (QuantCodes: llama_fast's int4 / int8 QuantWeight; GgmlCodes:
// ggml block segments, kquant::gemm's Q8_0 / Q4_K / Q5_K / Q5_0 / Q5_1 and Q6_K / Q2_K / Q3_K, whose weights are
// also code * scale + offset per group of 32 or 16 with codes exact in bf16 and scale / offset exact in fp32),
// which unpacks 16 rows x a K chunk of codes to bf16 tiles and gives each row's fp32 scale / offset per group;
// everything else is shared.
#include "cpu/gemm_amx_quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <vector>

#include "common/half_float.h"
#include "cpu/amx_tiles.h"
#include "cpu/gemm_amx.h"
#include "cpu/thread_pool.h"
#include "cpu/tuning.h"

namespace llama_fast {
namespace cpu {

bool amx_quant_supports(const QuantWeight& w) {
  return (w.bits == 4 || w.bits == 8) && w.group_size > 0 && w.group_size % 32 == 0 && w.k % w.group_size == 0;
}

bool amx_quant_available(const QuantWeight& w) { return amx_in_effect() && amx_quant_supports(w); }

bool amx_kquant_supports(ggml::BlockType t) {
  using ggml::BlockType;
  return t == BlockType::kQ8_0 || t == BlockType::kQ4K || t == BlockType::kQ5K || t == BlockType::kQ5_0 ||
         t == BlockType::kQ5_1 || t == BlockType::kQ6K || t == BlockType::kQ2K || t == BlockType::kQ3K;
}

bool amx_kquant_supports(const std::vector<kquant::Segment>& segs, int64_t k) {
  return !segs.empty() && k > 0 && std::all_of(segs.begin(), segs.end(), [k](const kquant::Segment& s) {
    return amx_kquant_supports(s.type) && k % ggml::block_weights(s.type) == 0;
  });
}

bool amx_kquant_available(const std::vector<kquant::Segment>& segs, int64_t k) {
  return amx_in_effect() && amx_kquant_supports(segs, k);
}

#ifdef LF_AMX

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
// GCC 12 warns that the AVX-512 intrinsics' internal _mm512_undefined_* placeholders "may be used uninitialized"
// when inlined outside the target's own translation defaults: a false positive (as in gemm_amx.cpp).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace {

using amx::kTileK;
using amx::kTileRows;
constexpr int64_t kTileWords = kTileRows * kTileK;      // bf16 elements per tile
constexpr int64_t kTileDwords = kTileRows * kTileRows;  // fp32 elements or bf16 pairs per tile

// Rows whose largest magnitude lies in this range are split as they are; others are scaled by a power of two first.
constexpr float kUnscaledMin = 0x1p-64f, kUnscaledMax = 0x1p64f;

// The packed activations of one call (all per 16-row block mb of activation rows; rows past m are zero).
struct PackedActivations {
  uint32_t* tiles;   // [mblocks][ktiles][digits][16 K pairs][16 rows]: TDPBF16PS's B layout
  float* sums;       // [mblocks][groups][16]: each row's sum of x over the group, fp32, unscaled
  float* unscale;    // [mblocks][16]: 1, or the inverse of the power of two the row was multiplied by
  uint8_t* scaled;   // [mblocks]: whether any row of the block was scaled
  uint8_t* invalid;  // [mblocks]: whether the block holds inf / NaN
  int digits;        // 3 (fp32) or 1 (bf16)
  int64_t ktiles, groups;
};

// 16 rows of 16 dwords transposed in registers (r[i][j] -> r[j][i]).
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // r[i + c] lane L: rows i..i+3 of column 4L + c
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // lanes (0, 2) and (1, 3) of the row groups 0-3 / 4-7 and 8-11 / 12-15
    t[c] = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88);
    t[4 + c] = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xdd);
    t[8 + c] = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88);
    t[12 + c] = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xdd);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0x88);            // columns 0-3
    r[4 + c] = _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0x88);   // 4-7
    r[8 + c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0xdd);        // 8-11
    r[12 + c] = _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0xdd);  // 12-15
  }
}

// The power of two a row is multiplied by before the split (1 inside [kUnscaledMin, kUnscaledMax]); *unscale gets
// its inverse. Scaled rows' largest magnitude lands in [1, 2) (a denormal one in (0, 1)).
inline float row_scale(float amax, float* unscale) {
  if (amax == 0.f || (amax >= kUnscaledMin && amax <= kUnscaledMax)) {
    *unscale = 1.f;
    return 1.f;
  }
  uint32_t bits;
  std::memcpy(&bits, &amax, sizeof bits);
  const int biased = static_cast<int>(bits >> 23);
  const int e = biased == 0 ? -126 : biased - 127;  // amax < 2^(e + 1)
  *unscale = std::ldexp(1.f, e);
  return std::ldexp(1.f, -e);
}

// 16 elements of an activation row from k0 as fp32 (bf16 widened exactly).
inline __m512 load16(const float* x) { return _mm512_loadu_ps(x); }
inline __m512 load16(const uint16_t* x) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))), 16));
}

// 32 fp32 values (a: elements 0-15, b: 16-31) as bf16 pairs in element order (16 dwords), from the high halves of
// their bit patterns: exact when the values are bf16 (their low 16 bits zero).
inline __m512i high_halves(__m512 a, __m512 b) {
  const __m512i odd_words = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29, 27,
                                             25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  return _mm512_permutex2var_epi16(_mm512_castps_si512(a), odd_words, _mm512_castps_si512(b));
}

// x (fp32) truncated to bf16 precision: its top 8 significand bits.
inline __m512 truncate_bf16(__m512 x) {
  return _mm512_castsi512_ps(
      _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}

// Activation rows [16 mb, 16 mb + 16) of x into p's tiles / sums / unscale; false when they hold inf / NaN.
template <typename T>
bool pack_activation_block(const T* x, int64_t m, int64_t k, int64_t group_size, int64_t mb,
                           const PackedActivations& p) {
  const int64_t r0 = mb * kTileRows;
  const int rows = static_cast<int>(std::min<int64_t>(kTileRows, m - r0));
  float scale[kTileRows];
  float* unscale = p.unscale + mb * kTileRows;
  bool scaled = false;
  for (int i = 0; i < kTileRows; ++i) {
    scale[i] = 0.f;  // rows past m: zero
    unscale[i] = 1.f;
    if (i >= rows) continue;
    const T* row = x + (r0 + i) * k;
    __m512 amax = _mm512_setzero_ps();
    __mmask16 bad = 0;
    for (int64_t c = 0; c < k; c += 16) {
      const __m512 v = _mm512_abs_ps(load16(row + c));
      bad |= _mm512_cmp_ps_mask(v, _mm512_set1_ps(INFINITY), _CMP_NLT_UQ);  // inf or NaN
      amax = _mm512_max_ps(amax, v);
    }
    if (bad) return false;
    scale[i] = row_scale(_mm512_reduce_max_ps(amax), &unscale[i]);
    scaled |= scale[i] != 1.f;
  }
  p.scaled[mb] = scaled;
  // groups of 16 (half a K tile): each tile's two halves are groups of their own
  const bool half_groups = group_size < kTileK;
  const int64_t tiles_per_group = half_groups ? 1 : group_size / kTileK;
  __m512 sum[kTileRows];
  alignas(64) float half_sums[2][kTileRows];  // half_groups: the tile's two groups' sums
  for (int64_t kt = 0; kt < p.ktiles; ++kt) {
    if (kt % tiles_per_group == 0)
      for (int i = 0; i < kTileRows; ++i) sum[i] = _mm512_setzero_ps();
    __m512i digit[3][kTileRows];  // [digit][row]: the row's 16 K pairs
    for (int i = 0; i < kTileRows; ++i) {
      __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
      half_sums[0][i] = half_sums[1][i] = 0.f;
      if (i < rows) {
        const T* src = x + (r0 + i) * k + kt * kTileK;
        a = load16(src);
        b = load16(src + 16);
        if (half_groups) {
          half_sums[0][i] = _mm512_reduce_add_ps(a);
          half_sums[1][i] = _mm512_reduce_add_ps(b);
        } else {
          sum[i] = _mm512_add_ps(sum[i], _mm512_add_ps(a, b));
        }
        if (scale[i] != 1.f) {
          a = _mm512_mul_ps(a, _mm512_set1_ps(scale[i]));
          b = _mm512_mul_ps(b, _mm512_set1_ps(scale[i]));
        }
      }
      if (p.digits == 1) {  // bf16: exact as it is (and after a power-of-two scaling)
        digit[0][i] = high_halves(a, b);
        continue;
      }
      const __m512 ha = truncate_bf16(a), hb = truncate_bf16(b);
      const __m512 ra = _mm512_sub_ps(a, ha), rb = _mm512_sub_ps(b, hb);  // exact: the low 16 significand bits
      const __m512 ma = truncate_bf16(ra), mbv = truncate_bf16(rb);
      digit[0][i] = high_halves(ha, hb);
      digit[1][i] = high_halves(ma, mbv);
      digit[2][i] = high_halves(_mm512_sub_ps(ra, ma), _mm512_sub_ps(rb, mbv));  // exact, at most 8 bits
    }
    for (int d = 0; d < p.digits; ++d) {
      transpose16(digit[d]);  // [row][pair] -> [pair][row]
      uint32_t* dst = p.tiles + ((mb * p.ktiles + kt) * p.digits + d) * kTileDwords;
      for (int pr = 0; pr < kTileRows; ++pr) _mm512_storeu_si512(dst + pr * kTileRows, digit[d][pr]);
    }
    if (half_groups) {
      std::memcpy(p.sums + (mb * p.groups + 2 * kt) * kTileRows, half_sums, sizeof half_sums);
    } else if ((kt + 1) % tiles_per_group == 0) {
      float* s = p.sums + (mb * p.groups + kt / tiles_per_group) * kTileRows;
      for (int i = 0; i < kTileRows; ++i) s[i] = _mm512_reduce_add_ps(sum[i]);
    }
  }
  return true;
}

// Weight rows [n0, n0 + 32) x activation blocks [mb0, mb1) of out: the fp32 sums
// acc[mb - mb0][2][16 weight rows][16 activation rows] transposed, plus the bias, rounded once to T.
template <typename T>
void write_output(const float* acc, const T* bias, T* out, int64_t m, int64_t n, int64_t n0, int64_t mb0, int64_t mb1) {
  for (int j = 0; j < 2; ++j) {
    const int64_t col0 = n0 + j * kTileRows;
    if (col0 >= n) break;
    const int cols = static_cast<int>(std::min<int64_t>(kTileRows, n - col0));
    alignas(64) float bias_f[kTileRows] = {};
    if (bias != nullptr)
      for (int c = 0; c < cols; ++c) {
        if constexpr (std::is_same_v<T, float>)
          bias_f[c] = bias[col0 + c];
        else
          bias_f[c] = bf16_bits_to_float(bias[col0 + c]);
      }
    const __m512 b = _mm512_load_ps(bias_f);
    for (int64_t mb = mb0; mb < mb1; ++mb) {
      __m512i t[kTileRows];
      const float* a = acc + ((mb - mb0) * 2 + j) * kTileDwords;
      for (int r = 0; r < kTileRows; ++r) t[r] = _mm512_loadu_si512(a + r * kTileRows);
      transpose16(t);  // [weight row][activation row] -> [activation row][weight row]
      for (int i = 0; i < kTileRows && mb * kTileRows + i < m; ++i) {
        const __m512 v = _mm512_add_ps(_mm512_castsi512_ps(t[i]), b);
        T* dst = out + (mb * kTileRows + i) * n + col0;
        if constexpr (std::is_same_v<T, float>)
          _mm512_mask_storeu_ps(dst, static_cast<__mmask16>((1u << cols) - 1u), v);
        else
          amx::store_bf16(dst, v, cols);
      }
    }
  }
}

// The K elements per chunk of weights unpacked at once: whole groups, ~512 elements (2 x 16 rows x 512 bf16 =
// 32 KiB, L1-resident while every block of activation rows runs against it); at most kScaleStride groups (groups of
// 16: 256 elements, an even number of groups, so that a chunk starts at a whole K tile).
constexpr int64_t kScaleStride = 16;
int64_t k_chunk(int64_t group_size) {
  return std::min<int64_t>(kScaleStride, std::max<int64_t>(1, 512 / group_size)) * group_size;
}

// The K tiles group g's products read. A group of 32 K or more is whole tiles [g * tiles, (g + 1) * tiles). A group
// of 16 (the sub-blocks of Q6_K / Q2_K / Q3_K, each with its own scale) is half of tile g / 2, multiplied by tiles
// configured for K = 16 (configure_group_tiles, configure_small_m_tiles): its codes are words (g % 2) * 16 .. + 15 of
// each 32-word row of the unpacked A tile (read with the same 64-byte stride), its activations K pairs (g % 2) * 8 .. +
// 7 of the B tile, so neither the unpacked codes nor the packed activations change layout.
struct GroupSteps {
  int64_t first_tile, tiles;
  int64_t a_words, b_dwords;  // offsets into each A / B tile
};
inline GroupSteps group_steps(int64_t g, int64_t group_size) {
  if (group_size < kTileK) return {g / 2, 1, g % 2 * (kTileK / 2), g % 2 * (kTileRows / 2) * kTileRows};
  const int64_t tiles = group_size / kTileK;
  return {g * tiles, tiles, 0, 0};
}

// TDPBF16PS's operand shapes for a group size: K = 32 per multiply (A 16 x 64 bytes, B 16 rows of K pairs), or 16
// for groups of 16 (A 16 x 32 bytes, B 8 rows).
inline void set_group_shapes(amx::TileConfig& cfg, int64_t group_size, std::initializer_list<int> a_tiles,
                             std::initializer_list<int> b_tiles) {
  if (group_size >= kTileK) return;
  for (int t : a_tiles) cfg.colsb[t] = kTileK;  // 16 bf16
  for (int t : b_tiles) cfg.rows[t] = kTileRows / 2;
}

// The general loop's tiles (C 0-3, A 4-5, B 6-7): 16 x 64 bytes, A and B shaped for the group size.
void configure_group_tiles(int64_t group_size) {
  amx::TileConfig cfg = amx::full_tiles();
  set_group_shapes(cfg, group_size, {4, 5}, {6, 7});
  amx::load_tile_config(cfg);
}

// Up to 16 consecutive scales / offsets from element i as fp32, as scale_at converts them (masked-off lanes zero).
inline __m512 load_scales(const void* p, ScaleType t, int64_t i, __mmask16 mask) {
  switch (t) {
    case ScaleType::kF32: return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(p) + i);
    case ScaleType::kF16: return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(p) + i));
    default:
      return _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(p) + i)), 16));
  }
}

// The weight side of the tile loop, one class per storage (the loop, gemm_amx_quant_t, is a template on it): every
// weight row is integer codes exact in bf16 with an fp32 (scale, offset) per group of group_size() weights along
// K, so that the row's dequantized weight is code * scale + offset. A class provides
// - n(), k(), group_size() (16 or a multiple of 32), has_offsets() (whether any row may have a non-zero offset);
// - unpack(n0, kt0, count, dst): the codes of weight rows [n0, n0 + 16) (zero past n) for the K tiles
//   [kt0, kt0 + count) as bf16 in K order, dst[t][16 rows][32], tile by tile (consecutive stores: row by row
//   they were 1 KiB apart, several times slower);
// - row_scales(row, g0, groups, scale, offset): the fp32 scales (and offsets, where has_offsets()) of groups
//   [g0, g0 + groups) of row (< n), then zeros up to kScaleStride.

// bf16 bit patterns of the integers first, first + 1, ..., first + 31 (exact: at most 8 significant bits), the
// table vpermw indexes with the low 5 bits of each 16-bit code.
inline __m512i bf16_integer_table(int first) {
  alignas(64) uint16_t t[32];
  for (int i = 0; i < 32; ++i) {
    const float f = static_cast<float>(first + i);
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    t[i] = static_cast<uint16_t>(bits >> 16);
  }
  return _mm512_load_si512(t);
}

// 32 int8 codes as bf16 (through fp32: exact).
inline void store_int8_codes(const int8_t* src, uint16_t* dst) {
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))));
  const __m512 hi =
      _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16))));
  _mm512_storeu_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

// llama_fast's QuantWeight: int4 (two codes per byte, element 2j in the low nibble) or int8 codes, scales / offsets
// [n][groups] in w.scale_type.
class QuantCodes {
 public:
  explicit QuantCodes(const QuantWeight& w) : w_(w), table_(bf16_integer_table(0)) {}
  int64_t n() const { return w_.n; }
  int64_t k() const { return w_.k; }
  int64_t group_size() const { return w_.group_size; }
  bool has_offsets() const { return w_.offset != nullptr; }

  void unpack(int64_t n0, int64_t kt0, int64_t count, uint16_t* dst) const {
    const int rows = static_cast<int>(std::clamp<int64_t>(w_.n - n0, 0, kTileRows));
    // The loop's invariants in locals: read through w_ they were reloaded for every row (the stores to dst may
    // alias them as far as the compiler knows), which made this loop twice as long.
    const bool int4 = w_.bits == 4;
    const int64_t row_bytes = int4 ? w_.k / 2 : w_.k, tile_bytes = int4 ? kTileK / 2 : kTileK;
    const uint8_t* base = static_cast<const uint8_t*>(w_.q) + n0 * row_bytes;
    const __m512i table = table_, nibbles = _mm512_set1_epi32(0x000f000f);
    // The same bytes of the weight rows 32 on, prefetched while these are unpacked, once per 64-byte line: the
    // weights stream from memory in decode, and the hardware prefetchers do not follow 16 or 32 rows read a few
    // dozen bytes at a time. A prefetch past the weights is harmless (never faults).
    const int64_t ahead = 2 * kTileRows * row_bytes, tiles_per_line = 64 / tile_bytes;
    for (int64_t t = 0; t < count; ++t) {
      uint16_t* d = dst + t * kTileWords;
      const uint8_t* src = base + (kt0 + t) * tile_bytes;
      const bool prefetch = (kt0 + t) % tiles_per_line == 0;
      for (int r = 0; r < rows; ++r, src += row_bytes) {
        if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(src + ahead), _MM_HINT_T0);
        if (int4) {
          // byte j holds element 2j (low nibble) and 2j + 1 (high): one dword per byte, the codes in its two words
          const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
          const __m512i codes = _mm512_ternarylogic_epi32(b, _mm512_slli_epi32(b, 12), nibbles, 0xa8);  // (a | b) & c
          _mm512_storeu_si512(d + r * kTileK, _mm512_permutexvar_epi16(codes, table));
        } else {
          store_int8_codes(reinterpret_cast<const int8_t*>(src), d + r * kTileK);
        }
      }
      for (int r = rows; r < kTileRows; ++r) _mm512_storeu_si512(d + r * kTileK, _mm512_setzero_si512());  // past n
    }
  }

  void row_scales(int64_t row, int64_t g0, int64_t groups, float* scale, float* offset) const {
    const int64_t all = w_.k / w_.group_size;
    const auto mask = static_cast<__mmask16>((1u << groups) - 1u);
    _mm512_storeu_ps(scale, load_scales(w_.scale, w_.scale_type, row * all + g0, mask));
    if (w_.offset) _mm512_storeu_ps(offset, load_scales(w_.offset, w_.scale_type, row * all + g0, mask));
  }

 private:
  const QuantWeight& w_;
  __m512i table_;  // int4: bf16 of 0..15
};

// ggml blocks (kquant::Segment, the segments stacked along N) of the types amx_kquant_supports in groups of
// kGroupSize along K: 32 (each group one block of Q8_0 / Q5_0 / Q5_1 or one sub-block pair of a Q4_K / Q5_K
// super-block), or 16 for Q6_K, Q2_K and Q3_K (a scale, Q2_K also a min, per 16 weights; gemm_amx_kquant gives each run
// of segments of one group size its own GgmlCodes, though a type of groups of 32 also decodes correctly halved, each
// half with its group's scale). The (scale, offset) are ggml::sub_block_scale_with's, the
// reference dequantization's own fp32 numbers (d * sc, -(dmin * m): products of an fp16 and an integer of at most 8
// bits, exact in fp32); the codes (Q6_K q - 32 in -32..31, Q2_K 0..3, Q3_K -4..3) are exact in bf16. The group size is
// a template parameter, not a member: as a constant the tile loop's group arithmetic folds away (a runtime one made
// Q4_K's fp32 GEMM ~4% slower, 1 thread).
template <int64_t kGroupSize>
class GgmlCodes {
 public:
  GgmlCodes(const std::vector<kquant::Segment>& segs, int64_t k)
      : segs_(segs),
        k_(k),
        table_u_(bf16_integer_table(0)),
        table_q5_0_(bf16_integer_table(-16)),
        table_q6k_low_(bf16_integer_table(-32)),
        table_q3k_(bf16_integer_table(-4)) {
    for (const kquant::Segment& s : segs_) n_ += s.rows, offsets_ |= ggml::has_offset(s.type);
  }
  int64_t n() const { return n_; }
  int64_t k() const { return k_; }
  static constexpr int64_t group_size() { return kGroupSize; }
  bool has_offsets() const { return offsets_; }

  void unpack(int64_t n0, int64_t kt0, int64_t count, uint16_t* dst) const {
    const int rows = static_cast<int>(std::clamp<int64_t>(n_ - n0, 0, kTileRows));
    ggml::BlockType type[kTileRows];
    const uint8_t* row[kTileRows];
    for (int r = 0; r < rows; ++r) locate(n0 + r, &type[r], &row[r]);
    for (int64_t t = 0; t < count; ++t) {
      uint16_t* d = dst + t * kTileWords;
      for (int r = 0; r < rows; ++r) unpack_group(type[r], row[r], kt0 + t, d + r * kTileK);
      for (int r = rows; r < kTileRows; ++r) _mm512_storeu_si512(d + r * kTileK, _mm512_setzero_si512());  // past n
    }
  }

  void row_scales(int64_t row, int64_t g0, int64_t groups, float* scale, float* offset) const {
    ggml::BlockType t;
    const uint8_t* blocks;
    locate(row, &t, &blocks);
    const int bw = ggml::block_weights(t), bb = ggml::block_bytes(t);
    if (kGroupSize == ggml::kSubBlock && g0 % kScaleStride == 0 &&
        (t == ggml::BlockType::kQ6K || t == ggml::BlockType::kQ2K || t == ggml::BlockType::kQ3K)) {
      // a chunk's groups are (part of) one super-block's 16 sub-blocks: 16 scalar decodes per row and chunk were as
      // costly as the chunk's tile work at fp32 activations
      super_block_scales(t, blocks + g0 * kGroupSize / bw * bb, groups, scale, offset);
      return;
    }
    if (kGroupSize == kTileK && g0 % 8 == 0 && (t == ggml::BlockType::kQ4K || t == ggml::BlockType::kQ5K)) {
      // groups of 32 from a super-block boundary: 8 per super-block, decoded as lanes (the scalar decode per group,
      // chunk and pass cost about as much as Q6_K's did before its lanes)
      for (int64_t g = 0; g < kScaleStride; g += 8) {
        const int64_t live = std::clamp<int64_t>(groups - g, 0, 8);
        k_super_block_scales(blocks + (g0 + g) / 8 * bb, live, scale + g, offset + g);
      }
      return;
    }
    for (int64_t g = 0; g < kScaleStride; ++g) {
      float s = 0.f, o = 0.f;
      if (g < groups) {
        const int64_t e = (g0 + g) * kGroupSize;  // the group's first weight in the row
        // sub_block_scale_with counts sub-blocks of 16: the group's first
        ggml::sub_block_scale_with(t, blocks + e / bw * bb, static_cast<int>(e % bw / ggml::kSubBlock), &s, &o,
                                   [](const uint8_t* p) {
                                     uint16_t h;
                                     std::memcpy(&h, p, 2);
                                     return _cvtsh_ss(h);
                                   });
        if (!ggml::has_offset(t)) o = 0.f;  // -0.0 there: +0 adds the same
      }
      scale[g] = s;
      if (offsets_) offset[g] = o;
    }
  }

 private:
  // The (scale, offset) of the first `groups` sub-blocks of 16 of the super-block b of a Q6_K / Q2_K / Q3_K row as 16
  // lanes (zero past groups; offsets where has_offsets(), zero for Q6_K / Q3_K): sub_block_scale_with's products
  // (fp16 x an integer of at most 8 bits, exact in fp32; Q2_K's offset -(dmin * m) negated by its sign bit).
  void super_block_scales(ggml::BlockType t, const uint8_t* b, int64_t groups, float* scale, float* offset) const {
    using ggml::BlockType;
    const auto mask = static_cast<__mmask16>((1u << groups) - 1u);
    auto f16 = [](const uint8_t* p) {
      uint16_t h;
      std::memcpy(&h, p, 2);
      return _mm512_set1_ps(_cvtsh_ss(h));
    };
    __m512i sc, m = _mm512_setzero_si512();
    if (t == BlockType::kQ6K) {  // int8 scales at 192, d at 208
      sc = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, b + 192));
    } else if (t == BlockType::kQ2K) {  // byte j: scale in the low nibble, min in the high one; d at 80, dmin at 82
      const __m512i bytes = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, b));
      sc = _mm512_and_si512(bytes, _mm512_set1_epi32(0x0f));
      m = _mm512_srli_epi32(bytes, 4);
    } else {  // Q3_K, ggml::q3k_scale over 12 bytes at 96: low 4 bits s[j] (j < 8) or s[j - 8] >> 4, high 2 bits
              // s[8 + j % 4] >> 2 (j / 4); minus 32; d at 108
      const __m512i s12 = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(0x0fff, b + 96));
      const __m512i low_idx = _mm512_set_epi32(7, 6, 5, 4, 3, 2, 1, 0, 7, 6, 5, 4, 3, 2, 1, 0);
      const __m512i low_shift = _mm512_set_epi32(4, 4, 4, 4, 4, 4, 4, 4, 0, 0, 0, 0, 0, 0, 0, 0);
      const __m512i high_idx = _mm512_set_epi32(11, 10, 9, 8, 11, 10, 9, 8, 11, 10, 9, 8, 11, 10, 9, 8);
      const __m512i high_shift = _mm512_set_epi32(6, 6, 6, 6, 4, 4, 4, 4, 2, 2, 2, 2, 0, 0, 0, 0);
      const __m512i low =
          _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutexvar_epi32(low_idx, s12), low_shift), _mm512_set1_epi32(15));
      const __m512i high = _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutexvar_epi32(high_idx, s12), high_shift),
                                            _mm512_set1_epi32(3));
      sc = _mm512_maskz_sub_epi32(mask, _mm512_or_si512(low, _mm512_slli_epi32(high, 4)), _mm512_set1_epi32(32));
    }
    const int d_at = t == BlockType::kQ6K ? 208 : t == BlockType::kQ2K ? 80 : 108;
    _mm512_storeu_ps(scale, _mm512_mul_ps(f16(b + d_at), _mm512_cvtepi32_ps(sc)));
    if (!offsets_) return;
    __m512 o = _mm512_setzero_ps();
    if (t == BlockType::kQ2K) {
      const __m512 dm = _mm512_mul_ps(f16(b + 82), _mm512_cvtepi32_ps(m));
      o = _mm512_maskz_mov_ps(mask, _mm512_xor_ps(dm, _mm512_set1_ps(-0.f)));
    }
    _mm512_storeu_ps(offset, o);
  }

  // The (scale, offset) of the first `live` (0..8) groups of 32 of the Q4_K / Q5_K super-block b as 8 lanes (zero
  // past live): sub_block_scale_with's d * sc and -(dmin * m), ggml's 6-bit (scale, min) j of the 12 bytes q at 4:
  // j < 4: q[j] & 63, q[j + 4] & 63; else (q[j + 4] & 15) | (q[j - 4] >> 6) << 4, (q[j + 4] >> 4) | (q[j] >> 6) << 4.
  static void k_super_block_scales(const uint8_t* b, int64_t live, float* scale, float* offset) {
    const auto mask = static_cast<__mmask16>((1u << live) - 1u);
    auto f16 = [](const uint8_t* p) {
      uint16_t h;
      std::memcpy(&h, p, 2);
      return _mm512_set1_ps(_cvtsh_ss(h));
    };
    const __m512i q = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(0x0fff, b + 4));
    const __m512i a = _mm512_permutexvar_epi32(_mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 11, 10, 9, 8, 3, 2, 1, 0), q);
    const __m512i c = _mm512_permutexvar_epi32(_mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 3, 2, 1, 0, 7, 6, 5, 4), q);
    const __mmask16 upper = 0x00f0;  // j >= 4
    const __m512i m6 = _mm512_set1_epi32(63), m4 = _mm512_set1_epi32(15);
    // j < 4: a = q[j], c = q[j + 4]; j >= 4: a = q[j + 4], c = q[j - 4] (and q itself holds q[j])
    __m512i sc = _mm512_and_si512(a, m6);
    sc = _mm512_mask_or_epi32(sc, upper, _mm512_and_si512(a, m4), _mm512_slli_epi32(_mm512_srli_epi32(c, 6), 4));
    __m512i mn = _mm512_and_si512(c, m6);
    mn = _mm512_mask_or_epi32(mn, upper, _mm512_srli_epi32(a, 4), _mm512_slli_epi32(_mm512_srli_epi32(q, 6), 4));
    const __m512 s = _mm512_maskz_mul_ps(mask, f16(b), _mm512_cvtepi32_ps(sc));
    const __m512 o = _mm512_maskz_mov_ps(
        mask, _mm512_xor_ps(_mm512_mul_ps(f16(b + 2), _mm512_cvtepi32_ps(mn)), _mm512_set1_ps(-0.f)));
    _mm256_storeu_ps(scale, _mm512_castps512_ps256(s));
    _mm256_storeu_ps(offset, _mm512_castps512_ps256(o));
  }

  // The segment type and first block of weight row `row` (< n).
  void locate(int64_t row, ggml::BlockType* t, const uint8_t** blocks) const {
    for (const kquant::Segment& s : segs_) {
      if (row < s.rows) {
        *t = s.type;
        *blocks = s.blocks + row * kquant::row_bytes(s.type, k_);
        return;
      }
      row -= s.rows;
    }
  }

  // The 32 codes of K tile g (weights [32 g, 32 g + 32)) of a row at `blocks` as bf16 at dst.
  void unpack_group(ggml::BlockType t, const uint8_t* blocks, int64_t g, uint16_t* dst) const {
    using ggml::BlockType;
    switch (t) {
      case BlockType::kQ6K: {
        // per half h of the super-block (128 weights), ql[64] then (after both halves' ql) qh[32]: its quarter q
        // (32 weights) has the low 4 bits in ql[32 (q % 2) + l] (low nibbles for q < 2, high ones after) and the
        // high 2 in bits 2q, 2q + 1 of qh[l]; the code is (low | high << 4) - 32
        const uint8_t* b = blocks + g / 8 * ggml::block_bytes(t);
        const int j = static_cast<int>(g % 8), h = j / 4, q = j % 4;
        const __m512i ql =
            _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64 * h + 32 * (q % 2))));
        const __m512i qh = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * h)));
        const __m512i low = _mm512_and_si512(_mm512_srli_epi16(ql, 4 * (q / 2)), _mm512_set1_epi16(0x0f));
        const __m512i high = _mm512_and_si512(_mm512_srli_epi16(qh, 2 * q), _mm512_set1_epi16(3));
        const __m512i codes = _mm512_or_si512(low, _mm512_slli_epi16(high, 4));  // 0..63: bit 5 picks the table
        return _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(table_q6k_low_, codes, table_u_));
      }
      case BlockType::kQ2K:
      case BlockType::kQ3K: {
        // per half h (128 weights), 32 bytes of 2-bit codes (Q2_K from byte 16, Q3_K from 32): quarter q of the
        // half in bits 2q, 2q + 1 of byte l. Q3_K's 3rd bit of weight 32 j + l is bit j of hmask[l] (its first 32
        // bytes), the code (low | bit << 2) - 4, by a table of -4..
        const uint8_t* b = blocks + g / 8 * ggml::block_bytes(t);
        const int j = static_cast<int>(g % 8), h = j / 4, q = j % 4;
        const bool q3 = t == BlockType::kQ3K;
        const __m512i bytes =
            _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + (q3 ? 32 : 16) + 32 * h)));
        __m512i codes = _mm512_and_si512(_mm512_srli_epi16(bytes, 2 * q), _mm512_set1_epi16(3));
        if (!q3) return _mm512_storeu_si512(dst, _mm512_permutexvar_epi16(codes, table_u_));
        const __m256i hmask = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
        const __mmask32 high = _mm256_test_epi8_mask(hmask, _mm256_set1_epi8(static_cast<char>(1 << j)));
        codes = _mm512_mask_add_epi16(codes, high, codes, _mm512_set1_epi16(4));  // codes < 4: + is |
        return _mm512_storeu_si512(dst, _mm512_permutexvar_epi16(codes, table_q3k_));
      }
      case BlockType::kQ8_0:  // d, then the 32 int8 codes in order
        return store_int8_codes(reinterpret_cast<const int8_t*>(blocks + g * 34 + 2), dst);
      case BlockType::kQ4K:
      case BlockType::kQ5K: {
        // per 64-weight chunk c of the super-block, 32 qs bytes: low nibbles weights 0..31, high ones 32..63; Q5_K's
        // 5th bit of the super-block's group j (0..7) is bit j of qh[l]
        const uint8_t* b = blocks + g / 8 * ggml::block_bytes(t);
        const int j = static_cast<int>(g % 8);
        const uint8_t* qs = b + (t == BlockType::kQ4K ? 16 : 48) + 32 * (j / 2);
        __m512i codes = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs)));
        codes = _mm512_and_si512(_mm512_srli_epi16(codes, 4 * (j % 2)), _mm512_set1_epi16(0x0f));
        if (t == BlockType::kQ5K) {
          const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16));
          const __mmask32 high = _mm256_test_epi8_mask(qh, _mm256_set1_epi8(static_cast<char>(1 << j)));
          codes = _mm512_mask_add_epi16(codes, high, codes, _mm512_set1_epi16(16));  // codes < 16: + is |
        }
        return _mm512_storeu_si512(dst, _mm512_permutexvar_epi16(codes, table_u_));
      }
      default: {  // Q5_0 / Q5_1: [d (, m)], qh (bit e: weight e's 5th bit), qs[16]: low nibbles weights 0..15, high
                  // 16..31; Q5_0's code is q - 16
        const int start = t == BlockType::kQ5_0 ? 2 : 4;
        const uint8_t* b = blocks + g * ggml::block_bytes(t);
        const __m256i q = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + start + 4)));
        __m512i codes = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(q, _mm256_set1_epi16(0x0f))),
                                           _mm256_srli_epi16(q, 4), 1);
        uint32_t qh;
        std::memcpy(&qh, b + start, 4);
        codes = _mm512_mask_add_epi16(codes, static_cast<__mmask32>(qh), codes, _mm512_set1_epi16(16));
        return _mm512_storeu_si512(dst,
                                   _mm512_permutexvar_epi16(codes, t == BlockType::kQ5_0 ? table_q5_0_ : table_u_));
      }
    }
  }

  const std::vector<kquant::Segment>& segs_;
  int64_t k_, n_ = 0;
  bool offsets_ = false;
  __m512i table_u_, table_q5_0_, table_q6k_low_, table_q3k_;  // bf16 of 0..31, -16..15, -32..-1, -4..27
};

// What one group's step needs: a chunk of unpacked weight codes, a 16-row block of packed activations, the chunk's
// scales / offsets, the block's sums and row scalings, and its fp32 accumulators.
struct GroupArgs {
  const uint16_t* codes;  // [2][count][16][32]
  const uint32_t* b;      // the block's first tile of the chunk: [count][digits][16][16]
  int64_t count, group_size;
  int digits;
  const float* scales;   // [32 weight rows][kScaleStride groups]
  const float* offsets;  // same, or nullptr
  const float* sums;     // [chunk groups][16]
  const float* unscale;  // [16], or nullptr when no row of the block is scaled
  float* acc;            // [32 weight rows][16]
};

// Group g's sums of codes x activations for both weight blocks into tiles C0, C1 (tmm0-1 or tmm2-3), A in tmm4-5,
// B in tmm6-7 (the digits alternate), then stored to c [32][16]. A macro: the tile intrinsics take their register
// numbers as literals.
#define LF_GROUP_PRODUCTS(name, C0, C1)                                      \
  inline void name(const GroupArgs& ga, int64_t g, float (*c)[kTileRows]) {  \
    _tile_zero(C0);                                                          \
    _tile_zero(C1);                                                          \
    const GroupSteps st = group_steps(g, ga.group_size);                     \
    for (int64_t t = st.first_tile; t < st.first_tile + st.tiles; ++t) {     \
      const uint16_t* a = ga.codes + t * kTileWords + st.a_words;            \
      _tile_loadd(4, a, 64);                                                 \
      _tile_loadd(5, a + ga.count * kTileWords, 64);                         \
      const uint32_t* bt = ga.b + t * ga.digits * kTileDwords + st.b_dwords; \
      _tile_loadd(6, bt, 64);                                                \
      _tile_dpbf16ps(C0, 4, 6);                                              \
      _tile_dpbf16ps(C1, 5, 6);                                              \
      if (ga.digits == 3) {                                                  \
        _tile_loadd(7, bt + kTileDwords, 64);                                \
        _tile_dpbf16ps(C0, 4, 7);                                            \
        _tile_dpbf16ps(C1, 5, 7);                                            \
        _tile_loadd(6, bt + 2 * kTileDwords, 64);                            \
        _tile_dpbf16ps(C0, 4, 6);                                            \
        _tile_dpbf16ps(C1, 5, 6);                                            \
      }                                                                      \
    }                                                                        \
    _tile_stored(C0, c[0], 64);                                              \
    _tile_stored(C1, c[kTileRows], 64);                                      \
  }
LF_GROUP_PRODUCTS(group_products_even, 0, 1)
LF_GROUP_PRODUCTS(group_products_odd, 2, 3)
#undef LF_GROUP_PRODUCTS

// acc += scale * C_g (* unscale) + offset * sums_g, per weight row (a broadcast) over the 16 activation rows.
inline void group_epilogue(const GroupArgs& ga, int64_t g, const float (*c)[kTileRows]) {
  const __m512 xsum = _mm512_loadu_ps(ga.sums + g * kTileRows);
  const __m512 unscale = ga.unscale ? _mm512_loadu_ps(ga.unscale) : _mm512_set1_ps(1.f);
  for (int r = 0; r < 2 * kTileRows; ++r) {
    __m512 cv = _mm512_load_ps(c[r]);
    if (ga.unscale) cv = _mm512_mul_ps(cv, unscale);
    __m512 av =
        _mm512_fmadd_ps(_mm512_set1_ps(ga.scales[r * kScaleStride + g]), cv, _mm512_loadu_ps(ga.acc + r * kTileRows));
    if (ga.offsets) av = _mm512_fmadd_ps(_mm512_set1_ps(ga.offsets[r * kScaleStride + g]), xsum, av);
    _mm512_storeu_ps(ga.acc + r * kTileRows, av);
  }
}

// ---- Few activation rows (m <= kSmallMRows = 8, decode batches): one 16-row weight block at a time ----
//
// With a few activation rows the general loop above is mostly overhead: per group it unpacks 32 weight rows, reads
// 32 accumulator rows back from memory and writes them again, and its B / C tiles carry 16 activation rows when
// the batch has 8 or fewer. Here each thread runs whole 16-row weight blocks over all of K, the activations being
// the same for every block: per group it multiplies the block's codes (one A tile per 32 K) by the group's digits
// into one C tile, and adds scale * C_g + offset * sum_g(x) into 16 vector registers of `lanes` fp32 (one per
// weight row, a lane per activation row), written to out once at the end (no read-modify-write per group).
//
// Layouts of the B tiles (SmallMLayout), the activation rows in their columns:
// - kSplit (bf16 activations, one digit): 8 columns, the packed tiles as they are (8 of their 16 columns read);
// - kFolded8 (fp32, m <= 8): digits hi and mid side by side in one tile (columns 0-7 and 8-15), lo in a second one
//   (columns 0-7): 2 tile multiplies per 32 K instead of 3; the epilogue adds C's two halves;
// - kFolded4 (fp32, m <= 4): the three digits in columns 0-3, 4-7, 8-11 of one tile: 1 multiply per 32 K; the
//   epilogue adds C's three quarters.
// A folded C holds each digit's part of codes . x (exact products summed in fp32 by the tile unit) and the epilogue
// adds the parts in fp32: the same exact products summed in another order than the split tiles' single sum, the
// same accuracy. (The tile multiply costs the same whatever the columns used: 5 ns per 16 x 16 x 32 here.)
//
// Tiles: C 0-1 and A 2-3 alternate by group parity (one group's multiplies may start while the other's C is being
// stored and read), B 4-6.
enum class SmallMLayout { kSplit, kFolded8, kFolded4 };

void configure_small_m_tiles(int b_colsb, int64_t group_size) {
  amx::TileConfig cfg = amx::full_tiles();
  for (int t : {0, 1, 4, 5, 6}) cfg.colsb[t] = static_cast<uint16_t>(b_colsb);  // C and B
  set_group_shapes(cfg, group_size, {2, 3}, {4, 5, 6});
  amx::load_tile_config(cfg);
}

// One weight row's sums over `lanes` activation rows: fp32 x 4 (xmm) or 8 (ymm).
template <int kLanes>
struct ColumnVector;
template <>
struct ColumnVector<4> {
  using V = __m128;
  static V zero() { return _mm_setzero_ps(); }
  static V load(const float* p) { return _mm_loadu_ps(p); }
  static V add(V a, V b) { return _mm_add_ps(a, b); }
  static V fma(float a, V b, V c) { return _mm_fmadd_ps(_mm_set1_ps(a), b, c); }
  static void store(float* p, V v) { _mm_storeu_ps(p, v); }
};
template <>
struct ColumnVector<8> {
  using V = __m256;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V fma(float a, V b, V c) { return _mm256_fmadd_ps(_mm256_set1_ps(a), b, c); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
};

// What a layout means for the loop: lanes of the accumulators, B tiles per 32 K, bytes per B / C tile row (the C
// tile is stored with that stride), and how a weight row's group sums come out of its C row.
template <SmallMLayout kLayout>
struct SmallMShape {
  static constexpr int kLanes = kLayout == SmallMLayout::kFolded4 ? 4 : 8;
  static constexpr int kColsb = kLayout == SmallMLayout::kSplit ? 4 * kLanes : 64;
  static typename ColumnVector<kLanes>::V row_sums(const float* c) {
    using CV = ColumnVector<kLanes>;
    if constexpr (kLayout == SmallMLayout::kFolded8)
      return CV::add(CV::load(c), CV::load(c + 8));
    else if constexpr (kLayout == SmallMLayout::kFolded4)
      return CV::add(CV::add(CV::load(c), CV::load(c + 4)), CV::load(c + 8));
    else
      return CV::load(c);
  }
};

// Group g's products codes x B into tile C (codes in tile A), left in the tile (stored by the loop).
#define LF_SMALL_M_PRODUCTS(name, C, A)                                                   \
  inline void name(const uint16_t* codes, const uint32_t* b, int64_t tiles, int btiles) { \
    _tile_zero(C);                                                                        \
    for (int64_t t = 0; t < tiles; ++t) {                                                 \
      _tile_loadd(A, codes + t * kTileWords, 64);                                         \
      const uint32_t* bt = b + t * btiles * kTileDwords;                                  \
      _tile_loadd(4, bt, 64);                                                             \
      _tile_dpbf16ps(C, A, 4);                                                            \
      if (btiles >= 2) {                                                                  \
        _tile_loadd(5, bt + kTileDwords, 64);                                             \
        _tile_dpbf16ps(C, A, 5);                                                          \
      }                                                                                   \
      if (btiles == 3) {                                                                  \
        _tile_loadd(6, bt + 2 * kTileDwords, 64);                                         \
        _tile_dpbf16ps(C, A, 6);                                                          \
      }                                                                                   \
    }                                                                                     \
  }
LF_SMALL_M_PRODUCTS(small_m_products_even, 0, 2)
LF_SMALL_M_PRODUCTS(small_m_products_odd, 1, 3)
#undef LF_SMALL_M_PRODUCTS

// Activation rows up to which gemm_amx_quant_t takes the small-m loop. From 9 to 16 rows (C and B tiles 16 wide,
// each digit its own tile) it measured no faster than the general loop (1 thread, SmolLM2's shapes and 2048^2,
// int4: 51-69 against 61-76 G multiply-adds/s, a loaded machine), so those keep the general loop.
constexpr int64_t kSmallMRows = 8;

// Groups unpacked at a time, a batch ahead of their multiplies (see small_m_block).
constexpr int64_t kSmallMUnpackGroups = 8;

// The B tiles of the small-m loop: [ktiles][btiles][16 K pairs][16 columns] (dwords: bf16 pairs).
struct SmallMTiles {
  const uint32_t* tiles;
  int btiles;
};

// Weight rows [n0, n0 + 16) x all m (<= lanes) activation rows, over all of K, into result[16 weight rows][lanes].
// scales / offsets: [16][groups rounded up to kScaleStride] per thread; codes: [2][kSmallMUnpackGroups][tiles per
// group][16][32]; sums: the activations' [groups][16].
//
// Each step waits on nothing recent: a tile load of codes just written by vector stores, or a vector load of a C
// just written by a tile store, stalls until those stores have drained (profile: a third of the time when each
// group unpacked, multiplied, stored and read its C in turn). So the codes are unpacked a batch of
// kSmallMUnpackGroups groups ahead (two halves of a ring), and in step g the multiplies of group g are issued, then
// group g - 1's C tile (finished meanwhile) is stored, then group g - 2's stored C goes through the epilogue.
template <typename Shape, typename Weights>
void small_m_block(const Weights& w, const SmallMTiles& b, const float* sums, int64_t groups, int64_t n0, float* scales,
                   float* offsets, uint16_t* codes, float* result) {
  constexpr int kLanes = Shape::kLanes, kCStride = Shape::kColsb / 4;
  using CV = ColumnVector<kLanes>;
  const int64_t gs = w.group_size();
  const int64_t stride = (groups + kScaleStride - 1) / kScaleStride * kScaleStride;
  const bool with_offsets = w.has_offsets();
  for (int r = 0; r < kTileRows; ++r) {
    float* sr = scales + r * stride;
    float* orow = offsets + r * stride;
    if (n0 + r >= w.n()) {  // past n: zero
      std::fill(sr, sr + stride, 0.f);
      std::fill(orow, orow + stride, 0.f);
      continue;
    }
    for (int64_t g0 = 0; g0 < groups; g0 += kScaleStride)
      w.row_scales(n0 + r, g0, std::min(kScaleStride, groups - g0), sr + g0, orow + g0);
  }
  alignas(64) float c[3][kTileRows * kCStride];  // stored C tiles, by group mod 3
  typename CV::V acc[kTileRows];
  for (int r = 0; r < kTileRows; ++r) acc[r] = CV::zero();
  // acc += scale * C_g + offset * sums_g, as group_epilogue (the same two fmas per element, in the same order)
  auto epilogue = [&](int64_t g) {
    const float* cg = c[g % 3];
    const typename CV::V xsum = CV::load(sums + g * kTileRows);
#pragma GCC unroll 16
    for (int r = 0; r < kTileRows; ++r) {
      acc[r] = CV::fma(scales[r * stride + g], Shape::row_sums(cg + r * kCStride), acc[r]);
      if (with_offsets) acc[r] = CV::fma(offsets[r * stride + g], xsum, acc[r]);
    }
  };
  // a batch is whole K tiles (groups of 16: an even number of them, groups being a multiple of 16)
  const int64_t batch_words = kSmallMUnpackGroups * gs * kTileRows;
  auto unpack_batch = [&](int64_t g0) {  // groups [g0, g0 + kSmallMUnpackGroups) into their half of the ring
    const int64_t count = std::min(kSmallMUnpackGroups, groups - g0) * gs / kTileK;
    w.unpack(n0, g0 * gs / kTileK, count, codes + (g0 / kSmallMUnpackGroups % 2) * batch_words);
  };
  unpack_batch(0);
  for (int64_t g = 0; g < groups + 2; ++g) {
    if (g < groups) {
      if (g % kSmallMUnpackGroups == 0 && g + kSmallMUnpackGroups < groups) unpack_batch(g + kSmallMUnpackGroups);
      const GroupSteps in_batch = group_steps(g % kSmallMUnpackGroups, gs), st = group_steps(g, gs);
      const uint16_t* cg =
          codes + (g / kSmallMUnpackGroups % 2) * batch_words + in_batch.first_tile * kTileWords + in_batch.a_words;
      const uint32_t* bg = b.tiles + st.first_tile * b.btiles * kTileDwords + st.b_dwords;
      if (g % 2 == 0)
        small_m_products_even(cg, bg, st.tiles, b.btiles);
      else
        small_m_products_odd(cg, bg, st.tiles, b.btiles);
    }
    if (g >= 1 && g <= groups) {  // group g - 1's C
      if ((g - 1) % 2 == 0)
        _tile_stored(0, c[(g - 1) % 3], Shape::kColsb);
      else
        _tile_stored(1, c[(g - 1) % 3], Shape::kColsb);
    }
    if (g >= 2) epilogue(g - 2);
  }
  for (int r = 0; r < kTileRows; ++r) CV::store(result + r * kLanes, acc[r]);
}

// The folded B tiles (kFolded8 / kFolded4) from the packed digit tiles: per K tile and K pair, digit d's first
// `slot` columns at columns d * slot of tile d * slot / 16, the rest zero.
void fold_digits(const PackedActivations& p, int slot, std::vector<uint32_t>& folded) {
  const int btiles = slot == 4 ? 1 : 2;
  folded.assign(static_cast<size_t>(p.ktiles * btiles * kTileDwords), 0u);
  for (int64_t kt = 0; kt < p.ktiles; ++kt)
    for (int d = 0; d < 3; ++d) {
      const uint32_t* src = p.tiles + (kt * 3 + d) * kTileDwords;
      uint32_t* dst = folded.data() + (kt * btiles + d * slot / kTileRows) * kTileDwords + d * slot % kTileRows;
      for (int pr = 0; pr < kTileRows; ++pr) std::memcpy(dst + pr * kTileRows, src + pr * kTileRows, slot * 4);
    }
}

// out[m, n] for m <= 16 unscaled activation rows (p: one block) by small_m_block in `Shape`; To: out / bias.
template <typename Shape, typename To, typename Weights>
void gemm_small_m(const Weights& w, const PackedActivations& p, const SmallMTiles& b, const To* bias, To* out,
                  int64_t m) {
  constexpr int kLanes = Shape::kLanes;
  const int64_t n = w.n(), nblocks = (n + kTileRows - 1) / kTileRows;
  const int64_t stride = (p.groups + kScaleStride - 1) / kScaleStride * kScaleStride;
  const int64_t group_words = w.group_size() * kTileRows;
  parallel_for(nblocks, (nblocks + num_threads() - 1) / num_threads(), [&](int64_t b0, int64_t b1) {
    configure_small_m_tiles(Shape::kColsb, w.group_size());
    thread_local std::vector<float> scales, offsets;
    thread_local std::vector<uint16_t> codes;
    scales.resize(static_cast<size_t>(kTileRows * stride));
    offsets.resize(static_cast<size_t>(kTileRows * stride));
    codes.resize(static_cast<size_t>(2 * kSmallMUnpackGroups * group_words));
    alignas(64) float result[kTileRows * kLanes];
    for (int64_t nb = b0; nb < b1; ++nb) {
      const int64_t n0 = nb * kTileRows;
      small_m_block<Shape>(w, b, p.sums, p.groups, n0, scales.data(), offsets.data(), codes.data(), result);
      const int cols = static_cast<int>(std::min<int64_t>(kTileRows, n - n0));
      for (int64_t i = 0; i < m; ++i)
        for (int r = 0; r < cols; ++r) {
          float v = result[r * kLanes + i];
          if constexpr (std::is_same_v<To, float>) {
            if (bias != nullptr) v += bias[n0 + r];
            out[i * n + n0 + r] = v;
          } else {
            if (bias != nullptr) v += bf16_bits_to_float(bias[n0 + r]);
            out[i * n + n0 + r] = float_to_bf16_bits(v);
          }
        }
    }
    _tile_release();
  });
}

// The small-m loop for p's m (<= kSmallMRows) rows, one unscaled block: the cheapest layout that holds them.
template <typename To, typename Weights>
void gemm_small_m(const Weights& w, const PackedActivations& p, const To* bias, To* out, int64_t m) {
  thread_local std::vector<uint32_t> folded;  // the calling thread's; the pool's threads get the pointer
  if (p.digits == 3 && m <= 4) {
    fold_digits(p, 4, folded);
    gemm_small_m<SmallMShape<SmallMLayout::kFolded4>>(w, p, SmallMTiles{folded.data(), 1}, bias, out, m);
  } else if (p.digits == 3) {
    fold_digits(p, 8, folded);
    gemm_small_m<SmallMShape<SmallMLayout::kFolded8>>(w, p, SmallMTiles{folded.data(), 2}, bias, out, m);
  } else {
    gemm_small_m<SmallMShape<SmallMLayout::kSplit>>(w, p, SmallMTiles{p.tiles, p.digits}, bias, out, m);
  }
}

// 16-row activation blocks per pass over the weights: as many as fit half of L2 (every pair of weight blocks re-reads
// the pass's packed activations), but at least kMinPassBlocks (128 rows). Each pass unpacks every weight code and
// scale again, which for one block costs more than its tile products: half of L2 (2 MiB per core here) is 1 block at
// K = 8192 and 5 at K = 2048 with fp32 activations (3 digits), and the 1B model's Q4_K down projection [2048, 8192]
// ran at 42 G multiply-adds/s at 128 rows against 78 with all 8 blocks in one pass (1 thread, CPU time, Xeon with
// AMX, a loaded machine); at 512 rows 1 / 8 / 16 / 32 blocks per pass gave 38 / 70 / 78 / 83 (down) and 37 / 76 /
// 75 / 82 (o_proj, K = 2048). But where the L2 rule gives more (SmolLM2: K = 576 and 1536, small weights that
// re-unpack cheaply), passes of 32 blocks re-reading their activations from L3 made the int4 model's 512-token
// prefill ~10% slower than the L2 rule (613-622 against 679-680 tok/s, 1 thread, alternated).
constexpr int64_t kMinPassBlocks = 8;

int64_t pass_blocks(int64_t k, int digits) {
  const int64_t l2 = tuning().l2_bytes > 0 ? tuning().l2_bytes : (1 << 20);
  return std::max<int64_t>(kMinPassBlocks, l2 / 2 / (k * digits * 2 * kTileRows));
}

// x: fp32 or bf16 (T); bias / out: To; Weights: QuantCodes or GgmlCodes.
template <typename T, typename To, typename Weights>
bool gemm_amx_quant_t(const T* x, const Weights& w, const To* bias, To* out, int64_t m) {
  const int64_t k = w.k(), n = w.n(), gs = w.group_size();
  const int64_t ktiles = k / kTileK, groups = k / gs;
  const int64_t mblocks = (m + kTileRows - 1) / kTileRows, npairs = (n + 2 * kTileRows - 1) / (2 * kTileRows);
  const int digits = std::is_same_v<T, float> ? 3 : 1;
  // Per call, in the calling thread (grown, reused); the pool's threads get the pointers, never these names.
  thread_local std::vector<uint32_t> tiles;
  thread_local std::vector<float> sums, unscale;
  thread_local std::vector<uint8_t> flags;
  tiles.resize(static_cast<size_t>(mblocks * ktiles * digits * kTileDwords));
  sums.resize(static_cast<size_t>(mblocks * groups * kTileRows));
  unscale.resize(static_cast<size_t>(mblocks * kTileRows));
  flags.assign(static_cast<size_t>(2 * mblocks), 0);
  const PackedActivations p{tiles.data(),           sums.data(), unscale.data(), flags.data(),
                            flags.data() + mblocks, digits,      ktiles,         groups};
  parallel_for(mblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t mb = b0; mb < b1; ++mb) p.invalid[mb] = !pack_activation_block(x, m, k, gs, mb, p);
  });
  for (int64_t mb = 0; mb < mblocks; ++mb)
    if (p.invalid[mb]) return false;
  if (m <= kSmallMRows && !p.scaled[0]) {  // few rows (decode), none tiny or huge
    gemm_small_m(w, p, bias, out, m);
    return true;
  }

  const int64_t kc = std::min(k, k_chunk(gs)), per_thread = (npairs + num_threads() - 1) / num_threads();
  // Passes over the weights (pass_blocks): every pair of weight blocks re-reads the pass's packed activations, and
  // every pass unpacks the weights' codes and scales again.
  const int64_t pass = pass_blocks(k, digits);
  for (int64_t mb0 = 0; mb0 < mblocks; mb0 += pass) {
    const int64_t mb1 = std::min(mblocks, mb0 + pass);
    parallel_for(npairs, per_thread, [&](int64_t q0, int64_t q1) {
      configure_group_tiles(gs);
      thread_local std::vector<uint16_t> codes;  // [2][kc / 32][16][32]: this thread's
      thread_local std::vector<float> acc;       // [mb1 - mb0][2][16][16]
      codes.resize(static_cast<size_t>(2 * kc * kTileRows));
      acc.resize(static_cast<size_t>((mb1 - mb0) * 2 * kTileDwords));
      alignas(64) float scales[2 * kTileRows * kScaleStride], offsets[2 * kTileRows * kScaleStride];  // [row][group]
      alignas(64) float c[2][2 * kTileRows][kTileRows];  // two groups' sums: [parity][32 weight rows][16]
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t n0 = q * 2 * kTileRows;
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t k0 = 0; k0 < k; k0 += kc) {
          const int64_t len = std::min(kc, k - k0), kt0 = k0 / kTileK, count = len / kTileK, g0 = k0 / gs;
          const int64_t chunk_groups = len / gs;
          for (int j = 0; j < 2; ++j) w.unpack(n0 + j * kTileRows, kt0, count, codes.data() + j * count * kTileWords);
          for (int r = 0; r < 2 * kTileRows; ++r) {
            float* sr = scales + r * kScaleStride;
            float* orow = offsets + r * kScaleStride;
            if (n0 + r < n) {
              w.row_scales(n0 + r, g0, chunk_groups, sr, orow);
            } else {  // past n: zero
              std::fill(sr, sr + kScaleStride, 0.f);
              std::fill(orow, orow + kScaleStride, 0.f);
            }
          }
          for (int64_t mb = mb0; mb < mb1; ++mb) {
            const GroupArgs ga{codes.data(),
                               p.tiles + (mb * ktiles + kt0) * digits * kTileDwords,
                               count,
                               gs,
                               digits,
                               scales,
                               w.has_offsets() ? offsets : nullptr,
                               p.sums + (mb * groups + g0) * kTileRows,
                               p.scaled[mb] ? p.unscale + mb * kTileRows : nullptr,
                               acc.data() + (mb - mb0) * 2 * kTileDwords};
            // software-pipelined: group g's tile products (tiles 0-1 or 2-3 by parity) are issued before group
            // g - 1's sums are read back, so that its tile store has completed by then
            for (int64_t g = 0; g < chunk_groups; ++g) {
              if (g % 2 == 0)
                group_products_even(ga, g, c[0]);
              else
                group_products_odd(ga, g, c[1]);
              if (g > 0) group_epilogue(ga, g - 1, c[(g - 1) % 2]);
            }
            group_epilogue(ga, chunk_groups - 1, c[(chunk_groups - 1) % 2]);
          }
        }
        write_output(acc.data(), bias, out, m, n, n0, mb0, mb1);
      }
      _tile_release();
    });
  }
  return true;
}

}  // namespace

bool gemm_amx_quant(bool bf16, const void* x, const QuantWeight& w, const void* bias, void* out, int64_t m) {
  if (!amx_quant_supports(w)) return false;
  if (m <= 0 || w.n <= 0) return true;
  const QuantCodes codes(w);
  if (bf16)
    return gemm_amx_quant_t(static_cast<const uint16_t*>(x), codes, static_cast<const uint16_t*>(bias),
                            static_cast<uint16_t*>(out), m);
  return gemm_amx_quant_t(static_cast<const float*>(x), codes, static_cast<const float*>(bias),
                          static_cast<float*>(out), m);
}

namespace {

template <int64_t kGroupSize>
bool gemm_ggml_codes(bool bf16, const void* x, int64_t m, const std::vector<kquant::Segment>& segs, int64_t k,
                     float* out) {
  const GgmlCodes<kGroupSize> codes(segs, k);
  if (m <= 0 || codes.n() <= 0) return true;
  if (bf16) return gemm_amx_quant_t(static_cast<const uint16_t*>(x), codes, static_cast<const float*>(nullptr), out, m);
  return gemm_amx_quant_t(static_cast<const float*>(x), codes, static_cast<const float*>(nullptr), out, m);
}

// Q6_K / Q2_K / Q3_K: a scale per 16 weights, so GgmlCodes<16> (half K tiles); the others take groups of 32.
bool groups_of_16(const kquant::Segment& s) {
  return s.type == ggml::BlockType::kQ6K || s.type == ggml::BlockType::kQ2K || s.type == ggml::BlockType::kQ3K;
}

bool gemm_ggml_run(bool bf16, const void* x, int64_t m, const std::vector<kquant::Segment>& segs, int64_t k,
                   float* out) {
  return groups_of_16(segs.front()) ? gemm_ggml_codes<ggml::kSubBlock>(bf16, x, m, segs, k, out)
                                    : gemm_ggml_codes<kTileK>(bf16, x, m, segs, k, out);
}

}  // namespace

// Each run of consecutive segments with the same group size is its own GEMM (into a buffer, then copied to its
// columns of out): running a whole list in groups of 16 when one segment needs them (Q4_K_M's fused q/k/v with v in
// Q6_K) ran its Q4_K rows on half K tiles too, 7.3 ms against 4.0 for the same rows all Q4_K (1B shapes, 128 rows,
// 2 threads). The activations are packed once per run: a small cost next to the run's tile products.
bool gemm_amx_kquant(bool bf16, const void* x, int64_t m, const std::vector<kquant::Segment>& segs, int64_t k,
                     float* out) {
  if (!amx_kquant_supports(segs, k)) return false;
  const bool one_run = std::all_of(segs.begin(), segs.end(),
                                   [&](const kquant::Segment& s) { return groups_of_16(s) == groups_of_16(segs[0]); });
  if (one_run || m <= 0) return gemm_ggml_run(bf16, x, m, segs, k, out);
  int64_t n = 0;
  for (const kquant::Segment& s : segs) n += s.rows;
  std::vector<float> part;
  int64_t col = 0;
  for (size_t first = 0; first < segs.size();) {
    size_t last = first + 1;
    while (last < segs.size() && groups_of_16(segs[last]) == groups_of_16(segs[first])) ++last;
    const std::vector<kquant::Segment> run(segs.begin() + first, segs.begin() + last);
    int64_t rows = 0;
    for (const kquant::Segment& s : run) rows += s.rows;
    part.resize(static_cast<size_t>(m * rows));
    // inf / NaN: the first run finds them (they depend on x alone) before anything is written to out
    if (!gemm_ggml_run(bf16, x, m, run, k, part.data())) return false;
    for (int64_t i = 0; i < m; ++i) std::memcpy(out + i * n + col, part.data() + i * rows, rows * sizeof(float));
    col += rows;
    first = last;
  }
  return true;
}

#pragma GCC diagnostic pop
#pragma GCC pop_options

#else  // not x86-64 Linux: never called (amx_bf16_available() is false)

bool gemm_amx_quant(bool, const void*, const QuantWeight&, const void*, void*, int64_t) { return false; }
bool gemm_amx_kquant(bool, const void*, int64_t, const std::vector<kquant::Segment>&, int64_t, float*) { return false; }

#endif

}  // namespace cpu
}  // namespace llama_fast
