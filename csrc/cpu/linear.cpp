// Dense linear for decode: out[M, N] = x[M, K] @ w[N, K]^T (+ bias), M up to kMaxGemvRows. bf16 from
// amx_bf16_from_rows() rows on a CPU with AMX: the tile GEMM (gemm_amx.cpp), which also reads each weight once.
// Otherwise each weight row is streamed once for all M activation rows; threads get contiguous row ranges
// (sequential streams for the prefetcher): one range per thread for the GEMVs, ~64 KiB chunks for the tiled kernel. For
// a few rows (memory bound) the GEMV kernels below keep all rows' accumulators of a few weight rows in registers; bf16
// weights with bf16 activations use AVX512-BF16 dot products (vdpbf16ps, exact products, fp32 sums) where the CPU has
// them, up to kDpbf16GemvRows rows. More rows (a batched decode step: compute bound) go to the register-tiled multi-row
// kernel of cpu/row_tiles.h, on fp32 activations (bf16 widened once per call, weights widened per block of rows: exact,
// like vdpbf16ps's products).
#ifndef LF_ISA
#include "cpu/gemm_amx.h"
#include "cpu/kernels.h"
#include "cpu/thread_pool.h"
#include "cpu/tuning.h"
#define LF_ISA_SELF "cpu/linear.cpp"
#include "cpu/foreach_isa.h"

namespace llama_fast {
namespace cpu {

// Rows 0..n-1 in chunks of ~64 KiB of weights (a multiple of `align` rows), claimed by the pool's threads.
template <typename F>
void parallel_rows(int64_t n, int64_t align, int64_t bytes_per_row, F fn) {
  int64_t grain = std::max<int64_t>(align, (int64_t{1} << 16) / std::max<int64_t>(bytes_per_row, 1));
  grain = (grain + align - 1) / align * align;
  parallel_for(n, grain, fn);
}

void dense_linear(bool bf16, const void* x, const void* w, const void* bias, void* out, int64_t m, int64_t n,
                  int64_t k) {
  // bf16 on a CPU with AMX, from amx_bf16_from_rows() rows: the tile unit, at the top ISA level only (as gemm_dense)
  if (bf16 && m >= amx_bf16_from_rows() && amx_in_effect())
    return gemm_amx_bf16(static_cast<const uint16_t*>(x), static_cast<const uint16_t*>(w),
                         static_cast<const uint16_t*>(bias), static_cast<uint16_t*>(out), m, n, k);
  // bf16 weights with bf16 activations use vdpbf16ps where the CPU has it
  const bool dp = bf16 && isa() == Isa::kAvx512Bf16;
  // From this many rows the tiled kernel beats the GEMV (demo model's shapes): 4, where the GEMV spends an FMA per
  // weight and row as the tiles do but also loads every activation vector again per weight row (and widens it, bf16),
  // the tiles only per block of rows. Zen 3 (AVX2, 1 thread), G multiply-adds/s GEMV / tiles, bf16 at 4 rows
  // 15.7-17.0 / 15.6-17.5, 6 rows 16.6-18.2 / 18.5-24.3, 8 rows 17.8-18.2 / 22.0-24.3 (docs/KERNELS.md). The
  // vdpbf16ps GEMV (32 bf16 products per instruction, no widening) holds up to kDpbf16GemvRows rows against tiles
  // that first widen the weights and then do 16 per FMA: on the Zen 4 guest (2 threads, huge pages, 3072 x 576) the
  // tiles took 509 us at 16 rows, the GEMV at 8 rows 164.
  const int64_t tiled_from = dp ? kDpbf16GemvRows + 1 : 4;
  if (m >= tiled_from) {
    // fp32 activation rows for the tiled kernel (bf16 widened here once, exactly)
    const float* xf = static_cast<const float*>(x);
    thread_local std::vector<float> widened;  // the calling thread's: grown once, reused
    if (bf16) {
      // on a cache line, as torch's fp32 tensors are: the tiled kernel's loads then never straddle two lines
      widened.resize(m * k + 64 / sizeof(float));
      float* const dst = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(widened.data()) + 63) & ~uintptr_t{63});
      const uint16_t* xb = static_cast<const uint16_t*>(x);
      for (int64_t i = 0; i < m * k; ++i) dst[i] = bf16_bits_to_float(xb[i]);
      xf = dst;
    }
    // each thread's rows whole blocks of the ISA's tile (row_tiles.h)
    int64_t block_rows = 1;
    LF_DISPATCH(tile_weight_rows_into, block_rows);
    LF_CPU_DISPATCH_DTYPE(bf16, T, {
      parallel_rows(n, block_rows, k * static_cast<int64_t>(sizeof(T)), [&](int64_t n0, int64_t n1) {
        LF_DISPATCH(dense_tiled_rows<T>, xf, static_cast<const T*>(w), static_cast<const T*>(bias),
                    static_cast<T*>(out), m, n, k, n0, n1);
      });
    });
    return;
  }
  // bf16 weights are software-prefetched unless they lie on huge pages and the CPU is not one that gains from it
  // there (tuning.h prefetch_on_huge_pages). fp32 rows only where it gains: elsewhere (Zen 4) they streamed at ~90%
  // of the bandwidth without it and 3% slower with it; on the Intel Xeon SmolLM2's fp32 decode went from 48.6-50 to
  // 52-55 tok/s with it (2 threads, huge pages). More than one row always prefetches (into L2: row_tiles.h
  // prefetch_gemv_weights): each weight line then takes m times the work, and without the prefetch the Zen 4 guest's
  // bf16 GEMV at 8 rows waited on the weight loads (58% of its samples on the instruction after them) and streamed at
  // ~9 GB/s (SmolLM2 bf16 batch 8, 2 threads, runs alternated: 189-217 tok/s without, 275-326 with it into L1).
  const int64_t ahead = m > 1                                     ? tuning().prefetch_bytes
                        : bf16 || tuning().prefetch_on_huge_pages ? dense_prefetch_bytes(w)
                                                                  : 0;
  // one weight stream per thread (thread_pool.h)
  LF_CPU_DISPATCH_DTYPE(bf16, T, {
    parallel_for(n, one_range_per_thread(n, 4), [&](int64_t n0, int64_t n1) {
      LF_DISPATCH(gemv_rows<T>, static_cast<const T*>(x), static_cast<const T*>(w), static_cast<const T*>(bias),
                  static_cast<T*>(out), m, n, k, n0, n1, dp, ahead);
    });
  });
}

}  // namespace cpu
}  // namespace llama_fast

#else  // one ISA pass

#include "cpu/row_tiles.h"

namespace llama_fast {
namespace cpu {
namespace LF_ISA {

#if LF_ISA_LEVEL == 2
// Lane j: _mm512_reduce_add_ps(v[j]) for j < M, bit for bit. A row of the GEMV below ends in M horizontal sums, which
// one at a time cost as many instructions as its dot products at 16 rows (K = 576); here four rounds pair up the
// vectors, each round adding the lanes the reduction adds at that step (lane i + lane i + 8, then + 4, + 2, + 1: GCC's
// order), never lanes of two vectors, so each sum is the same; vectors past M are zeros that stay in their own lanes.
// After the rounds, lane 4L + e holds v[4e + L]'s sum; one permute puts v[j]'s at lane j.
template <int M>
inline VecF lane_sums_as_reduce_add(const __m512* v) {
  static_assert(M >= 1 && M <= 16, "16 lanes");
  __m512 a[16];
  for (int j = 0; j < 16; ++j) a[j] = j < M ? v[j] : _mm512_setzero_ps();
  __m512 u[8], w[4], x[2];
  for (int p = 0; p < 8; ++p)  // [A0 + A2 | A1 + A3 | B0 + B2 | B1 + B3] in 128-bit quarters: i + 8
    u[p] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * p], a[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(a[2 * p], a[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int p = 0; p < 4; ++p)  // quarter q: one vector's 4 lanes i + 4
    w[p] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * p], u[2 * p + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(u[2 * p], u[2 * p + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int p = 0; p < 2; ++p)  // i + 2
    x[p] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * p], w[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(w[2 * p], w[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 y = _mm512_add_ps(_mm512_shuffle_ps(x[0], x[1], _MM_SHUFFLE(2, 0, 2, 0)),  // i + 1
                                 _mm512_shuffle_ps(x[0], x[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512i lane_of = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return VecF(_mm512_permutexvar_ps(lane_of, y));
}

// bf16 x bf16 with vdpbf16ps: 32 products per instruction, fp32 accumulation. One weight row against M activation
// rows: each activation vector is an operand of its dot product straight from L1 (no registers held for them, so M
// up to 16 keeps its 16 accumulators in registers).
template <int M>
void gemv_row_dpbf16(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* out, int64_t n, int64_t k,
                     int64_t row, int64_t ahead) {
  __m512 acc[M];
  for (int mm = 0; mm < M; ++mm) acc[mm] = _mm512_setzero_ps();
  const uint16_t* wr = w + row * k;
  int64_t kk = 0;
  for (; kk + 32 <= k; kk += 32) {
    if (ahead > 0) prefetch_gemv_weights<M>(wr + kk, ahead);
    const __m512bh wv = (__m512bh)_mm512_loadu_si512(wr + kk);
    for (int mm = 0; mm < M; ++mm)
      acc[mm] = _mm512_dpbf16_ps(acc[mm], wv, (__m512bh)_mm512_loadu_si512(x + mm * k + kk));
  }
  if (kk == k) {  // the usual case: all M sums at once, the bias, the rounding, then M scalar stores
    alignas(64) uint16_t rounded[16];
    VecF sums = lane_sums_as_reduce_add<M>(acc);
    if (bias != nullptr) sums = sums + VecF::set1(to_f32(bias[row]));
    sums.store(rounded);  // round to nearest even, as from_f32<uint16_t>
    for (int mm = 0; mm < M; ++mm) out[mm * n + row] = rounded[mm];
    return;
  }
  for (int mm = 0; mm < M; ++mm) {
    float s = _mm512_reduce_add_ps(acc[mm]);
    for (int64_t t = kk; t < k; ++t) s += to_f32(wr[t]) * to_f32(x[mm * k + t]);
    if (bias != nullptr) s += to_f32(bias[row]);
    out[mm * n + row] = from_f32<uint16_t>(s);
  }
}

// Weight rows n0..n1-1 against m (1..M) activation rows, M a compile-time bound (one instantiation per row count).
template <int M>
void dpbf16_rows(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* out, int64_t m, int64_t n,
                 int64_t k, int64_t n0, int64_t n1, int64_t ahead) {
  if constexpr (M > 1) {
    if (m < M) return dpbf16_rows<M - 1>(x, w, bias, out, m, n, k, n0, n1, ahead);
  }
  // One weight row at a time, all rows against it: the weights stream strictly sequentially (see gemv_rows_m).
  for (int64_t row = n0; row < n1; ++row) gemv_row_dpbf16<M>(x, w, bias, out, n, k, row, ahead);
}
#endif

template <typename T, int M>
void gemv_rows_m(const T* x, const T* w, const T* bias, T* out, int64_t n, int64_t k, int64_t n0, int64_t n1,
                 int64_t ahead) {
  // One weight row at a time, all M activation rows against it: the weights stream strictly sequentially. Several
  // rows interleaved (4 here before) are several short streams K elements apart, which an AMD Zen 4 core's
  // prefetchers followed at 13.5 GB/s against 23-24 for one stream (SmolLM2 fp32, one thread, decode profile);
  // llama.cpp's GEMV reads rows one after another too.
  for (int64_t row = n0; row < n1; ++row)
    tile_dot<1, M>(w + row * k, x, k, bias ? bias + row : nullptr, out + row, n, ahead);
}

static_assert(kGemvBlockRows == 8, "gemv_rows has one case per row count up to kGemvBlockRows");

// dpbf16: bf16 weights and activations on a CPU with AVX512-BF16 (the vdpbf16ps GEMV, up to kDpbf16GemvRows rows).
template <typename T>
void gemv_rows(const T* x, const T* w, const T* bias, T* out, int64_t m, int64_t n, int64_t k, int64_t n0, int64_t n1,
               bool dpbf16, int64_t ahead) {
#if LF_ISA_LEVEL == 2
  if constexpr (std::is_same<T, uint16_t>::value) {
    if (dpbf16) return dpbf16_rows<kDpbf16GemvRows>(x, w, bias, out, m, n, k, n0, n1, ahead);
  }
#endif
  (void)dpbf16;
  switch (m) {
    case 1: return gemv_rows_m<T, 1>(x, w, bias, out, n, k, n0, n1, ahead);
    case 2: return gemv_rows_m<T, 2>(x, w, bias, out, n, k, n0, n1, ahead);
    case 3: return gemv_rows_m<T, 3>(x, w, bias, out, n, k, n0, n1, ahead);
    case 4: return gemv_rows_m<T, 4>(x, w, bias, out, n, k, n0, n1, ahead);
    case 5: return gemv_rows_m<T, 5>(x, w, bias, out, n, k, n0, n1, ahead);
    case 6: return gemv_rows_m<T, 6>(x, w, bias, out, n, k, n0, n1, ahead);
    case 7: return gemv_rows_m<T, 7>(x, w, bias, out, n, k, n0, n1, ahead);
    default: return gemv_rows_m<T, 8>(x, w, bias, out, n, k, n0, n1, ahead);
  }
}

// Rows n0..n1-1 of out[m, n] for a batch of activation rows (xf: them in fp32): the tiled kernel
// over the weights in place (fp32) or widened a block of rows at a time (bf16).
template <typename T>
void dense_tiled_rows(const float* xf, const T* w, const T* bias, T* out, int64_t m, int64_t n, int64_t k, int64_t n0,
                      int64_t n1) {
  const int64_t row_bytes = k * static_cast<int64_t>(sizeof(T));
  tiled_rows<T>(xf, m, k, bias, out, n, n0, n1, w, row_bytes,
                [&](int64_t row, int count, float* buffer) -> const float* {
                  const T* src = w + row * k;
                  if constexpr (std::is_same<T, float>::value) {
                    (void)count, (void)buffer;
                    return src;
                  } else {
                    constexpr int W = VecF::W;
                    const int64_t total = count * k;
                    int64_t i = 0;
                    for (; i + W <= total; i += W) VecF::load(src + i).store(buffer + i);
                    for (; i < total; ++i) buffer[i] = to_f32(src[i]);
                    return buffer;
                  }
                });
}

}  // namespace LF_ISA
}  // namespace cpu
}  // namespace llama_fast
#endif
