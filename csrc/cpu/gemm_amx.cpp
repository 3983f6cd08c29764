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
// Blocking: the activations are packed once per call into tiles of 16 rows x 32 K ([M/32][K/32][2][16][32]: the
// two M tiles of a pair adjacent), zero-padded in M and K. The weights are split over the threads in pairs of 16-row
// N blocks; a thread packs a pair into the VNNI layout TDPBF16PS wants ([K/32][16 K pairs][16 n][2], zero-padded in
// N and K, 2 x K x 32 bytes: L1 / L2 resident) and multiplies it with every pair of M tiles: 2 x 2 fp32 accumulator
// tiles (tmm0-3), two A tiles (tmm4-5), two B tiles (tmm6-7), so each tile load feeds two TDPBF16PS. Each weight is
// read from memory once per call; the packed activations (as large as x) are re-read once per pair of N blocks,
// from L2 / L3.
#include "cpu/gemm_amx.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "common/half_float.h"
#include "cpu/amx_tiles.h"
#include "cpu/thread_pool.h"

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

// Rows [r0, r0 + 16) of x (zero past m) as the K tiles of one 16-row M tile: dst[kb][16][32], zero past k.
void pack_a_tile(const uint16_t* x, int64_t m, int64_t k, int64_t r0, int64_t kblocks, int64_t tile_stride,
                 uint16_t* dst) {
  for (int i = 0; i < kTileRows; ++i) {
    const int64_t row = r0 + i;
    for (int64_t kb = 0; kb < kblocks; ++kb) {
      uint16_t* d = dst + kb * tile_stride + i * kTileK;
      const int64_t k0 = kb * kTileK, len = row < m ? std::min<int64_t>(kTileK, k - k0) : 0;
      const __mmask32 mask = len >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((uint64_t{1} << len) - 1u);
      _mm512_storeu_si512(d, _mm512_maskz_loadu_epi16(mask, row < m ? x + row * k + k0 : x));
    }
  }
}

// Weight rows [n0, n0 + 16) (zero past n) in TDPBF16PS's B layout: dst[kb][p][j][2] = w[n0 + j][kb*32 + 2p + {0,1}],
// zero past k.
void pack_b_tile(const uint16_t* w, int64_t n, int64_t k, int64_t n0, int64_t kblocks, int64_t tile_stride,
                 uint16_t* dst) {
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    uint32_t* d = reinterpret_cast<uint32_t*>(dst + kb * tile_stride);  // [16 pairs][16 j] of bf16 pairs
    const int64_t k0 = kb * kTileK, len = std::min<int64_t>(kTileK, k - k0);
    const __mmask32 mask = len >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((uint64_t{1} << len) - 1u);
    alignas(64) uint32_t rows[kTileRows][kTileRows];  // [j][pair]: row j's 32 elements as 16 pairs
    for (int j = 0; j < kTileRows; ++j) {
      const __m512i v = n0 + j < n ? _mm512_maskz_loadu_epi16(mask, w + (n0 + j) * k + k0) : _mm512_setzero_si512();
      _mm512_store_si512(rows[j], v);
    }
    for (int p = 0; p < kTileRows; ++p)  // a 16 x 16 transpose of 32-bit pairs
      for (int j = 0; j < kTileRows; ++j) d[p * kTileRows + j] = rows[j][p];
  }
}

}  // namespace

void gemm_amx_bf16(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* out, int64_t m, int64_t n,
                   int64_t k) {
  if (m <= 0 || n <= 0) return;
  const int64_t kblocks = (k + kTileK - 1) / kTileK;
  const int64_t tile = kTileRows * kTileK;  // bf16 elements per tile
  const int64_t mpairs = (m + 2 * kTileRows - 1) / (2 * kTileRows), npairs = (n + 2 * kTileRows - 1) / (2 * kTileRows);
  // activations: [mpair][kb][2][16][32], every element written by pack_a_tile. Kept by the calling thread across
  // calls (grown, never zero-filled again): a fresh vector per linear cost a zero fill and page faults each time.
  thread_local std::vector<uint16_t> apack;
  if (apack.size() < static_cast<size_t>(mpairs * kblocks * 2 * tile))
    apack.resize(static_cast<size_t>(mpairs * kblocks * 2 * tile));
  // the lambdas below run on the pool's threads too, where `apack` names each thread's own (empty) vector
  uint16_t* const ap = apack.data();
  parallel_for(mpairs, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int h = 0; h < 2; ++h)
        pack_a_tile(x, m, k, (2 * p + h) * kTileRows, kblocks, 2 * tile, ap + (p * kblocks * 2 + h) * tile);
  });
  const int64_t per_thread = (npairs + num_threads() - 1) / num_threads();
  parallel_for(npairs, per_thread, [&](int64_t q0, int64_t q1) {
    configure_tiles();
    thread_local std::vector<uint16_t> bpack;  // [kb][2][16][32]
    bpack.resize(static_cast<size_t>(kblocks * 2 * tile));
    alignas(64) float c[4][kTileRows][kTileRows];
    for (int64_t q = q0; q < q1; ++q) {
      for (int h = 0; h < 2; ++h)
        pack_b_tile(w, n, k, (2 * q + h) * kTileRows, kblocks, 2 * tile, bpack.data() + h * tile);
      for (int64_t p = 0; p < mpairs; ++p) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        const uint16_t* a = ap + p * kblocks * 2 * tile;
        for (int64_t kb = 0; kb < kblocks; ++kb) {
          _tile_loadd(4, a + kb * 2 * tile, 64);
          _tile_loadd(5, a + kb * 2 * tile + tile, 64);
          _tile_loadd(6, bpack.data() + kb * 2 * tile, 64);
          _tile_loadd(7, bpack.data() + kb * 2 * tile + tile, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, c[0], 64);
        _tile_stored(1, c[1], 64);
        _tile_stored(2, c[2], 64);
        _tile_stored(3, c[3], 64);
        for (int t = 0; t < 4; ++t) {  // tile t: M half t / 2, N half t % 2
          const int64_t col0 = (2 * q + t % 2) * kTileRows, row0 = (2 * p + t / 2) * kTileRows;
          if (col0 >= n) continue;
          const int cols = static_cast<int>(std::min<int64_t>(kTileRows, n - col0));
          alignas(64) float bias_f[kTileRows] = {};
          if (bias != nullptr)
            for (int j = 0; j < cols; ++j) bias_f[j] = bf16_bits_to_float(bias[col0 + j]);
          const __m512 b = _mm512_load_ps(bias_f);
          for (int i = 0; i < kTileRows && row0 + i < m; ++i)
            store_bf16(out + (row0 + i) * n + col0, _mm512_add_ps(_mm512_load_ps(c[t][i]), b), cols);
        }
      }
    }
    _tile_release();
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

}  // namespace cpu
}  // namespace llama_fast
