// The bf16 GEMM on Intel AMX (Sapphire Rapids and later): TDPBF16PS multiplies a 16 x 32 bf16 tile of activations
// with a 32 x 16 bf16 tile of weights into a 16 x 16 fp32 tile, ~16x the multiply-adds per cycle of AVX-512 FMAs.
// On such CPUs ATen's bf16 GEMM (oneDNN) uses it, and our fp32 GEMM (gemm.cpp) prefilled a bf16 model at 0.4x
// transformers' speed (docs/AMX_PLAN.md); this brings the bf16 prefill onto the same unit.
//
// Exactness: a bf16 x bf16 product is exact in fp32 and TDPBF16PS accumulates in fp32 (round to nearest even), so
// each output is a fp32 sum of the exact products like gemm.cpp's, in another order. Unlike FMAs, TDPBF16PS reads
// bf16 denormal inputs (|v| < 1.2e-38) as zero and flushes fp32 denormal results: it drops terms below 1e-38 in
// absolute value, far below the bf16 rounding of any output that holds a normal-sized term.
//
// Operands: TDPBF16PS wants its B operand in a pair-interleaved ("VNNI") layout and its A operand row-major, 16
// rows x 32 K. The weights w[N][K] are row-major already, so they are the A operand, tile-loaded in place (stride
// K): no weight packing, which per call cost as much as the multiplies at 128 rows and dominated at decode sizes.
// The activations are packed once per call into the B layout (a vectorized 16 x 16 transpose of bf16 pairs per
// 16 x 32 block), and the fp32 output tiles come out as [n][m], transposed back when written.
//
// Blocking: 2 x 2 accumulator tiles (tmm0-3) = a pair of 16-row weight blocks (tmm4-5) x a pair of 16-row
// activation tiles (tmm6-7), so each tile load feeds two TDPBF16PS. The weight pairs are split over the threads
// in contiguous ranges, walked in chunks of up to half of L2 (the weights of a chunk are read from memory once
// per call, on the pass of the first activation pair, which prefetches the next pair's rows into L2; the other
// passes find them in L2), and each chunk is run against every activation pair, whose packed tiles (K x 64 bytes)
// stay in L1 across the chunk's weight pairs. A block's output (tile store, transpose, bias, rounding: ~270 vector
// instructions per tile) is written out one tile per two K steps of the next block, so that it overlaps the tile
// unit's multiplies instead of following them.
#include "cpu/gemm_amx.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "common/half_float.h"
#include "cpu/amx_tiles.h"
#include "cpu/cpu_features.h"
#include "cpu/thread_pool.h"
#include "cpu/tuning.h"

#ifdef LF_AMX
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace llama_fast {
namespace cpu {

#ifdef LF_AMX
namespace {

constexpr long kArchReqXcompPerm = 0x1023;  // arch_prctl: ask for an XSAVE feature's state (Linux >= 5.16)
constexpr long kXfeatureXtiledata = 18;     // the AMX tile data

bool detect_amx() {
  const char* env = std::getenv("LLAMA_FAST_AMX");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx512bf16")) return false;
  // CPUID leaf 7 EDX: bit 22 AMX-BF16, bit 24 AMX-TILE (gcc 12's __builtin_cpu_supports has no AMX names)
  unsigned eax, ebx, ecx, edx;
  __asm__("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(7), "c"(0));
  if (!((edx >> 22) & 1u) || !((edx >> 24) & 1u)) return false;
  // Linux hands out the 8 KiB tile state only on request; without it the first tile instruction raises SIGILL.
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

using amx::kTileK;
using amx::kTileRows;

}  // namespace

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
// GCC 12 warns that the AVX-512 shift / widen intrinsics' internal _mm512_undefined_* placeholders "may be used
// uninitialized" when inlined into a function outside the target's own translation defaults: a false positive.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace {

// 8 tiles of 16 rows x 64 bytes (amx::configure_tiles): C00 C01 C10 C11 (fp32), A0 A1, B0 B1 (bf16).
using amx::configure_tiles;
using amx::store_bf16;

// In-place transpose of a 16 x 16 matrix of 32-bit elements held as 16 rows: r[j] becomes column j. Four rounds
// of 16 two-source shuffles (the usual unpack 32 / unpack 64 / 128-bit lane shuffles).
inline void transpose_16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int h = 0; h < 16; h += 8)
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_i32x4(r[h + i], r[h + i + 4], 0x88);
      t[h + i + 4] = _mm512_shuffle_i32x4(r[h + i], r[h + i + 4], 0xdd);
    }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
  }
}

inline __mmask32 first_lanes32(int64_t count) {
  return count >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((uint32_t{1} << count) - 1u);
}

// Rows [r0, r0 + 32) of x (zero past m) in TDPBF16PS's B layout, the two 16-row halves of each K block adjacent:
// dst[kb][h][p][i][2] = x[r0 + 16h + i][32kb + 2p + {0, 1}], zero past k. Each 16 x 32 block of x is 16 rows of
// 16 bf16 pairs: a 16 x 16 transpose of 32-bit elements.
void pack_x_pair(const uint16_t* x, int64_t m, int64_t k, int64_t r0, int64_t kblocks, uint16_t* dst) {
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    const int64_t k0 = kb * kTileK;
    const __mmask32 mask = first_lanes32(k - k0);
    for (int h = 0; h < 2; ++h) {
      __m512i r[kTileRows];
      for (int i = 0; i < kTileRows; ++i) {
        const int64_t row = r0 + h * kTileRows + i;
        r[i] = row < m ? _mm512_maskz_loadu_epi16(mask, x + row * k + k0) : _mm512_setzero_si512();
      }
      transpose_16x16(r);
      uint16_t* d = dst + (kb * 2 + h) * kTileRows * kTileK;
      for (int p = 0; p < kTileRows; ++p) _mm512_storeu_si512(d + p * kTileK, r[p]);
    }
  }
}

// Where the tiles of one pair of 16-row weight blocks (rows n0 .. n0 + 31) are read from. The weights are the A
// operand (rows = output columns), which is their own row-major layout: full tiles are loaded from w in place
// (stride k). What a tile would read past the weights' end is copied, zero-padded, into `own`: the K tail
// (k % 32 elements) of every row, and the whole pair when it holds rows past n.
struct WeightPair {
  const uint16_t* rows;  // first row's first element
  int64_t stride;        // elements between rows
  int64_t full_blocks;   // K blocks read from `rows`
  const uint16_t* tail;  // the K block after them ([32 rows][32], stride 32) or nullptr
};

WeightPair weight_pair(const uint16_t* w, int64_t n, int64_t k, int64_t n0, int64_t kblocks,
                       std::vector<uint16_t>& own) {
  const int64_t full = k / kTileK, rows = std::min<int64_t>(2 * kTileRows, n - n0);
  if (rows == 2 * kTileRows) {
    if (full == kblocks) return {w + n0 * k, k, full, nullptr};
    own.assign(2 * kTileRows * kTileK, 0);
    for (int64_t j = 0; j < rows; ++j)
      std::memcpy(own.data() + j * kTileK, w + (n0 + j) * k + full * kTileK, (k - full * kTileK) * sizeof(uint16_t));
    return {w + n0 * k, k, full, own.data()};
  }
  const int64_t width = kblocks * kTileK;  // rows past n stay zero, and so does each row's K padding
  own.assign(2 * kTileRows * width, 0);
  for (int64_t j = 0; j < rows; ++j) std::memcpy(own.data() + j * width, w + (n0 + j) * k, k * sizeof(uint16_t));
  return {own.data(), width, kblocks, nullptr};
}

// The output block of one weight pair x one activation pair: 2 x 2 accumulator tiles (tmm0..3: weight half t / 2 x
// activation half t % 2, each [16 n][16 m] fp32), stored by store_tiles and written out later, one tile per
// finish_tile call, while the next block's multiplies run: the tile unit works on its own, and the transposes and
// roundings of one block's output (~270 vector instructions per tile) then overlap the next block's TDPBF16PS.
struct OutputBlock {
  alignas(64) float c[4][kTileRows][kTileRows];
  int64_t r0 = 0, n0 = 0;  // its first output row and column
  int next = 4;            // the next tile to write out; 4: nothing pending
};

// The block's tiles that hold outputs (rows below m, columns below n) into blk.c.
void store_tiles(OutputBlock& blk, int64_t m, int64_t n, int64_t r0, int64_t n0) {
  blk.r0 = r0, blk.n0 = n0, blk.next = 0;
  const bool m_hi = r0 + kTileRows < m, n_hi = n0 + kTileRows < n;
  _tile_stored(0, blk.c[0], 64);
  if (m_hi) _tile_stored(1, blk.c[1], 64);
  if (n_hi) _tile_stored(2, blk.c[2], 64);
  if (m_hi && n_hi) _tile_stored(3, blk.c[3], 64);
}

// Tile blk.next of a stored block plus the bias, transposed to [m][n] and rounded to bf16 into out (rows below m,
// columns below n); tiles wholly past m or n are skipped.
void finish_tile(OutputBlock& blk, uint16_t* out, const uint16_t* bias, int64_t m, int64_t n) {
  const int t = blk.next++;
  const int64_t col0 = blk.n0 + (t / 2) * kTileRows, row0 = blk.r0 + (t % 2) * kTileRows;
  if (col0 >= n || row0 >= m) return;
  const int cols = static_cast<int>(std::min<int64_t>(kTileRows, n - col0));
  const __mmask16 col_mask = static_cast<__mmask16>((1u << cols) - 1u);
  // bf16 bias to fp32: the bits shifted up, exact
  const __m512 b = bias == nullptr ? _mm512_setzero_ps()
                                   : _mm512_castsi512_ps(_mm512_slli_epi32(
                                         _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(col_mask, bias + col0)), 16));
  __m512i r[kTileRows];
  for (int j = 0; j < kTileRows; ++j) r[j] = _mm512_load_si512(blk.c[t][j]);
  transpose_16x16(r);  // r[i]: output row row0 + i, columns col0 ..
  const int rows = static_cast<int>(std::min<int64_t>(kTileRows, m - row0));
  for (int i = 0; i < rows; ++i)
    store_bf16(out + (row0 + i) * n + col0, _mm512_add_ps(_mm512_castsi512_ps(r[i]), b), cols);
}

// One K block of a weight pair against an activation pair: the two weight blocks' tiles (rows w0 and w1, `stride`
// bytes apart) into tmm4-5, the activation tiles (a, a + tile) into tmm6-7, the four products into C tiles tmm0-3.
inline void multiply_2x2(const uint16_t* w0, const uint16_t* w1, int64_t stride, const uint16_t* a, int64_t tile) {
  _tile_loadd(4, w0, stride);
  _tile_loadd(5, w1, stride);
  _tile_loadd(6, a, 64);
  _tile_loadd(7, a + tile, 64);
  _tile_dpbf16ps(0, 4, 6);
  _tile_dpbf16ps(1, 4, 7);
  _tile_dpbf16ps(2, 5, 6);
  _tile_dpbf16ps(3, 5, 7);
}

// The L2 prefetch of a byte range spread over `steps` calls: part `step` of it (64-byte lines).
inline void prefetch_part(const char* begin, const char* end, int64_t step, int64_t steps) {
  const int64_t lines = (end - begin + 63) / 64, per = (lines + steps - 1) / steps;
  for (int64_t l = step * per; l < std::min(lines, (step + 1) * per); ++l) _mm_prefetch(begin + l * 64, _MM_HINT_T1);
}

}  // namespace

void gemm_amx_bf16(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* out, int64_t m, int64_t n,
                   int64_t k) {
  if (m <= 0 || n <= 0) return;
  const int64_t kblocks = (k + kTileK - 1) / kTileK;
  const int64_t tile = kTileRows * kTileK;  // bf16 elements per tile
  const int64_t mpairs = (m + 2 * kTileRows - 1) / (2 * kTileRows), npairs = (n + 2 * kTileRows - 1) / (2 * kTileRows);
  // activations: [mpair][kb][2][16][32], every element written by pack_x_pair. Kept by the calling thread across
  // calls (grown, never zero-filled again): a fresh vector per linear cost a zero fill and page faults each time.
  thread_local std::vector<uint16_t> xpack;
  if (xpack.size() < static_cast<size_t>(mpairs * kblocks * 2 * tile))
    xpack.resize(static_cast<size_t>(mpairs * kblocks * 2 * tile));
  // the lambdas below run on the pool's threads too, where `xpack` names each thread's own (empty) vector
  uint16_t* const xp = xpack.data();
  parallel_for(mpairs, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) pack_x_pair(x, m, k, 2 * p * kTileRows, kblocks, xp + p * kblocks * 2 * tile);
  });
  // Each thread takes a contiguous range of weight pairs and walks it in chunks that fit in half of L2: the first
  // pass over a chunk (activation pair 0) streams its weights from memory, prefetching the next pair's rows into
  // L2 while it computes; the other activation pairs find the chunk in L2, and each activation pair's tiles
  // (k x 64 bytes) stay in L1 across the chunk's weight pairs.
  const int64_t per_thread = (npairs + num_threads() - 1) / num_threads();
  const int64_t l2 = tuning().l2_bytes > 0 ? tuning().l2_bytes : (int64_t{1} << 20);
  const int64_t chunk = std::max<int64_t>(1, l2 / 2 / (2 * kTileRows * kblocks * kTileK * 2));
  parallel_for(npairs, per_thread, [&](int64_t q0, int64_t q1) {
    configure_tiles();
    thread_local std::vector<std::vector<uint16_t>> own;  // per pair of a chunk: its copied tiles
    thread_local std::vector<WeightPair> pairs;
    OutputBlock blocks[2];  // the block being written out and the one being computed, alternating
    int cur = 0;
    for (int64_t c0 = q0; c0 < q1; c0 += chunk) {
      const int64_t c1 = std::min(q1, c0 + chunk);
      if (static_cast<int64_t>(own.size()) < c1 - c0) own.resize(c1 - c0);
      pairs.clear();
      for (int64_t q = c0; q < c1; ++q) pairs.push_back(weight_pair(w, n, k, 2 * q * kTileRows, kblocks, own[q - c0]));
      for (int64_t p = 0; p < mpairs; ++p) {
        const uint16_t* a = xp + p * kblocks * 2 * tile;
        for (int64_t q = c0; q < c1; ++q) {
          const WeightPair& wp = pairs[q - c0];
          OutputBlock& prev = blocks[cur ^ 1];
          // on the first pass, the next pair's rows (contiguous in w) into L2 over this pair's K loop
          const bool fetch = p == 0 && q + 1 < q1;
          const char* next = reinterpret_cast<const char*>(w + std::min(n, 2 * (q + 1) * kTileRows) * k);
          const char* next_end = reinterpret_cast<const char*>(w + std::min(n, 2 * (q + 2) * kTileRows) * k);
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
          const int64_t stride = wp.stride * 2;
          for (int64_t kb = 0; kb < wp.full_blocks; ++kb) {
            if (fetch) prefetch_part(next, next_end, kb, wp.full_blocks);
            multiply_2x2(wp.rows + kb * kTileK, wp.rows + kTileRows * wp.stride + kb * kTileK, stride,
                         a + kb * 2 * tile, tile);
            if ((kb & 1) && prev.next < 4) finish_tile(prev, out, bias, m, n);  // every other K block: one tile
          }
          if (wp.tail != nullptr) {
            const int64_t kb = wp.full_blocks;
            multiply_2x2(wp.tail, wp.tail + tile, 64, a + kb * 2 * tile, tile);
          }
          while (prev.next < 4) finish_tile(prev, out, bias, m, n);  // short K: what the loop left
          store_tiles(blocks[cur], m, n, 2 * p * kTileRows, 2 * q * kTileRows);
          cur ^= 1;
        }
      }
    }
    _tile_release();
    OutputBlock& last = blocks[cur ^ 1];
    while (last.next < 4) finish_tile(last, out, bias, m, n);
  });
}

#pragma GCC diagnostic pop
#pragma GCC pop_options

bool amx_bf16_available() {
  static const bool available = detect_amx();
  return available;
}

#else  // not x86-64 Linux

bool amx_bf16_available() { return false; }
void gemm_amx_bf16(const uint16_t*, const uint16_t*, const uint16_t*, uint16_t*, int64_t, int64_t, int64_t) {}

#endif

bool amx_in_effect() { return isa() >= Isa::kAvx512Bf16 && amx_bf16_available(); }

}  // namespace cpu
}  // namespace llama_fast
