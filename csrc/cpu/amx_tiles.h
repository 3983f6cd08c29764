// Internal to the AMX kernels (gemm_amx.cpp, gemm_amx_quant.cpp): the tile shape both use, the tile configuration
// and the fp32 -> bf16 store. Include it only where amx_bf16_available() gates the calls; it compiles its functions
// for AMX / AVX-512 whatever the translation unit's own target.
#pragma once
#if defined(__x86_64__) && defined(__linux__)
#define LF_AMX 1
#include <immintrin.h>

#include <cstdint>

namespace llama_fast {
namespace cpu {
namespace amx {

constexpr int kTileRows = 16;  // rows of every tile here
constexpr int kTileK = 32;     // bf16 elements per tile row (64 bytes): the K depth of one TDPBF16PS

struct TileConfig {
  uint8_t palette_id, start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")

// Loads a tile configuration. GCC 12's _tile_loadconfig does not tell the optimizer that it reads *cfg: with the
// configuration filled in by a loop, the stores were removed as dead and LDTILECFG faulted on the rows / colsb it
// found (zero). The empty asm takes cfg's address and clobbers memory, so the stores happen first.
inline void load_tile_config(const TileConfig& cfg) {
  asm volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

// A configuration of all 8 tiles as 16 rows x 64 bytes, for a kernel to reshape some of them before loading it.
inline TileConfig full_tiles() {
  TileConfig cfg{};
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = kTileRows;
    cfg.colsb[t] = 64;
  }
  return cfg;
}

// All 8 tiles as 16 rows x 64 bytes. Tile state is thread state: configure it on each thread that runs tile
// instructions and _tile_release() it after that thread's work (a configured state makes each context switch save
// 8 KiB).
inline void configure_tiles() { load_tile_config(full_tiles()); }

// 16 fp32 to bf16, rounded to nearest even like float_to_bf16_bits (NaN stays NaN): the first `count` lanes stored.
inline void store_bf16(uint16_t* p, __m512 v, int count) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
  _mm256_mask_storeu_epi16(p, static_cast<__mmask16>((1u << count) - 1u), _mm512_cvtepi32_epi16(r));
}

#pragma GCC pop_options

}  // namespace amx
}  // namespace cpu
}  // namespace llama_fast
#endif
