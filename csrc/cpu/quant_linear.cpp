// Weight-only quantized linear (int4 / int8, csrc/common/quant_format.h) read straight from the packed
// weights, activations in fp32 (bf16 inputs are widened, never rounded to 8 bits).
//
// int4 on AVX-512: per group, the 16 possible weight values q * scale + offset form one 16-lane fp32 table;
// vpermps indexes it with the nibbles, so dequantizing 16 weights is one permute and the FMA consumes them
// directly. Byte j holds elements 2j (low nibble) and 2j+1 (high nibble), so the activations are stored
// de-interleaved per chunk of 2W ([even | odd]) once per call and each byte's two nibbles meet their own
// activation lane. AVX2 (8-entry permutes only) and int8 use the factored form
//   sum_k w x = sum_groups scale * (sum q x) + offset * (sum x).
// The portable path (and group sizes that are not a multiple of the chunk) dequantizes element by element.
#ifndef LF_ISA
#include "cpu/gemm_amx_quant.h"
#include "cpu/kernels.h"
#include "cpu/quant_linear_vnni.h"
#include "cpu/quant_scales.h"
#include "cpu/thread_pool.h"
#include "cpu/vnni256.h"

#define LF_ISA_SELF "cpu/quant_linear.cpp"
#include "cpu/foreach_isa.h"

namespace llama_fast {
namespace cpu {

// On the calling thread: the caller runs it on ATen's threads, next to ATen's GEMM (see ops_cpu.cpp).
void dequantize_rows(const QuantWeight& w, int64_t n0, int64_t n1, float* out) {
  const int64_t groups = w.k / w.group_size;
  for (int64_t n = n0; n < n1; ++n) {
    float* o = out + (n - n0) * w.k;
    for (int64_t g = 0; g < groups; ++g) {
      const float s = scale_at(w.scale, w.scale_type, n * groups + g);
      const float off = w.offset ? scale_at(w.offset, w.scale_type, n * groups + g) : 0.f;
      for (int64_t kk = g * w.group_size; kk < (g + 1) * w.group_size; ++kk) {
        const int code = w.bits == 4 ? quant::int4_code(static_cast<const uint8_t*>(w.q) + n * (w.k / 2), kk)
                                     : static_cast<const int8_t*>(w.q)[n * w.k + kk];
        o[kk] = quant::dequant_value(code, s, off);
      }
    }
  }
}

// Activation width (in elements) of the [even | odd] de-interleaving the ISA's int4 kernel wants, 0 = none.
int64_t int4_chunk() {
  switch (isa()) {
    case Isa::kAvx512Bf16:
    case Isa::kAvx512Vnni:
    case Isa::kAvx512: return 32;
    case Isa::kAvx2: return 16;
    default: return 0;
  }
}

// Rows of packed weights per parallel chunk of a batch (prefill): ~32 KiB, a multiple of 4 rows. Small enough that
// the layers of a small model (a few hundred KiB each) split evenly over the threads, large enough to amortize a
// claim. (A decode GEMV streams one range per thread instead: decode_row_grain.)
int64_t row_grain(const QuantWeight& w) {
  const int64_t row_bytes = w.bits == 4 ? w.k / 2 : w.k;
  return std::max<int64_t>(4, ((int64_t{1} << 15) / std::max<int64_t>(row_bytes, 1)) / 4 * 4);
}

// A decode step's GEMV (up to kMaxGemvRows rows: memory bound) streams one range of weight rows per thread
// (thread_pool.h); more rows (prefill: compute bound) share the rows out in row_grain chunks, which keeps the threads
// balanced when one of them is slowed down.
int64_t decode_row_grain(const QuantWeight& w, int64_t m) {
  return m <= kMaxGemvRows ? std::max<int64_t>(row_grain(w), one_range_per_thread(w.n, 4)) : row_grain(w);
}

// out (fp32 [m, n]) + bias -> the activation dtype.
void store_output(bool bf16, const float* outf, const void* bias, void* out, int64_t m, int64_t n) {
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t j = 0; j < n; ++j) {
      float v = outf[r * n + j];
      if (bf16) {
        if (bias) v += bf16_bits_to_float(static_cast<const uint16_t*>(bias)[j]);
        static_cast<uint16_t*>(out)[r * n + j] = float_to_bf16_bits(v);
      } else {
        if (bias) v += static_cast<const float*>(bias)[j];
        static_cast<float*>(out)[r * n + j] = v;
      }
    }
  }
}

// From this many activation rows, dequantizing a block of weight rows once and multiplying it with every row
// (row_tiles.h) beats the GEMV kernels below, whose per-row work includes the dequantization (measured on the
// demo model's shapes).
constexpr int64_t kQuantTiledFromRows = 4;
static_assert(kQuantTiledFromRows <= kGemvBlockRows + 1, "the GEMV kernels take fewer rows");

// The integer kernels' entry points: vnni:: (AVX512-VNNI, quant_linear_vnni.cpp) or vnni256:: (the same arithmetic
// on 256-bit vectors, quant_linear_avx2.cpp).
struct IntegerGemv {
  bool (*prepare)(bool, const void*, int64_t, const QuantWeight&, int16_t*, float*, float*);
  void (*rows)(const QuantWeight&, const int16_t*, const float*, const float*, int64_t, bool, int64_t, int64_t, float*,
               int64_t);
};

// int4 / int8 on integer dot products, any number of rows. False when x holds values fixed point cannot carry (inf,
// NaN).
bool quant_linear_vnni(const IntegerGemv& kernel, bool bf16, const void* x, const QuantWeight& w, const void* bias,
                       void* out, int64_t m) {
  const int64_t k = w.k, n = w.n, groups = k / w.group_size;
  thread_local std::vector<int16_t> xp;
  thread_local std::vector<float> xsum, xscale, outf;
  xp.resize(m * 2 * k);
  xsum.resize(m * groups);
  xscale.resize(m);
  outf.resize(m * n);
  if (!kernel.prepare(bf16, x, m, w, xp.data(), xsum.data(), xscale.data())) return false;
  // Any m (prefill too): each thread's band of weight rows meets every block of 8 activation rows while it is
  // in cache, so the weights are read from memory once; the prepared activations (2K int16 per row) stream.
  // (raw pointers: inside the lambda the thread_local names would be the helper threads' own, empty buffers)
  const int16_t* xs = xp.data();
  const float *ss = xsum.data(), *sc = xscale.data();
  float* os = outf.data();
  parallel_for(n, decode_row_grain(w, m), [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < m; m0 += 8)
      kernel.rows(w, xs + m0 * 2 * k, ss + m0 * groups, sc + m0, std::min<int64_t>(8, m - m0), !bf16, n0, n1,
                  os + m0 * n, n);
  });
  store_output(bf16, outf.data(), bias, out, m, n);
  return true;
}

bool quant_linear_any_rows(bool bf16, const void* x, const QuantWeight& w, const void* bias, void* out, int64_t m) {
  if (vnni::supports(w)) return quant_linear_vnni({vnni::prepare, vnni::rows}, bf16, x, w, bias, out, m);
  if (vnni256::supports(w)) return quant_linear_vnni({vnni256::prepare, vnni256::rows}, bf16, x, w, bias, out, m);
  return false;
}

// From this many fp32 activation rows the dequantized tiles below beat the VNNI kernel on VNNI CPUs: with fp32
// activations (two int16 limbs) VNNI spends 4 vpdpwssd + 2 converts + 2 FMAs per row and 64 weights, the tiles 4
// FMAs per row and 64 weights after dequantizing each weight once for all rows. For a few rows the
// dequantization dominates and VNNI wins; bf16 activations (one limb: 2 vpdpwssd + convert + FMA) stay on VNNI.
// Measured on the demo model's shapes, 1 thread (Intel, AVX-512 VNNI): see docs/KERNELS.md.
constexpr int64_t kTiledOverVnniFromRows = 8;

void quant_linear(bool bf16, const void* x, const QuantWeight& w, const void* bias, void* out, int64_t m) {
  // the AMX tile GEMM from a few rows (tuning.h); it declines activations holding inf / NaN
  if (m >= amx_quant_from_rows(bf16) && amx_quant_available(w) && gemm_amx_quant(bf16, x, w, bias, out, m)) return;
  // enough rows that making each weight fp32 once and multiplying in the GEMM's register tile wins (tuning.h)
  const QuantGemm format = w.bits == 4 ? QuantGemm::kInt4 : QuantGemm::kInt8;
  if (m >= quant_gemm_from_rows(format) && prefill_gemm_available()) return gemm_quant(bf16, x, w, bias, out, m);
  const bool tiles_win = !bf16 && m >= kTiledOverVnniFromRows;
  if (!tiles_win && quant_linear_any_rows(bf16, x, w, bias, out, m)) return;
  const int64_t k = w.k, n = w.n, groups = k / w.group_size;
  int64_t chunk = w.bits == 4 ? int4_chunk() : 0;
  if (chunk != 0 && w.group_size % chunk != 0) chunk = 0;  // the ISA kernel falls back to the scalar path too
  // Per-call scratch in the calling thread (grown once, reused: no allocation per token).
  thread_local std::vector<float> xf_storage, xsum, outf;
  // the prepared rows on a cache line: the tiled kernel's 32-byte loads of them then never straddle two (row_tiles.h)
  xf_storage.resize(m * k + 64 / sizeof(float));
  float* const xf = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(xf_storage.data()) + 63) & ~uintptr_t{63});
  xsum.resize(m * groups);
  outf.resize(m * n);
  for (int64_t r = 0; r < m; ++r) {
    float* dst = xf + r * k;
    for (int64_t kk = 0; kk < k; ++kk) {
      const float v = bf16 ? bf16_bits_to_float(static_cast<const uint16_t*>(x)[r * k + kk])
                           : static_cast<const float*>(x)[r * k + kk];
      // de-interleave within each chunk: element c0 + 2i -> c0 + i, element c0 + 2i + 1 -> c0 + chunk/2 + i
      int64_t pos = kk;
      if (chunk != 0) {
        const int64_t c0 = kk - kk % chunk, i = kk - c0;
        pos = c0 + (i & 1) * (chunk / 2) + (i >> 1);
      }
      dst[pos] = v;
    }
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0.f;
      for (int64_t kk = g * w.group_size; kk < (g + 1) * w.group_size; ++kk) s += dst[kk];  // order-free
      xsum[r * groups + g] = s;
    }
  }
  const float* xs = xf;
  const float* ss = xsum.data();
  float* os = outf.data();
  if (m < kQuantTiledFromRows) {
    parallel_for(n, decode_row_grain(w, m),
                 [&](int64_t n0, int64_t n1) { LF_DISPATCH(quant_rows, w, xs, ss, m, chunk, n0, n1, os, n); });
  } else {  // a batch: each block of weight rows dequantized once, then multiplied with every row (row_tiles.h)
    // each thread's rows whole blocks of the ISA's tile
    int64_t block_rows = 1;
    LF_DISPATCH(tile_weight_rows_into, block_rows);
    const int64_t grain = (row_grain(w) + block_rows - 1) / block_rows * block_rows;
    parallel_for(n, grain,
                 [&](int64_t n0, int64_t n1) { LF_DISPATCH(quant_tiled_rows, w, xs, m, chunk, n0, n1, os, n); });
  }
  store_output(bf16, outf.data(), bias, out, m, n);
}

}  // namespace cpu
}  // namespace llama_fast

#else  // one ISA pass

#include "cpu/row_tiles.h"

namespace llama_fast {
namespace cpu {
namespace LF_ISA {

// Element-by-element dequantization (dequantize_rows, one weight row at a time): the portable path and any group
// size the vector kernels do not tile.
inline void quant_rows_scalar(const QuantWeight& w, const float* x, int64_t m, int64_t n0, int64_t n1, float* out,
                              int64_t ldo) {
  thread_local std::vector<float> row;  // this thread's (called inside parallel_for)
  row.resize(w.k);
  for (int64_t n = n0; n < n1; ++n) {
    dequantize_rows(w, n, n + 1, row.data());
    for (int64_t r = 0; r < m; ++r) {
      float acc = 0.f;
      for (int64_t kk = 0; kk < w.k; ++kk) acc += row[kk] * x[r * w.k + kk];
      out[r * ldo + n] = acc;
    }
  }
}

#if LF_ISA_LEVEL == 2
// int4, AVX-512: the per-group 16-entry table + vpermps. R weight rows x M activation rows per step.
template <int R, int M>
void q4_lut_block(const QuantWeight& w, const float* x, int64_t row, float* out, int64_t ldo) {
  const int64_t k = w.k, gs = w.group_size, groups = k / gs;
  const uint8_t* q = static_cast<const uint8_t*>(w.q);
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 lo[R][M], hi[R][M];
  for (int r = 0; r < R; ++r)
    for (int mm = 0; mm < M; ++mm) lo[r][mm] = hi[r][mm] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 lut[R];
    for (int r = 0; r < R; ++r) {
      const int64_t gi = (row + r) * groups + g;
      const float s = scale_at(w.scale, w.scale_type, gi);
      const float off = w.offset ? scale_at(w.offset, w.scale_type, gi) : 0.f;
      lut[r] = _mm512_fmadd_ps(iota, _mm512_set1_ps(s), _mm512_set1_ps(off));
    }
    for (int64_t c = g * gs; c < (g + 1) * gs; c += 32) {
      __m512 xe[M], xo[M];
      for (int mm = 0; mm < M; ++mm) {
        xe[mm] = _mm512_loadu_ps(x + mm * k + c);
        xo[mm] = _mm512_loadu_ps(x + mm * k + c + 16);
      }
      for (int r = 0; r < R; ++r) {
        const __m512i b =
            _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + (row + r) * (k / 2) + c / 2)));
        const __m512 wl = _mm512_permutexvar_ps(b, lut[r]);  // uses the low 4 bits of each lane
        const __m512 wh = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), lut[r]);
        for (int mm = 0; mm < M; ++mm) {
          lo[r][mm] = _mm512_fmadd_ps(wl, xe[mm], lo[r][mm]);
          hi[r][mm] = _mm512_fmadd_ps(wh, xo[mm], hi[r][mm]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int mm = 0; mm < M; ++mm) out[mm * ldo + row + r] = _mm512_reduce_add_ps(_mm512_add_ps(lo[r][mm], hi[r][mm]));
}

template <int M>
void q4_rows(const QuantWeight& w, const float* x, const float*, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  constexpr int R = M == 1 ? 4 : (M <= 4 ? 2 : 1);
  int64_t row = n0;
  for (; row + R <= n1; row += R) q4_lut_block<R, M>(w, x, row, out, ldo);
  for (; row < n1; ++row) q4_lut_block<1, M>(w, x, row, out, ldo);
}
#endif

#if LF_ISA_LEVEL >= 1
// W codes starting at element kk of row `row` as fp32 lanes (int8), or the 2W codes of W bytes split into
// the even (low nibble) and odd (high nibble) halves (int4).
inline VecF int8_codes(const int8_t* p) {
#if LF_ISA_LEVEL == 2
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#endif
}
inline void int4_codes(const uint8_t* p, VecF& even, VecF& odd) {
#if LF_ISA_LEVEL == 2
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  even = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
  odd = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
#else
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  even = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15)));
  odd = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
#endif
}

// Factored form, one weight row at a time: per group, code dot x, then scale and offset * sum(x).
template <int M>
void factored_rows(const QuantWeight& w, const float* x, const float* xsum, int64_t n0, int64_t n1, float* out,
                   int64_t ldo) {
  constexpr int W = VecF::W;
  const int64_t k = w.k, gs = w.group_size, groups = k / gs;
  for (int64_t row = n0; row < n1; ++row) {
    VecF acc[M];
    float off_acc[M];
    for (int mm = 0; mm < M; ++mm) {
      acc[mm] = VecF::zero();
      off_acc[mm] = 0.f;
    }
    for (int64_t g = 0; g < groups; ++g) {
      VecF ga[M], gb[M];
      for (int mm = 0; mm < M; ++mm) ga[mm] = gb[mm] = VecF::zero();
      if (w.bits == 4) {
        const uint8_t* q = static_cast<const uint8_t*>(w.q) + row * (k / 2);
        for (int64_t c = g * gs; c < (g + 1) * gs; c += 2 * W) {
          VecF ev, od;
          int4_codes(q + c / 2, ev, od);
          for (int mm = 0; mm < M; ++mm) {
            ga[mm] = VecF::fma(ev, VecF::load(x + mm * k + c), ga[mm]);
            gb[mm] = VecF::fma(od, VecF::load(x + mm * k + c + W), gb[mm]);
          }
        }
      } else {
        const int8_t* q = static_cast<const int8_t*>(w.q) + row * k;
        int64_t c = g * gs;
        for (; c + 2 * W <= (g + 1) * gs; c += 2 * W) {
          const VecF c0 = int8_codes(q + c), c1 = int8_codes(q + c + W);
          for (int mm = 0; mm < M; ++mm) {
            ga[mm] = VecF::fma(c0, VecF::load(x + mm * k + c), ga[mm]);
            gb[mm] = VecF::fma(c1, VecF::load(x + mm * k + c + W), gb[mm]);
          }
        }
        if (c < (g + 1) * gs) {
          const VecF c0 = int8_codes(q + c);
          for (int mm = 0; mm < M; ++mm) ga[mm] = VecF::fma(c0, VecF::load(x + mm * k + c), ga[mm]);
        }
      }
      const int64_t gi = row * groups + g;
      const VecF s = VecF::set1(scale_at(w.scale, w.scale_type, gi));
      const float off = w.offset ? scale_at(w.offset, w.scale_type, gi) : 0.f;
      for (int mm = 0; mm < M; ++mm) {
        acc[mm] = VecF::fma(ga[mm] + gb[mm], s, acc[mm]);
        off_acc[mm] += off * xsum[mm * groups + g];
      }
    }
    for (int mm = 0; mm < M; ++mm) out[mm * ldo + row] = acc[mm].sum() + off_acc[mm];
  }
}
#endif

#if LF_ISA_LEVEL >= 1
// Weight row n dequantized to fp32 at d by vectors: int4 de-interleaved per chunk of 2W ([even | odd]), or int8 in
// natural order (group size a multiple of W). kGroup > 0 is the group size as a constant (the common 32 / 64 / 128):
// the loop over a group's chunks then unrolls: the int4 tiles 2-5% faster at 1-16 rows (Zen 3, the tiled kernel
// alone, SmolLM2 shapes, weights in L2 or from memory). The same operations either way.
template <int kBits, int kGroup>
inline void dequantize_row_vec(const QuantWeight& w, int64_t n, float* d) {
  constexpr int W = VecF::W;
  const int64_t k = w.k, gs = kGroup > 0 ? kGroup : w.group_size, groups = k / gs;
  for (int64_t g = 0; g < groups; ++g) {
    const VecF sv = VecF::set1(scale_at(w.scale, w.scale_type, n * groups + g));
    const VecF ov = VecF::set1(w.offset ? scale_at(w.offset, w.scale_type, n * groups + g) : 0.f);
    if constexpr (kBits == 4) {
      const uint8_t* q = static_cast<const uint8_t*>(w.q) + n * (k / 2);
      for (int64_t c = g * gs; c < (g + 1) * gs; c += 2 * W) {
        VecF even, odd;
        int4_codes(q + c / 2, even, odd);
        (even * sv + ov).store(d + c);
        (odd * sv + ov).store(d + c + W);
      }
    } else {
      const int8_t* q = static_cast<const int8_t*>(w.q) + n * k;
      for (int64_t c = g * gs; c < (g + 1) * gs; c += W) (int8_codes(q + c) * sv + ov).store(d + c);
    }
  }
}

template <int kBits>
inline void dequantize_row_vec_any_group(const QuantWeight& w, int64_t n, float* d) {
  switch (w.group_size) {
    case 32: return dequantize_row_vec<kBits, 32>(w, n, d);
    case 64: return dequantize_row_vec<kBits, 64>(w, n, d);
    case 128: return dequantize_row_vec<kBits, 128>(w, n, d);
    default: return dequantize_row_vec<kBits, 0>(w, n, d);
  }
}
#endif

// `count` weight rows from `row` dequantized to fp32 [count, K], in the element order of the prepared activations
// (int4 with chunk = 2W: [even | odd] per chunk, see the top of this file; otherwise natural).
inline void dequantize_block(const QuantWeight& w, int64_t row, int count, int64_t chunk, float* dst) {
  const int64_t k = w.k, gs = w.group_size, groups = k / gs;
#if LF_ISA_LEVEL >= 1
  constexpr int W = VecF::W;
  if (w.bits == 4 && chunk == 2 * W) {
    for (int r = 0; r < count; ++r) dequantize_row_vec_any_group<4>(w, row + r, dst + r * k);
    return;
  }
  if (w.bits == 8 && gs % W == 0) {
    for (int r = 0; r < count; ++r) dequantize_row_vec_any_group<8>(w, row + r, dst + r * k);
    return;
  }
#endif
  // the scalar path: natural order (the dispatcher prepared x so when the vector one is off)
  (void)chunk;
  for (int r = 0; r < count; ++r) {
    const int64_t n = row + r;
    float* d = dst + r * k;
    for (int64_t g = 0; g < groups; ++g) {
      const float s = scale_at(w.scale, w.scale_type, n * groups + g);
      const float off = w.offset ? scale_at(w.offset, w.scale_type, n * groups + g) : 0.f;
      for (int64_t kk = g * gs; kk < (g + 1) * gs; ++kk) {
        const int code = w.bits == 4 ? quant::int4_code(static_cast<const uint8_t*>(w.q) + n * (k / 2), kk)
                                     : static_cast<const int8_t*>(w.q)[n * k + kk];
        d[kk] = quant::dequant_value(code, s, off);
      }
    }
  }
}

// Rows n0..n1-1 of out[m, N] (fp32) for any number m of prepared activation rows x (see quant_rows): each block
// of weight rows is dequantized once and multiplied with all m rows by the tiled kernel.
inline void quant_tiled_rows(const QuantWeight& w, const float* x, int64_t m, int64_t chunk, int64_t n0, int64_t n1,
                             float* out, int64_t ldo) {
  const int64_t row_bytes = w.bits == 4 ? w.k / 2 : w.k;  // the codes (the scales: 1/4 to 1/8 of that, unfetched)
  tiled_rows<float>(x, m, w.k, nullptr, out, ldo, n0, n1, w.q, row_bytes,
                    [&](int64_t row, int count, float* buffer) -> const float* {
                      dequantize_block(w, row, count, chunk, buffer);
                      return buffer;
                    });
}

template <int M>
void quant_rows_m(const QuantWeight& w, const float* x, const float* xsum, int64_t chunk, int64_t n0, int64_t n1,
                  float* out, int64_t ldo) {
#if LF_ISA_LEVEL >= 1
  constexpr int W = VecF::W;
  if (w.bits == 4 && chunk == 2 * W) {
#if LF_ISA_LEVEL == 2
    return q4_rows<M>(w, x, xsum, n0, n1, out, ldo);
#else
    return factored_rows<M>(w, x, xsum, n0, n1, out, ldo);
#endif
  }
  if (w.bits == 8 && w.group_size % W == 0) return factored_rows<M>(w, x, xsum, n0, n1, out, ldo);
#endif
  (void)xsum;
  (void)chunk;
  quant_rows_scalar(w, x, M, n0, n1, out, ldo);
}

// Rows n0..n1-1 of out[M, N] (fp32) for M <= kGemvBlockRows activation rows x (prepared by the dispatcher: fp32,
// de-interleaved per `chunk` for int4), xsum[M, groups] the per-group sums of x.
inline void quant_rows(const QuantWeight& w, const float* x, const float* xsum, int64_t m, int64_t chunk, int64_t n0,
                       int64_t n1, float* out, int64_t ldo) {
  switch (m) {
    case 1: return quant_rows_m<1>(w, x, xsum, chunk, n0, n1, out, ldo);
    case 2: return quant_rows_m<2>(w, x, xsum, chunk, n0, n1, out, ldo);
    case 3: return quant_rows_m<3>(w, x, xsum, chunk, n0, n1, out, ldo);
    case 4: return quant_rows_m<4>(w, x, xsum, chunk, n0, n1, out, ldo);
    case 5: return quant_rows_m<5>(w, x, xsum, chunk, n0, n1, out, ldo);
    case 6: return quant_rows_m<6>(w, x, xsum, chunk, n0, n1, out, ldo);
    case 7: return quant_rows_m<7>(w, x, xsum, chunk, n0, n1, out, ldo);
    default: return quant_rows_m<8>(w, x, xsum, chunk, n0, n1, out, ldo);
  }
}

}  // namespace LF_ISA
}  // namespace cpu
}  // namespace llama_fast
#endif
