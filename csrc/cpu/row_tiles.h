// The multi-row linear micro-kernel shared by linear.cpp (dense) and quant_linear.cpp (int4 / int8): for a
// batch of activation rows (a batched decode step, or a decode step with a prefill chunk riding along), each
// block of kTileWeightRows weight rows is made fp32 once (the dense fp32 weights are used in place; bf16 weights
// are widened, quantized ones dequantized, into a per-thread buffer that stays in L1) and then multiplied with
// every activation row, kTileActRows at a time, in registers. So the weights are read from memory once per
// call whatever the number of rows, and the per-row work is only the FMAs (FMA-bound, not load-bound: a 4 x 6
// tile does 24 FMAs per 10 loads).
//
// Included inside an ISA pass of cpu/foreach_isa.h (after cpu/simd.h): no include guard on purpose, one copy per
// LF_ISA namespace.
namespace llama_fast {
namespace cpu {
namespace LF_ISA {

constexpr int kTileWeightRows = 4;  // weight rows per block (4 x K fp32: 9 KiB for K = 576, 24 KiB for 1536)
constexpr int kTileActRows = 6;     // activation rows per register tile: 24 accumulators + 6 x + 1 w of 32

// The weights are read once per call: ask for them cpu::tuning().prefetch_bytes ahead of use (from the L1d size).
// The hardware prefetcher alone left the int4/int8 kernels at half a core's DRAM share (see
// quant_linear_vnni.cpp), and bf16 decode at 70% of the bandwidth (61 -> 68-72 tok/s on the demo model with 8 KiB).
// `ahead` is read from tuning() once per kernel call by the caller: tuning() is an out-of-line call (a function-local
// static behind a guard), which once per cache line held the bf16 GEMV at ~15 GB/s of compute on a Zen 4 core.
inline void prefetch_ahead(const void* p, int64_t ahead) {
#ifdef LF_HAVE_X86
  _mm_prefetch(static_cast<const char*>(p) + ahead, _MM_HINT_T0);
#else
  (void)p, (void)ahead;
#endif
}

// out[mm * ldo + r] (+ bias[r]) for r < R, mm < M: dot products of R weight rows (stride k) with M activation
// rows (stride k), both fp32 or both bf16 (Tin), fp32 accumulation; also the GEMV kernels' block (linear.cpp).
template <int R, int M, typename Tin, typename T>
void tile_dot(const Tin* w, const Tin* x, int64_t k, const T* bias, T* out, int64_t ldo, int64_t ahead = 0) {
  constexpr int W = VecF::W;
  VecF acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int mm = 0; mm < M; ++mm) acc[r][mm] = VecF::zero();
  int64_t kk = 0;
  for (; kk + W <= k; kk += W) {
    VecF xv[M];
    for (int mm = 0; mm < M; ++mm) xv[mm] = VecF::load(x + mm * k + kk);
    for (int r = 0; r < R; ++r) {
      // ahead: from the caller (linear.cpp's GEMVs, tuning.h), 0 = no software prefetch
      if (ahead > 0 && (kk * sizeof(Tin)) % 64 == 0) prefetch_ahead(w + r * k + kk, ahead);  // once per line
      const VecF wv = VecF::load(w + r * k + kk);
      for (int mm = 0; mm < M; ++mm) acc[r][mm] = VecF::fma(wv, xv[mm], acc[r][mm]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int mm = 0; mm < M; ++mm) {
      float s = acc[r][mm].sum();
      for (int64_t t = kk; t < k; ++t) s += to_f32(w[r * k + t]) * to_f32(x[mm * k + t]);
      if (bias != nullptr) s += to_f32(bias[r]);
      out[mm * ldo + r] = from_f32<T>(s);
    }
  }
}

// All m activation rows against R weight rows, in ceil(m / kTileActRows) tiles of near-equal size (8 rows: 4 + 4,
// not 6 + 2, whose 8 accumulators leave the FMA units half idle). Every output's sum runs in the same order
// whatever the tile, so the result does not depend on m.
template <int R, typename T>
void tile_rows(const float* w, const float* x, int64_t m, int64_t k, const T* bias, T* out, int64_t ldo) {
  static_assert(kTileActRows == 6, "one case per tile size below");
  const int64_t tiles = (m + kTileActRows - 1) / kTileActRows;
  int64_t m0 = 0;
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t rows = (m - m0) / (tiles - tile);  // the larger tiles last
    const float* xs = x + m0 * k;
    T* os = out + m0 * ldo;
    switch (rows) {
      case 1: tile_dot<R, 1>(w, xs, k, bias, os, ldo); break;
      case 2: tile_dot<R, 2>(w, xs, k, bias, os, ldo); break;
      case 3: tile_dot<R, 3>(w, xs, k, bias, os, ldo); break;
      case 4: tile_dot<R, 4>(w, xs, k, bias, os, ldo); break;
      case 5: tile_dot<R, 5>(w, xs, k, bias, os, ldo); break;
      default: tile_dot<R, 6>(w, xs, k, bias, os, ldo); break;
    }
    m0 += rows;
  }
}

// out[mm * ldo + j] for j in [n0, n1): weight rows n0..n1-1 against the m fp32 activation rows x [m, K].
// fp32_rows(row, count, buffer) returns `count` consecutive weight rows from `row` as fp32 [count, K] (in the
// same element order as x): a pointer into the weights, or `buffer` (kTileWeightRows x K floats) filled.
template <typename T, typename Fp32Rows>
void tiled_rows(const float* x, int64_t m, int64_t k, const T* bias, T* out, int64_t ldo, int64_t n0, int64_t n1,
                Fp32Rows fp32_rows) {
  thread_local std::vector<float> buffer;  // this worker thread's own
  buffer.resize(kTileWeightRows * k);
  int64_t row = n0;
  for (; row + kTileWeightRows <= n1; row += kTileWeightRows) {
    const float* w = fp32_rows(row, kTileWeightRows, buffer.data());
    tile_rows<kTileWeightRows>(w, x, m, k, bias ? bias + row : nullptr, out + row, ldo);
  }
  for (; row < n1; ++row)
    tile_rows<1>(fp32_rows(row, 1, buffer.data()), x, m, k, bias ? bias + row : nullptr, out + row, ldo);
}

}  // namespace LF_ISA
}  // namespace cpu
}  // namespace llama_fast
