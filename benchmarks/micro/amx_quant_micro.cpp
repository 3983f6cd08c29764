// Step-1 microbenchmark for an exact AMX-BF16 GEMM on quantized weights (int4/int8 codes exact in bf16, fp32
// activations split into three bf16 digits hi/mid/lo): the arithmetic of the inner loop only, one thread,
// M=128, N=K=2048, group 32 (one TDPBF16PS K-depth). Per group: 3 TDPBF16PS per (M-block, N-block) into a zeroed
// fp32 tile, tile stored, out += scale[n] * C_g (one zmm of column scales). 2 C tiles (2 M-blocks) so one is
// scaled while the other is computed. Weights assumed already in VNNI B layout (packing cost not counted here;
// it is once per call per N chunk: K*16 bf16 per N-block, amortised over M/16 M-blocks).
// Build: g++ -O2 -march=sapphirerapids -o /tmp/amxq benchmarks/micro/amx_quant_micro.cpp
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <vector>

struct TileCfg { uint8_t palette, start; uint8_t r[14]; uint16_t colsb[16]; uint8_t rows[16]; };

int main() {
  if (syscall(SYS_arch_prctl, 0x1023, 18)) { puts("no AMX permission"); return 1; }
  const int M = 128, N = 2048, K = 2048, G = K / 32;
  // A panels: [digit][M/16][K/32][16 rows][32 bf16] (each 16x32 tile contiguous: stride 64 B)
  std::vector<uint16_t> A(3 * (size_t)M * K, 0x3f80);
  // B: [N/16][K/32][16 pairs][16 cols][2] = per tile 16 rows x 64 B
  std::vector<uint16_t> B((size_t)N * K, 0x3f80);
  std::vector<float> scale((size_t)N * G, 0.5f);
  std::vector<float> out((size_t)M * N, 0.f);
  TileCfg cfg{}; cfg.palette = 1;
  for (int t = 0; t < 8; t++) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
  _tile_loadconfig(&cfg);
  alignas(64) float c0[16 * 16], c1[16 * 16];
  auto run = [&]() {
    for (int nb = 0; nb < N / 16; nb++) {
      for (int mb = 0; mb < M / 16; mb += 2) {
        alignas(64) float acc0[16 * 16] = {}, acc1[16 * 16] = {};
        for (int g = 0; g < G; g++) {
          const uint16_t* bt = &B[((size_t)nb * G + g) * 512];
          _tile_loadd(6, bt, 64);
          _tile_zero(0); _tile_zero(1);
          for (int d = 0; d < 3; d++) {
            const uint16_t* a0 = &A[(((size_t)d * (M / 16) + mb) * G + g) * 512];
            const uint16_t* a1 = &A[(((size_t)d * (M / 16) + mb + 1) * G + g) * 512];
            _tile_loadd(2, a0, 64); _tile_loadd(3, a1, 64);
            _tile_dpbf16ps(0, 2, 6); _tile_dpbf16ps(1, 3, 6);
          }
          _tile_stored(0, c0, 64); _tile_stored(1, c1, 64);
          __m512 s = _mm512_set1_ps(scale[(size_t)nb * 16 * G + g]);  // stands for the column-scale zmm
          for (int r = 0; r < 16; r++) {
            _mm512_store_ps(acc0 + r * 16, _mm512_fmadd_ps(s, _mm512_load_ps(c0 + r * 16), _mm512_load_ps(acc0 + r * 16)));
            _mm512_store_ps(acc1 + r * 16, _mm512_fmadd_ps(s, _mm512_load_ps(c1 + r * 16), _mm512_load_ps(acc1 + r * 16)));
          }
        }
        for (int r = 0; r < 16; r++) { out[(size_t)(mb * 16 + r) * N + nb * 16] += acc0[r * 16]; out[(size_t)((mb + 1) * 16 + r) * N + nb * 16] += acc1[r * 16]; }
      }
    }
  };

  alignas(64) float c4[16 * 16], c5[16 * 16];
  auto run22 = [&]() {
    for (int nb = 0; nb < N / 16; nb += 2) {
      for (int mb = 0; mb < M / 16; mb += 2) {
        alignas(64) float acc[4][16 * 16] = {};
        for (int g = 0; g < G; g++) {
          _tile_loadd(6, &B[((size_t)nb * G + g) * 512], 64);
          _tile_loadd(7, &B[((size_t)(nb + 1) * G + g) * 512], 64);
          _tile_zero(0); _tile_zero(1); _tile_zero(4); _tile_zero(5);
          for (int d = 0; d < 3; d++) {
            _tile_loadd(2, &A[(((size_t)d * (M / 16) + mb) * G + g) * 512], 64);
            _tile_loadd(3, &A[(((size_t)d * (M / 16) + mb + 1) * G + g) * 512], 64);
            _tile_dpbf16ps(0, 2, 6); _tile_dpbf16ps(1, 3, 6); _tile_dpbf16ps(4, 2, 7); _tile_dpbf16ps(5, 3, 7);
          }
          _tile_stored(0, c0, 64); _tile_stored(1, c1, 64); _tile_stored(4, c4, 64); _tile_stored(5, c5, 64);
          __m512 s0 = _mm512_loadu_ps(&scale[(size_t)nb * G + g]), s1 = _mm512_loadu_ps(&scale[(size_t)(nb + 1) * G + g]);
          for (int r = 0; r < 16; r++) {
            _mm512_store_ps(acc[0] + r * 16, _mm512_fmadd_ps(s0, _mm512_load_ps(c0 + r * 16), _mm512_load_ps(acc[0] + r * 16)));
            _mm512_store_ps(acc[1] + r * 16, _mm512_fmadd_ps(s0, _mm512_load_ps(c1 + r * 16), _mm512_load_ps(acc[1] + r * 16)));
            _mm512_store_ps(acc[2] + r * 16, _mm512_fmadd_ps(s1, _mm512_load_ps(c4 + r * 16), _mm512_load_ps(acc[2] + r * 16)));
            _mm512_store_ps(acc[3] + r * 16, _mm512_fmadd_ps(s1, _mm512_load_ps(c5 + r * 16), _mm512_load_ps(acc[3] + r * 16)));
          }
        }
        for (int r = 0; r < 16; r++) out[(size_t)(mb * 16 + r) * N + nb * 16] += acc[0][r * 16] + acc[1][r * 16] + acc[2][r * 16] + acc[3][r * 16];
      }
    }
  };
  auto bench = [&](const char* name, auto&& fn) {
    fn();
    double best = 1e9;
    for (int it = 0; it < 25; it++) {
      auto t0 = std::chrono::steady_clock::now(); fn();
      double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (s < best) best = s;
    }
    printf("%s: best %.2f ms, %.1f G useful MAC/s (one thread)\n", name, best * 1e3, (double)M * N * K / best / 1e9);
  };
  bench("AMX 2x2 C tiles (2 M x 2 N blocks)", run22);

  // Software-pipelined: C tiles {0,1} for even groups, {4,5} for odd; group g's TDPBF16PS are issued before
  // group g-1's tiles are stored and scaled, so the stores / FMAs overlap the tile multiplies.
  auto runpipe = [&]() {
    for (int nb = 0; nb < N / 16; nb++) {
      for (int mb = 0; mb < M / 16; mb += 2) {
        alignas(64) float acc0[16 * 16] = {}, acc1[16 * 16] = {};
        auto issue = [&](int g, bool odd) {
          _tile_loadd(6, &B[((size_t)nb * G + g) * 512], 64);
          const size_t a0 = (((size_t)0 * (M / 16) + mb) * G + g) * 512, a1 = (((size_t)0 * (M / 16) + mb + 1) * G + g) * 512;
          const size_t ds = (size_t)(M / 16) * G * 512;
          if (!odd) {
            _tile_zero(0); _tile_zero(1);
            _tile_loadd(2, &A[a0], 64); _tile_loadd(3, &A[a1], 64); _tile_dpbf16ps(0, 2, 6); _tile_dpbf16ps(1, 3, 6);
            _tile_loadd(2, &A[a0 + ds], 64); _tile_loadd(3, &A[a1 + ds], 64); _tile_dpbf16ps(0, 2, 6); _tile_dpbf16ps(1, 3, 6);
            _tile_loadd(2, &A[a0 + 2 * ds], 64); _tile_loadd(3, &A[a1 + 2 * ds], 64); _tile_dpbf16ps(0, 2, 6); _tile_dpbf16ps(1, 3, 6);
          } else {
            _tile_zero(4); _tile_zero(5);
            _tile_loadd(2, &A[a0], 64); _tile_loadd(3, &A[a1], 64); _tile_dpbf16ps(4, 2, 6); _tile_dpbf16ps(5, 3, 6);
            _tile_loadd(2, &A[a0 + ds], 64); _tile_loadd(3, &A[a1 + ds], 64); _tile_dpbf16ps(4, 2, 6); _tile_dpbf16ps(5, 3, 6);
            _tile_loadd(2, &A[a0 + 2 * ds], 64); _tile_loadd(3, &A[a1 + 2 * ds], 64); _tile_dpbf16ps(4, 2, 6); _tile_dpbf16ps(5, 3, 6);
          }
        };
        auto drain = [&](int g, bool odd) {
          if (!odd) { _tile_stored(0, c0, 64); _tile_stored(1, c1, 64); } else { _tile_stored(4, c0, 64); _tile_stored(5, c1, 64); }
          __m512 sc = _mm512_set1_ps(scale[(size_t)nb * 16 * G + g]);
          for (int r = 0; r < 16; r++) {
            _mm512_store_ps(acc0 + r * 16, _mm512_fmadd_ps(sc, _mm512_load_ps(c0 + r * 16), _mm512_load_ps(acc0 + r * 16)));
            _mm512_store_ps(acc1 + r * 16, _mm512_fmadd_ps(sc, _mm512_load_ps(c1 + r * 16), _mm512_load_ps(acc1 + r * 16)));
          }
        };
        issue(0, false);
        for (int g = 1; g < G; g++) { issue(g, g & 1); drain(g - 1, (g - 1) & 1); }
        drain(G - 1, (G - 1) & 1);
        for (int r = 0; r < 16; r++) { out[(size_t)(mb * 16 + r) * N + nb * 16] += acc0[r * 16]; out[(size_t)((mb + 1) * 16 + r) * N + nb * 16] += acc1[r * 16]; }
      }
    }
  };
  bench("AMX pipelined (C tiles 0,1 / 4,5 alternate by group)", runpipe);

  // "full": the 2x2 variant plus what the kernel also has to do: pack the two N-blocks' int4 codes into bf16 VNNI
  // B tiles once per N-block pair (codes -> fp32 -> bf16, exact) and the offset term acc += offset[n] * xsum[m][g].
  std::vector<uint8_t> q4((size_t)N * K / 2, 0x77);
  std::vector<float> xsum((size_t)M * G, 1.f), offs((size_t)N * G, -0.25f);
  std::vector<uint16_t> Bp((size_t)2 * 16 * K);
  auto runfull = [&]() {
    for (int nb = 0; nb < N / 16; nb += 2) {
      for (int j = 0; j < 2; j++)  // pack: tile (j, g) = [16 k-pairs][16 n][2]; index order only matters for cost
        for (int n = 0; n < 16; n++) {
          const uint8_t* row = &q4[(size_t)((nb + j) * 16 + n) * K / 2];
          for (int k = 0; k < K; k += 32) {
            __m128i b = _mm_loadu_si128((const __m128i*)(row + k / 2));
            __m512i lo = _mm512_cvtepu8_epi32(_mm_and_si128(b, _mm_set1_epi8(15)));
            __m512i hi = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(15)));
            __m512bh v = _mm512_cvtne2ps_pbh(_mm512_cvtepi32_ps(hi), _mm512_cvtepi32_ps(lo));
            _mm512_storeu_si512(&Bp[(size_t)j * 16 * K + (size_t)n * K + k], (__m512i)v);
          }
        }
      for (int mb = 0; mb < M / 16; mb += 2) {
        alignas(64) float acc[4][16 * 16] = {};
        for (int g = 0; g < G; g++) {
          _tile_loadd(6, &Bp[(size_t)g * 512], 64);
          _tile_loadd(7, &Bp[(size_t)16 * K + (size_t)g * 512], 64);
          _tile_zero(0); _tile_zero(1); _tile_zero(4); _tile_zero(5);
          for (int d = 0; d < 3; d++) {
            _tile_loadd(2, &A[(((size_t)d * (M / 16) + mb) * G + g) * 512], 64);
            _tile_loadd(3, &A[(((size_t)d * (M / 16) + mb + 1) * G + g) * 512], 64);
            _tile_dpbf16ps(0, 2, 6); _tile_dpbf16ps(1, 3, 6); _tile_dpbf16ps(4, 2, 7); _tile_dpbf16ps(5, 3, 7);
          }
          _tile_stored(0, c0, 64); _tile_stored(1, c1, 64); _tile_stored(4, c4, 64); _tile_stored(5, c5, 64);
          __m512 s0 = _mm512_loadu_ps(&scale[(size_t)nb * G + g]), s1 = _mm512_loadu_ps(&scale[(size_t)(nb + 1) * G + g]);
          __m512 o0 = _mm512_loadu_ps(&offs[(size_t)nb * G + g]), o1 = _mm512_loadu_ps(&offs[(size_t)(nb + 1) * G + g]);
          for (int r = 0; r < 16; r++) {
            __m512 x0 = _mm512_set1_ps(xsum[(size_t)(mb * 16 + r) * G + g]), x1 = _mm512_set1_ps(xsum[(size_t)((mb + 1) * 16 + r) * G + g]);
            _mm512_store_ps(acc[0] + r * 16, _mm512_fmadd_ps(o0, x0, _mm512_fmadd_ps(s0, _mm512_load_ps(c0 + r * 16), _mm512_load_ps(acc[0] + r * 16))));
            _mm512_store_ps(acc[1] + r * 16, _mm512_fmadd_ps(o0, x1, _mm512_fmadd_ps(s0, _mm512_load_ps(c1 + r * 16), _mm512_load_ps(acc[1] + r * 16))));
            _mm512_store_ps(acc[2] + r * 16, _mm512_fmadd_ps(o1, x0, _mm512_fmadd_ps(s1, _mm512_load_ps(c4 + r * 16), _mm512_load_ps(acc[2] + r * 16))));
            _mm512_store_ps(acc[3] + r * 16, _mm512_fmadd_ps(o1, x1, _mm512_fmadd_ps(s1, _mm512_load_ps(c5 + r * 16), _mm512_load_ps(acc[3] + r * 16))));
          }
        }
        for (int r = 0; r < 16; r++) out[(size_t)(mb * 16 + r) * N + nb * 16] += acc[0][r * 16] + acc[1][r * 16] + acc[2][r * 16] + acc[3][r * 16];
      }
    }
  };
  bench("AMX 2x2 full (int4 B packing per N-block pair + offset term)", runfull);
  run();
  double best = 1e9;
  for (int it = 0; it < 25; it++) {
    auto t0 = std::chrono::steady_clock::now(); run();
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (s < best) best = s;
  }
  _tile_release();
  double macs = (double)M * N * K;
  printf("AMX 3-digit exact scheme M=%d N=%d K=%d: best %.2f ms, %.1f G useful MAC/s (one thread), out[0]=%g\n",
         M, N, K, best * 1e3, macs / best / 1e9, out[0]);
  return 0;
}
