// The ggml block GEMV (kquant_linear.cpp) in fp32 FMAs, for x86 cores with AVX2 but no VNNI of either kind (Zen 1-3,
// Haswell..Skylake client): Q8_0, Q5_0, Q5_1, Q4_K and Q6_K.
//
// Why a second AVX2 kernel: kquant_linear_avx2.cpp carries each activation as two 15-bit integer limbs and does
// the VNNI kernels' integer work on 256-bit vectors. Without vpdpwssd every 16 weights cost a widening, the code
// unpacking in int16, a vpmullw by the sub-block scale and two vpmaddwd + vpaddd (one per limb); on Zen 3 that
// work, not the memory, bounded decode (one thread, in cache: q8_0 10.3 GB/s of stored bytes, q4_k 5.8, q5_0 4.6).
// Here the activations stay fp32 (no preparation and no rounding: the reference's own semantics, the exact
// dequantized weight times fp32 activations) and per 32 weights (a chunk) the codes become four vectors of 8
// fp32 values (vcvtdq2ps: codes are small integers, exact), dotted with the activations by one vmulps and three
// FMAs into a chunk sum; one FMA of that sum with the chunk's fp32 scale (d, or d * sc_j: an fp16 times an
// integer of at most 8 bits, exact) goes into one of two accumulators per activation row (FMA latency).
// Getting the codes into int32 lanes is the cost that matters (G weights/s, one Zen 3 core, rows in L2):
//  - Q8_0: vpmovsxbd straight from the block, 8 codes each (14.6 against the integer kernel's 10.5);
//  - Q4_K: vpmovzxbd of 8 qs bytes, masked for the low nibbles (sub-block 2p) and shifted for the high ones
//    (2p + 1): 16 weights per widening (12.5 against 11.3);
//  - Q5_0 / Q5_1 / Q6_K: 32 codes assembled as bytes with 256-bit operations (their high bits moved into place),
//    then the four int32 vectors taken by shifts and masks of the dword lanes, so vector e holds weights 4i + e:
//    linear() permutes a copy of the activations per 32 to match (xq). (Q5_0 8.0 against 7.1, Q5_1 7.9 / 7.6,
//    Q6_K 10.3 / 9.8.) In Q5_0 the fifth bits take ~25% of the time, the fp16 d ~13%, the -16 term ~10%; gathering
//    8 blocks' d in general registers for one vcvtph2ps was slower (7.4 against 9.3 in a harness). Storing the bytes to
//    the stack and widening them back with vpmovsxbd ran at half that: the 8-byte loads of a 32-byte store wait on
//    store forwarding.
// The biases and mins go to an offset term with the activations' sums (computed here): Q4_K's -dmin * m_j and
// Q5_1's m with the sums per 32, Q5_0's -16 d per block with them too, Q6_K's -32 d sc_i with the sums per 16.
// The error is that of an fp32 dot product summed in another order (per chunk, then scaled), well within the
// reference comparison's tolerance (tests/ops/test_kquant_linear.py runs this path at the avx2 level on such
// CPUs). Activations holding inf / NaN (or sums overflowing) return false, as the integer kernels do, and take the
// exact portable path. Q5_K (its fifth bits cost as much as the integer kernel's whole unpacking: 8.1 against
// 9.2), Q2_K and Q3_K stay on kquant_linear_avx2.cpp, and so does a fused weight with any part in them.
//
// Used (fma_gemv::use_for, cpu::fp32_fma_gemv) at the avx2 dispatch level on CPUs without AVX512-VNNI and
// AVX-VNNI, unless LLAMA_FAST_FMA_GEMV=0: AVX-512 and AVX-VNNI machines keep their integer kernels (not measured
// against this one), and an AVX512-VNNI machine forced to the avx2 level keeps kquant_linear_avx2.cpp, which its
// tests compare bit for bit with the VNNI kernels. LLAMA_FAST_FMA_GEMV=1 forces this kernel at the avx2 level on
// any CPU: tests/ops/test_fma_gemv_forced.py runs it so on CI's AVX-512 machines.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/ggml_blocks.h"
#include "common/half_float.h"
#include "cpu/cpu_features.h"
#include "cpu/kquant_linear.h"
#include "cpu/thread_pool.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LF_KQUANT_FMA_X86 1
#endif

namespace llama_fast {
namespace cpu {
namespace kquant {
namespace fma_gemv {

namespace {

using ggml::BlockType;

bool type_supported(BlockType t) {
  switch (t) {
    case BlockType::kQ8_0:
    case BlockType::kQ5_0:
    case BlockType::kQ5_1:
    case BlockType::kQ4K:
    case BlockType::kQ6K: return true;
    default: return false;  // Q5_K, Q2_K, Q3_K: kquant_linear_avx2.cpp (file header)
  }
}

}  // namespace

bool use_for(const std::vector<Segment>& segs) {
#ifdef LF_KQUANT_FMA_X86
  return fp32_fma_gemv() &&
         std::all_of(segs.begin(), segs.end(), [](const Segment& s) { return type_supported(s.type); });
#else
  (void)segs;
  return false;
#endif
}

#ifdef LF_KQUANT_FMA_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace {

constexpr int kPrefetchBytes = kBlockGemvPrefetchBytes, kL2PrefetchBytes = kBlockGemvL2PrefetchBytes;

inline float f16_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline __m256i load256(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Q5_0 / Q5_1: the 32 codes of one block as bytes, unsigned (0-31: Q5_0's -16 is taken with the activation sums),
// weights 0-31 in order. qs: 16 bytes, low nibbles weights 0-15, high ones 16-31: broadcast to both 128-bit halves
// and shifted right by 4 in the upper one. qh: 32 bits, bit i weight i's fifth bit: its bytes spread so that byte
// i holds qh byte i / 8 (vpshufb in each half of the broadcast), then compared with bit i % 8.
template <BlockType T>
inline __m256i q5_codes(const uint8_t* b) {
  constexpr int qh_at = T == BlockType::kQ5_1 ? 4 : 2;
  const __m256i qs = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + qh_at + 4)));
  const __m256i nib =
      _mm256_and_si256(_mm256_srlv_epi32(qs, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)), _mm256_set1_epi8(0x0F));
  uint32_t qh;
  std::memcpy(&qh, b + qh_at, 4);
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(static_cast<int>(qh)),
      _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ull));
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
  return _mm256_or_si256(nib, _mm256_and_si256(set, _mm256_set1_epi8(16)));
}

// Q4_K: the eight 6-bit scales and mins of a super-block from its 12 packed bytes (as
// kquant_linear_avx2.cpp's k_scales_mins), as int32.
inline void k_scales_mins(const uint8_t* packed, __m256i* sc, __m256i* mn) {
  // three 4-byte loads straight from the block: a 12-byte copy to the stack read back in 4-byte pieces (what the
  // compiler made of one memcpy) waited on store forwarding in every super-block
  uint32_t a0, a1, a2;
  std::memcpy(&a0, packed, 4);
  std::memcpy(&a1, packed + 4, 4);
  std::memcpy(&a2, packed + 8, 4);
  const uint32_t low6 = 0x3f3f3f3f, low4 = 0x0f0f0f0f, top2 = 0x03030303;
  const __m128i v =
      _mm_setr_epi32(static_cast<int>(a0 & low6), static_cast<int>((a2 & low4) | (((a0 >> 6) & top2) << 4)),
                     static_cast<int>(a1 & low6), static_cast<int>(((a2 >> 4) & low4) | (((a1 >> 6) & top2) << 4)));
  *sc = _mm256_cvtepu8_epi32(v);
  *mn = _mm256_cvtepu8_epi32(_mm_srli_si128(v, 8));
}

// 32 unsigned byte codes (weights 4i + e in byte e of dword i) as four fp32 vectors: vector e holds weights 4i + e
// of the lanes i, the order into which linear() permutes a copy of the activations (xq). Shifts and masks in the
// dword lanes: widening each 8 codes (vpmovzxbd) from a register needs shuffles to reach them, and storing the
// bytes to reload them with it stalls on store forwarding; a masking vpand runs on any of Zen 3's four vector pipes.
inline void codes_f32(__m256i v, __m256* f) {
  const __m256i ff = _mm256_set1_epi32(0xFF);
  f[0] = _mm256_cvtepi32_ps(_mm256_and_si256(v, ff));
  f[1] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 8), ff));
  f[2] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 16), ff));
  f[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 24));
}

// Lane j of v in every lane (j a compile-time constant after inlining).
inline __m256 lane(__m256 v, int j) { return _mm256_permutevar8x32_ps(v, _mm256_set1_epi32(j)); }

// The scales of one super-block in registers: Q4_K: d * sc_j (j: the 8 sub-blocks of 32) in `lo` and the
// offsets -(dmin * m_j) in `coef`; Q6_K: d * sc_i (the 16 sub-blocks of 16) in lo (0-7) and hi (8-15).
struct Scales {
  __m256 lo, hi, coef;
};

template <BlockType T>
inline Scales super_scales(const uint8_t* b) {
  Scales s;
  if constexpr (T == BlockType::kQ6K) {
    const __m256 d = _mm256_set1_ps(f16_at(b + 208));
    const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 192));
    s.lo = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc)), d);
    s.hi = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8))), d);
    s.coef = _mm256_setzero_ps();
  } else {
    __m256i sc, mn;
    k_scales_mins(b + 4, &sc, &mn);
    s.lo = _mm256_mul_ps(_mm256_cvtepi32_ps(sc), _mm256_set1_ps(f16_at(b)));
    s.hi = s.lo;
    s.coef = _mm256_mul_ps(_mm256_cvtepi32_ps(mn), _mm256_set1_ps(-f16_at(b + 2)));
  }
  return s;
}

// The 32 unsigned codes (bytes, weight order) of weights 32c..32c+31 of a Q6_K super-block (c a compile-time
// constant: the loads the chunks share are merged by the compiler): chunk 4hh + g of the half hh holds the low
// nibble of ql[64hh + l] (g = 0), ql[64hh + 32 + l] (1), their high nibbles (2, 3), and bits 2g, 2g+1 of
// qh[32hh + l] as bits 4-5 (the -32 is taken with the activation sums).
inline __m256i q6k_chunk(const uint8_t* b, int c) {
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const int hh = c >> 2, g = c & 3;
  const __m256i q = load256(b + 64 * hh + 32 * (g & 1)), qh = load256(b + 128 + 32 * hh);
  const __m256i lo = g < 2 ? _mm256_and_si256(q, m4) : _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
  __m256i hi;
  if (g == 0)
    hi = _mm256_slli_epi16(qh, 4);
  else if (g == 1)
    hi = _mm256_slli_epi16(qh, 2);
  else if (g == 2)
    hi = qh;
  else
    hi = _mm256_srli_epi16(qh, 2);
  return _mm256_or_si256(lo, _mm256_and_si256(hi, _mm256_set1_epi8(0x30)));
}

// Whether a type's kernel reads the activations permuted per 32 (codes_f32; xq) or in order (x): Q8_0's codes are
// widened straight from the block (vpmovsxbd from memory, no shuffle of a register), Q4_K's nibbles from 8 bytes
// at a time (vpmovzxbd, then a mask for one sub-block and a shift for the next).
constexpr bool permuted(BlockType t) { return t != BlockType::kQ8_0 && t != BlockType::kQ4K; }

// M activation rows x weight rows [n0, n1) of a segment; x: the rows in order (or permuted: permuted(T)), row
// stride k; xsum: each row's sums per 16 (Q6_K) or per 32 (the others), row stride lds. Per 32 weights (a chunk)
// the codes as fp32 times each row's activations into a sum, that sum times the chunk's scale (Q6_K: two, lanes
// 0-3 and 4-7 being weights 0-15 and 16-31) into one of two accumulators per row; the bias or mins of the codes
// times the activations' sums into `off`.
template <BlockType T, int M>
void rows(const Segment& s, int64_t k, const float* x, const float* xsum, int64_t lds, int64_t n0, int64_t n1,
          float* out, int64_t ldo) {
  constexpr int bw = ggml::block_weights(T), bb = ggml::block_bytes(T);
  const int64_t nblk = k / bw, rb = nblk * bb;
  for (int64_t r = n0; r < n1; ++r) {
    const uint8_t* row = s.blocks + r * rb;
    __m256 acc[M][2], off[M];
    float offs[M];
    for (int mm = 0; mm < M; ++mm) acc[mm][0] = acc[mm][1] = off[mm] = _mm256_setzero_ps(), offs[mm] = 0.f;
    // the 32 weights from w0 on, as 4 fp32 vectors f matching x + w0 .. + 31, times scale sc into accumulator a
    auto chunk = [&](int64_t w0, const __m256* f, __m256 sc, auto ac) {
      constexpr int a = decltype(ac)::value;
      for (int mm = 0; mm < M; ++mm) {
        const float* xs = x + mm * k + w0;
        __m256 p = _mm256_mul_ps(f[0], _mm256_loadu_ps(xs));
        p = _mm256_fmadd_ps(f[1], _mm256_loadu_ps(xs + 8), p);
        p = _mm256_fmadd_ps(f[2], _mm256_loadu_ps(xs + 16), p);
        p = _mm256_fmadd_ps(f[3], _mm256_loadu_ps(xs + 24), p);
        acc[mm][a] = _mm256_fmadd_ps(p, sc, acc[mm][a]);
      }
    };
    if constexpr (bw == 256) {
      for (int64_t blk = 0; blk < nblk; ++blk) {
        const uint8_t* b = row + blk * bb;
        for (int p = 0; p < bb; p += 64) {
          _mm_prefetch(reinterpret_cast<const char*>(b + kPrefetchBytes + p), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(b + kL2PrefetchBytes + p), _MM_HINT_T1);
        }
        const Scales sc = super_scales<T>(b);
        if constexpr (T == BlockType::kQ4K) {
          // 8 qs bytes at a time: their low nibbles are weights 8e.. of sub-block 2p, the high ones of 2p + 1
          const __m256i m4 = _mm256_set1_epi32(0x0F);
          for (int p = 0; p < 4; ++p) {
            __m256 f[2][4];
            for (int e = 0; e < 4; ++e) {
              const __m256i v =
                  _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 16 + 32 * p + 8 * e)));
              f[0][e] = _mm256_cvtepi32_ps(_mm256_and_si256(v, m4));
              f[1][e] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
            }
            chunk(blk * 256 + 64 * p, f[0], lane(sc.lo, 2 * p), std::integral_constant<int, 0>{});
            chunk(blk * 256 + 64 * p + 32, f[1], lane(sc.lo, 2 * p + 1), std::integral_constant<int, 1>{});
          }
        } else {
          auto one = [&](auto cc) {
            constexpr int c = decltype(cc)::value;
            constexpr int j = 2 * c % 8;  // Q6_K: scales 2c, 2c + 1 (of lo or hi) to lanes 0-3, 4-7
            const __m256 scv = _mm256_permutevar8x32_ps(c < 4 ? sc.lo : sc.hi,
                                                        _mm256_setr_epi32(j, j, j, j, j + 1, j + 1, j + 1, j + 1));
            __m256 f[4];
            codes_f32(q6k_chunk(b, c), f);
            chunk(blk * 256 + 32 * c, f, scv, std::integral_constant<int, c % 2>{});
          };
          one(std::integral_constant<int, 0>{});
          one(std::integral_constant<int, 1>{});
          one(std::integral_constant<int, 2>{});
          one(std::integral_constant<int, 3>{});
          one(std::integral_constant<int, 4>{});
          one(std::integral_constant<int, 5>{});
          one(std::integral_constant<int, 6>{});
          one(std::integral_constant<int, 7>{});
        }
        for (int mm = 0; mm < M; ++mm) {
          if constexpr (T == BlockType::kQ6K) {  // -32 d sc_i times the sums per 16
            const __m256 m32 = _mm256_set1_ps(-32.f);
            const float* s16 = xsum + mm * lds + blk * 16;
            off[mm] = _mm256_fmadd_ps(_mm256_mul_ps(sc.lo, m32), _mm256_loadu_ps(s16), off[mm]);
            off[mm] = _mm256_fmadd_ps(_mm256_mul_ps(sc.hi, m32), _mm256_loadu_ps(s16 + 8), off[mm]);
          } else {
            off[mm] = _mm256_fmadd_ps(sc.coef, _mm256_loadu_ps(xsum + mm * lds + blk * 8), off[mm]);
          }
        }
      }
    } else {
      auto one = [&](int64_t blk, auto ac) {
        const uint8_t* b = row + blk * bb;
        _mm_prefetch(reinterpret_cast<const char*>(b + kPrefetchBytes), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(b + kL2PrefetchBytes), _MM_HINT_T1);
        const float d = f16_at(b);
        __m256 f[4];
        if constexpr (T == BlockType::kQ8_0) {
          for (int e = 0; e < 4; ++e)
            f[e] = _mm256_cvtepi32_ps(
                _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 2 + 8 * e))));
        } else {
          codes_f32(q5_codes<T>(b), f);
          // Q5_0: codes - 16; Q5_1: + the offset m (both exact times the block's sum: a power of two, an fp16)
          const float c = T == BlockType::kQ5_0 ? -16.f * d : f16_at(b + 2);
          for (int mm = 0; mm < M; ++mm) offs[mm] += c * xsum[mm * lds + blk];
        }
        chunk(blk * 32, f, _mm256_set1_ps(d), ac);
      };
      int64_t blk = 0;
      for (; blk + 2 <= nblk; blk += 2) {
        one(blk, std::integral_constant<int, 0>{});
        one(blk + 1, std::integral_constant<int, 1>{});
      }
      if (blk < nblk) one(blk, std::integral_constant<int, 0>{});
    }
    for (int mm = 0; mm < M; ++mm)
      out[mm * ldo + r] = hsum(_mm256_add_ps(acc[mm][0], acc[mm][1])) + (hsum(off[mm]) + offs[mm]);
  }
}

template <BlockType T>
void rows_all_m(const Segment& s, int64_t k, const float* xn, const float* xq, const float* xsum32, const float* xsum16,
                int64_t m, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  const float* x = permuted(T) ? xq : xn;
  const float* xsum = T == BlockType::kQ6K ? xsum16 : xsum32;
  const int64_t lds = T == BlockType::kQ6K ? k / 16 : k / 32;
  for (int64_t m0 = 0; m0 < m;) {
    const int64_t left = m - m0;
    auto step = [&](auto rc) {
      constexpr int M = decltype(rc)::value;
      rows<T, M>(s, k, x + m0 * k, xsum + m0 * lds, lds, n0, n1, out + m0 * ldo, ldo);
      m0 += M;
    };
    if (left >= 4)
      step(std::integral_constant<int, 4>{});
    else if (left >= 2)
      step(std::integral_constant<int, 2>{});
    else
      step(std::integral_constant<int, 1>{});
  }
}

void rows_by_type(const Segment& s, int64_t k, const float* xn, const float* xq, const float* xsum32,
                  const float* xsum16, int64_t m, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  auto run = [&](auto tc) { rows_all_m<decltype(tc)::value>(s, k, xn, xq, xsum32, xsum16, m, n0, n1, out, ldo); };
  switch (s.type) {
    case BlockType::kQ8_0: return run(std::integral_constant<BlockType, BlockType::kQ8_0>{});
    case BlockType::kQ5_0: return run(std::integral_constant<BlockType, BlockType::kQ5_0>{});
    case BlockType::kQ5_1: return run(std::integral_constant<BlockType, BlockType::kQ5_1>{});
    case BlockType::kQ4K: return run(std::integral_constant<BlockType, BlockType::kQ4K>{});
    default: return run(std::integral_constant<BlockType, BlockType::kQ6K>{});  // use_for: no other
  }
}

}  // namespace

bool linear(bool bf16, const void* x, int64_t m, const std::vector<Segment>& segs, int64_t k, float* out, int64_t ldo) {
  // fp32 activations (bf16 widened: exact), a copy permuted per 32 (codes_f32's order), and their sums per 16 and
  // per 32, for the biases and mins of the codes
  thread_local std::vector<float> xf, xq, xsum32, xsum16;
  const float* xs = static_cast<const float*>(x);
  if (bf16) {
    xf.resize(m * k);
    const uint16_t* xb = static_cast<const uint16_t*>(x);
    for (int64_t i = 0; i < m * k; ++i) xf[i] = bf16_bits_to_float(xb[i]);
    xs = xf.data();
  }
  const bool permute = std::any_of(segs.begin(), segs.end(), [](const Segment& s) { return permuted(s.type); });
  if (permute) xq.resize(m * k);
  xsum32.resize(m * (k / 32));
  xsum16.resize(m * (k / 16));
  __m256 finite = _mm256_setzero_ps();  // x * 0 is 0 for finite x, NaN for inf / NaN
  for (int64_t g = 0; g < m * (k / 32); ++g) {
    const float* p = xs + 32 * g;
    const __m256 a = _mm256_add_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8));
    const __m256 c = _mm256_add_ps(_mm256_loadu_ps(p + 16), _mm256_loadu_ps(p + 24));
    finite = _mm256_add_ps(finite, _mm256_mul_ps(_mm256_add_ps(a, c), _mm256_setzero_ps()));
    xsum16[2 * g] = hsum(a);
    xsum16[2 * g + 1] = hsum(c);
    xsum32[g] = xsum16[2 * g] + xsum16[2 * g + 1];
    if (!permute) continue;
    // element 4i + e of the 32 to position 8e + i. With r_j = p[8j .. 8j+7] = [A_j | B_j] (128-bit halves), vector
    // e is [A0 B0 A1 B1 | A2 B2 A3 B3] element e of each: the halves regrouped, then a 4 x 4 transpose per half.
    const __m256 r0 = _mm256_loadu_ps(p), r1 = _mm256_loadu_ps(p + 8), r2 = _mm256_loadu_ps(p + 16),
                 r3 = _mm256_loadu_ps(p + 24);
    const __m256 s0 = _mm256_permute2f128_ps(r0, r2, 0x20), s1 = _mm256_permute2f128_ps(r0, r2, 0x31);
    const __m256 s2 = _mm256_permute2f128_ps(r1, r3, 0x20), s3 = _mm256_permute2f128_ps(r1, r3, 0x31);
    const __m256 t0 = _mm256_unpacklo_ps(s0, s1), t1 = _mm256_unpackhi_ps(s0, s1);
    const __m256 t2 = _mm256_unpacklo_ps(s2, s3), t3 = _mm256_unpackhi_ps(s2, s3);
    float* q = xq.data() + 32 * g;
    _mm256_storeu_ps(q, _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)));
    _mm256_storeu_ps(q + 8, _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2)));
    _mm256_storeu_ps(q + 16, _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)));
    _mm256_storeu_ps(q + 24, _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  // a sum of finite values can overflow to inf too: then also decline (the exact path handles it)
  if (std::isnan(hsum(finite))) return false;
  // pointers, not the thread_locals: in the pool's threads those names would be their own (empty) vectors
  const float *xperm = permute ? xq.data() : nullptr, *s32 = xsum32.data(), *s16 = xsum16.data();
  int64_t col = 0;
  for (const Segment& s : segs) {
    parallel_for(s.rows, gemv_grain(s.type, k, s.rows),
                 [&](int64_t n0, int64_t n1) { rows_by_type(s, k, xs, xperm, s32, s16, m, n0, n1, out + col, ldo); });
    col += s.rows;
  }
  return true;
}

#pragma GCC pop_options
#else
bool linear(bool, const void*, int64_t, const std::vector<Segment>&, int64_t, float*, int64_t) { return false; }
#endif

}  // namespace fma_gemv
}  // namespace kquant
}  // namespace cpu
}  // namespace llama_fast
