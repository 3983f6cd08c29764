// The multi-row linear micro-kernel shared by linear.cpp (dense) and quant_linear.cpp (int4 / int8): for a
// batch of activation rows (a batched decode step, or a decode step with a prefill chunk riding along), each
// block of kTileWeightRows weight rows is made fp32 once (the dense fp32 weights are used in place; bf16 weights
// are widened, quantized ones dequantized, into a per-thread buffer that stays in L1) and then multiplied with
// every activation row, up to kTileActRows at a time, in registers. So the weights are read from memory once per
// call whatever the number of rows, and the per-row work is only the FMAs (FMA-bound, not load-bound: a 4 x 6
// tile does 24 FMAs per 10 loads, AVX2's 3 x 4 12 per 7).
//
// Included inside an ISA pass of cpu/foreach_isa.h (after cpu/simd.h): no include guard on purpose, one copy per
// LF_ISA namespace.
namespace llama_fast {
namespace cpu {
namespace LF_ISA {

// The register tile, a property of the ISA's register file: kTileWeightRows x kTileActRows accumulators, plus the
// vectors of whichever operand the K step holds (the smaller count: tile_dot) and one of the other, must fit the
// vector registers, or accumulators spill to the stack inside the inner loop (a load and a store per FMA on them).
// AVX-512 (32 zmm): 4 x 6, 24 + 6 + 1 = 31. AVX2 and the portable pass (16 ymm / xmm): 3 x 4, 12 + 3 + 1 = 16.
// AVX2 had the 4 x 6 tile until it was measured on a Zen 3 core: it kept 9 of its 24 accumulators on the stack and
// ran at ~20 G multiply-adds/s (weights in L2) where the FMA units peak at ~50; 3 x 4 runs at 33-38, 4 x 3 at
// 37 for 3, 6, 9 or 12 rows but 21 for 4 (two 2-row tiles) and 33 for 8 and 16 (tiles of 2 and 3) -- batches are
// mostly 4, 8, 16 rows, which 4-row tiles split evenly (docs/KERNELS.md).
#if LF_ISA_LEVEL == 2
constexpr int kTileWeightRows = 4;  // weight rows per block (4 x K fp32: 9 KiB for K = 576, 24 KiB for 1536)
constexpr int kTileActRows = 6;     // activation rows per register tile
constexpr int kVectorRegisters = 32;
#else
constexpr int kTileWeightRows = 3;
constexpr int kTileActRows = 4;
constexpr int kVectorRegisters = 16;
#endif
static_assert(kTileWeightRows * kTileActRows + std::min(kTileWeightRows, kTileActRows) + 1 <= kVectorRegisters,
              "the register tile, the operand a K step holds and one vector of the other fit the vector registers");

// The weight rows of a tiled call come in blocks of this many rows (callers align the threads' row ranges to it).
inline void tile_weight_rows_into(int64_t& rows) { rows = kTileWeightRows; }

// The weights are read once per call: the kernels ask for them ahead of use. The hardware prefetcher alone left the
// int4/int8 kernels at half a core's DRAM share (see quant_linear_vnni.cpp), and bf16 decode at 70% of the bandwidth
// (61 -> 68-72 tok/s on the demo model with 8 KiB ahead). The GEMVs' `ahead` (cpu::tuning().prefetch_bytes, from the
// L1d size) is read from tuning() once per kernel call by the caller: tuning() is an out-of-line call (a
// function-local static behind a guard), which once per cache line held the bf16 GEMV at ~15 GB/s of compute on a
// Zen 4 core.

// One line into L2 (the tiled kernel's next block: it waits a whole block of tiles for its use, see tiled_rows).
inline void prefetch_into_l2(const void* p) {
#ifdef LF_HAVE_X86
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1);
#else
  (void)p;
#endif
}

// The dense GEMVs' weight prefetch for M activation rows: into L1 for one row (as measured on the Intel Xeon and
// Zen 4), into L2 for more. With M rows each weight line takes M times the work, so the lines prefetched ahead wait
// longer for their use, and into L1 they hold its few fill buffers all that time: on the Zen 4 guest (2 threads,
// weights on huge pages, SmolLM2's 3072 x 576 bf16) the vdpbf16ps GEMV streamed 19-23 GB/s at 4 rows and 17-19 at 8
// with the prefetch into L1, 30-31 and 20-22 into L2 (one row: ~32 either way, the bandwidth).
template <int M>
inline void prefetch_gemv_weights(const void* p, int64_t ahead) {
#ifdef LF_HAVE_X86
  if constexpr (M == 1)
    _mm_prefetch(static_cast<const char*>(p) + ahead, _MM_HINT_T0);
  else
    _mm_prefetch(static_cast<const char*>(p) + ahead, _MM_HINT_T1);
#else
  (void)p, (void)ahead;
#endif
}

// Weight rows as stored, for the software prefetch of the tiled kernel (tiled_rows): every `every` K steps of the
// tiles, tile_dot fetches the line at `next` of each of the R rows (row r's at next + r * row_bytes) and moves on.
struct StoredRows {
  const char* next;   // the next line of the first row to fetch
  int64_t row_bytes;  // bytes per stored row
  int every;          // K steps per line
  int countdown;      // K steps until the next fetch
};

// out[mm * ldo + r] (+ bias[r]) for r < R, mm < M: dot products of R weight rows (stride k) with M activation
// rows (stride k), both fp32 or both bf16 (Tin), fp32 accumulation; also the GEMV kernels' block (linear.cpp).
// Each output is the same sum whatever R and M: per lane, products in K order; then the lanes (VecF::sum); then
// the tail past the last whole vector; then the bias.
// kPrefetch: fetch `stored` (the tiled kernel's next block) as the K steps pass; a template argument so that the
// GEMV kernels' loops (linear.cpp) stay as they were (a run-time test in the loop cost fp32 decode ~10%).
template <int R, int M, typename Tin, typename T, bool kPrefetch = false>
void tile_dot(const Tin* w, const Tin* x, int64_t k, const T* bias, T* out, int64_t ldo, int64_t ahead = 0,
              StoredRows* stored = nullptr) {
  constexpr int W = VecF::W;
  // Which operand a K step loads first and holds: the activations (M vectors, each weight vector then streams
  // through one register), unless the tile only fits the registers holding the R weight vectors instead (AVX2's
  // 3 x 4). Either order does the same FMAs on each accumulator.
  constexpr bool kHoldWeights = R * M + M + 1 > kVectorRegisters && R < M;
  VecF acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int mm = 0; mm < M; ++mm) acc[r][mm] = VecF::zero();
  [[maybe_unused]] const char* pf = kPrefetch ? stored->next : nullptr;
  [[maybe_unused]] const int64_t row_bytes = kPrefetch ? stored->row_bytes : 0;
  [[maybe_unused]] const int every = kPrefetch ? stored->every : 0;
  [[maybe_unused]] int countdown = kPrefetch ? stored->countdown : 0;
  int64_t kk = 0;
  for (; kk + W <= k; kk += W) {
    if constexpr (kPrefetch) {
      if (--countdown == 0) {
        countdown = every;
        for (int r = 0; r < R; ++r) prefetch_into_l2(pf + r * row_bytes);
        pf += 64;
      }
    }
    if constexpr (kHoldWeights) {
      VecF wv[R];
      for (int r = 0; r < R; ++r) wv[r] = VecF::load(w + r * k + kk);
      for (int mm = 0; mm < M; ++mm) {
        const VecF xv = VecF::load(x + mm * k + kk);
        for (int r = 0; r < R; ++r) acc[r][mm] = VecF::fma(wv[r], xv, acc[r][mm]);
      }
    } else {
      VecF xv[M];
      for (int mm = 0; mm < M; ++mm) xv[mm] = VecF::load(x + mm * k + kk);
      for (int r = 0; r < R; ++r) {
        // ahead: from the caller (linear.cpp's GEMVs, tuning.h), 0 = no software prefetch
        if (ahead > 0 && (kk * sizeof(Tin)) % 64 == 0) prefetch_gemv_weights<M>(w + r * k + kk, ahead);  // per line
        const VecF wv = VecF::load(w + r * k + kk);
        for (int mm = 0; mm < M; ++mm) acc[r][mm] = VecF::fma(wv, xv[mm], acc[r][mm]);
      }
    }
  }
  if constexpr (kPrefetch) {
    stored->next = pf;
    stored->countdown = countdown;
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

// tile_dot<R, rows> for a run-time rows in 1..M.
template <int R, int M, typename T>
inline void tile_dot_rows(int rows, const float* w, const float* x, int64_t k, const T* bias, T* out, int64_t ldo,
                          StoredRows* stored) {
  if constexpr (M > 1) {
    if (rows < M) return tile_dot_rows<R, M - 1>(rows, w, x, k, bias, out, ldo, stored);
  }
  if (stored != nullptr)
    tile_dot<R, M, float, T, true>(w, x, k, bias, out, ldo, 0, stored);
  else
    tile_dot<R, M, float, T, false>(w, x, k, bias, out, ldo);
}

// All m activation rows against R weight rows, in ceil(m / kTileActRows) tiles of near-equal size (AVX-512, 6-row
// tiles: 8 rows as 4 + 4, not 6 + 2, whose 8 accumulators leave the FMA units half idle). Every output's sum runs in
// the same order whatever the tile (tile_dot: per-lane sums over K in order, then the lanes, then the tail), so the
// result does not depend on m or on the ISA's tile shape.
template <int R, typename T>
void tile_rows(const float* w, const float* x, int64_t m, int64_t k, const T* bias, T* out, int64_t ldo,
               StoredRows* stored = nullptr, bool prefetch_in_every_tile = false) {
  const int64_t tiles = (m + kTileActRows - 1) / kTileActRows;
  int64_t m0 = 0;
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t rows = (m - m0) / (tiles - tile);  // the larger tiles last
    tile_dot_rows<R, kTileActRows>(static_cast<int>(rows), w, x + m0 * k, k, bias, out + m0 * ldo, ldo,
                                   tile == 0 || prefetch_in_every_tile ? stored : nullptr);
    m0 += rows;
  }
}

// out[mm * ldo + j] for j in [n0, n1): weight rows n0..n1-1 against the m fp32 activation rows x [m, K].
// fp32_rows(row, count, buffer) returns `count` consecutive weight rows from `row` as fp32 [count, K] (in the
// same element order as x): a pointer into the weights, or `buffer` (kTileWeightRows x K floats, on a cache line)
// filled. The weights as stored: row r's `row_bytes` bytes at weights + r * row_bytes.
//
// Each block is read from memory by its first tile (making it fp32 reads it too) and then multiplied from L1 by the
// rest, so without help the memory waits and the FMAs take turns: fp32 weights at 8 rows streamed at half the rate
// one row's GEMV reads them (Zen 3, 1 thread). So while a block is multiplied, the next block's stored bytes are
// prefetched, a line of each row every few K steps: weights used in place (fp32) are read as the first tile's K steps
// pass them, so their lines are spread over all of the block's tiles; a block made fp32 into the buffer (bf16, int4,
// int8) is read whole before its first tile, so its lines are all asked for during the first tile. The tiled kernel
// alone, SmolLM2's 3072 x 576 from memory, G multiply-adds/s, none / all in the first tile / spread: fp32 at 8 rows
// 16.7 / 22.6 / 28.8, 16 rows 23 / 27 / 33; int4 at 8 rows 25 with either (the spread version cost int4 / int8 ~5%
// op by op and in batched decode). Fetching two or more blocks ahead changed nothing measurable there, nor did
// fetching into L2 instead of L1; on the Zen 4 guest L2 is much better (2 threads, weights on huge pages, the same
// 3072 x 576 fp32, GB/s into L1 / into L2: 4 rows 17-18 / 26, 8 rows 17 / 26, 16 rows 13 / 15): lines fetched into L1
// a block ahead hold its few fill buffers until they are read, which caps the lines in flight.
template <typename T, typename Fp32Rows>
void tiled_rows(const float* x, int64_t m, int64_t k, const T* bias, T* out, int64_t ldo, int64_t n0, int64_t n1,
                const void* weights, int64_t row_bytes, Fp32Rows fp32_rows) {
  thread_local std::vector<float> storage;  // this worker thread's own
  storage.resize(kTileWeightRows * k + 64 / sizeof(float));
  // on a cache line, as torch's tensors and the callers' prepared activations are: a 32-byte load that straddles
  // two lines costs two (the tiled kernel with the weights in L2 was ~13% slower so, Zen 3)
  float* const buffer = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(storage.data()) + 63) & ~uintptr_t{63});
  const char* const base = static_cast<const char*>(weights);
  // K steps per line of the next block: over all of this block's tiles, or over its first
  constexpr int W = VecF::W;
  const int64_t tile_steps = k / W, lines = std::max<int64_t>(1, (row_bytes + 63) / 64);
  const int every_tile =
      static_cast<int>(std::max<int64_t>(1, (m + kTileActRows - 1) / kTileActRows * tile_steps / lines));
  const int first_tile = static_cast<int>(std::max<int64_t>(1, tile_steps / lines));
  StoredRows next{nullptr, row_bytes, 1, 1};
  const bool prefetch = tile_steps > 0;
  int64_t row = n0;
  for (; row + kTileWeightRows <= n1; row += kTileWeightRows) {
    next.next = base + (row + kTileWeightRows) * row_bytes;  // past n1: a prefetch never faults
    next.countdown = 1;
    const float* w = fp32_rows(row, kTileWeightRows, buffer);
    const bool in_place = w != buffer;
    next.every = in_place ? every_tile : first_tile;
    tile_rows<kTileWeightRows>(w, x, m, k, bias ? bias + row : nullptr, out + row, ldo, prefetch ? &next : nullptr,
                               in_place);
  }
  for (; row < n1; ++row) tile_rows<1>(fp32_rows(row, 1, buffer), x, m, k, bias ? bias + row : nullptr, out + row, ldo);
}

}  // namespace LF_ISA
}  // namespace cpu
}  // namespace llama_fast
