// The dense decode GEMV's inner loops (linear.cpp: one weight row at a time, one accumulator; bf16 with vdpbf16ps,
// fp32 with FMA) against variants and a plain read, each thread streaming ONE contiguous half of every matrix, the
// matrices (SmolLM2's gate_up, 3072 x 576) cycled over a buffer larger than the caches, on huge pages. It separates
// the kernel's loop from how the library runs it (issue 14: decode at the memory limit).
// Build / run: g++ -O3 -march=native -fopenmp -o /tmp/gemv_streams benchmarks/micro/gemv_streams.cpp
//              flock /tmp/bench.lock /tmp/gemv_streams 3072 576 600      (N, K, MiB of weights cycled)
// Intel Xeon KVM guest (family 6 model 167, AMX), load ~1.0, GB/s, 1 / 2 threads:
//   read 15.3 / 29.6; bf_v0 (the library's loop) 14.1 / 29.2, with a 1 KiB software prefetch 15.0 / 30.8;
//   bf_v1 (4 rows interleaved) 13.5 / 27.7; bf_v2 (2 accumulators) 11.4 / 23.0; f_v0 14.9 / 30.1, f_v1 15.3 / 30.1,
//   f_v2 13.0 / 25.8.
// So the loop itself reaches the read bandwidth; in the library the same loop streamed at 18-20 GB/s (decode
// profile) while the threads took 64 KiB chunks in turn, 26-30 once each took one range (thread_pool.h).
#include <immintrin.h>
#include <omp.h>
#include <sys/mman.h>
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
using u16 = uint16_t;
static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// V0 current: row at a time, one acc
__attribute__((noinline)) void bf_v0(const u16* x, const u16* w, float* out, int64_t n0, int64_t n1, int64_t k,
                                     int64_t ahead) {
  for (int64_t r = n0; r < n1; ++r) {
    __m512 acc = _mm512_setzero_ps();
    const u16* wr = w + r * k;
    for (int64_t kk = 0; kk + 32 <= k; kk += 32) {
      if (ahead) _mm_prefetch((const char*)(wr + kk) + ahead, _MM_HINT_T0);
      acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(wr + kk), (__m512bh)_mm512_loadu_si512(x + kk));
    }
    out[r] = hsum(acc);
  }
}
// V1: 4 rows interleaved
__attribute__((noinline)) void bf_v1(const u16* x, const u16* w, float* out, int64_t n0, int64_t n1, int64_t k,
                                     int64_t ahead) {
  int64_t r = n0;
  for (; r + 4 <= n1; r += 4) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const u16* wr = w + r * k;
    for (int64_t kk = 0; kk + 32 <= k; kk += 32) {
      __m512bh xv = (__m512bh)_mm512_loadu_si512(x + kk);
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(wr + kk), xv);
      a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(wr + k + kk), xv);
      a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(wr + 2 * k + kk), xv);
      a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(wr + 3 * k + kk), xv);
    }
    out[r] = hsum(a0);
    out[r + 1] = hsum(a1);
    out[r + 2] = hsum(a2);
    out[r + 3] = hsum(a3);
  }
  for (; r < n1; ++r) bf_v0(x, w, out, r, r + 1, k, 0);
}
// V2: row at a time with 2 accs
__attribute__((noinline)) void bf_v2(const u16* x, const u16* w, float* out, int64_t n0, int64_t n1, int64_t k,
                                     int64_t ahead) {
  for (int64_t r = n0; r < n1; ++r) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    const u16* wr = w + r * k;
    int64_t kk = 0;
    for (; kk + 64 <= k; kk += 64) {
      if (ahead) {
        _mm_prefetch((const char*)(wr + kk) + ahead, _MM_HINT_T0);
        _mm_prefetch((const char*)(wr + kk) + ahead + 64, _MM_HINT_T0);
      }
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(wr + kk), (__m512bh)_mm512_loadu_si512(x + kk));
      a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(wr + kk + 32), (__m512bh)_mm512_loadu_si512(x + kk + 32));
    }
    for (; kk + 32 <= k; kk += 32)
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(wr + kk), (__m512bh)_mm512_loadu_si512(x + kk));
    out[r] = hsum(_mm512_add_ps(a0, a1));
  }
}
// roofline: plain read-sum of the same bytes
__attribute__((noinline)) void rd(const u16* x, const u16* w, float* out, int64_t n0, int64_t n1, int64_t k,
                                  int64_t ahead) {
  const float* p = (const float*)(w + n0 * k);
  const float* e = (const float*)(w + n1 * k);
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (; p + 64 <= e; p += 64) {
    a0 = _mm512_add_ps(a0, _mm512_loadu_ps(p));
    a1 = _mm512_add_ps(a1, _mm512_loadu_ps(p + 16));
    a2 = _mm512_add_ps(a2, _mm512_loadu_ps(p + 32));
    a3 = _mm512_add_ps(a3, _mm512_loadu_ps(p + 48));
  }
  out[n0] = hsum(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}
// fp32 current: row at a time 1 acc fma
__attribute__((noinline)) void f_v0(const float* x, const float* w, float* out, int64_t n0, int64_t n1, int64_t k,
                                    int64_t) {
  for (int64_t r = n0; r < n1; ++r) {
    __m512 acc = _mm512_setzero_ps();
    const float* wr = w + r * k;
    for (int64_t kk = 0; kk + 16 <= k; kk += 16)
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(wr + kk), _mm512_loadu_ps(x + kk), acc);
    out[r] = hsum(acc);
  }
}
__attribute__((noinline)) void f_v1(const float* x, const float* w, float* out, int64_t n0, int64_t n1, int64_t k,
                                    int64_t) {
  int64_t r = n0;
  for (; r + 4 <= n1; r += 4) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const float* wr = w + r * k;
    for (int64_t kk = 0; kk + 16 <= k; kk += 16) {
      __m512 xv = _mm512_loadu_ps(x + kk);
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(wr + kk), xv, a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(wr + k + kk), xv, a1);
      a2 = _mm512_fmadd_ps(_mm512_loadu_ps(wr + 2 * k + kk), xv, a2);
      a3 = _mm512_fmadd_ps(_mm512_loadu_ps(wr + 3 * k + kk), xv, a3);
    }
    out[r] = hsum(a0);
    out[r + 1] = hsum(a1);
    out[r + 2] = hsum(a2);
    out[r + 3] = hsum(a3);
  }
  for (; r < n1; ++r) f_v0(x, w, out, r, r + 1, k, 0);
}
__attribute__((noinline)) void f_v2(const float* x, const float* w, float* out, int64_t n0, int64_t n1, int64_t k,
                                    int64_t) {
  for (int64_t r = n0; r < n1; ++r) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    const float* wr = w + r * k;
    int64_t kk = 0;
    for (; kk + 32 <= k; kk += 32) {
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(wr + kk), _mm512_loadu_ps(x + kk), a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(wr + kk + 16), _mm512_loadu_ps(x + kk + 16), a1);
    }
    for (; kk + 16 <= k; kk += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(wr + kk), _mm512_loadu_ps(x + kk), a0);
    out[r] = hsum(_mm512_add_ps(a0, a1));
  }
}

template <typename T, typename F>
double run(F f, const char* name, std::vector<T*>& mats, const T* x, int64_t n, int64_t k, int threads, int64_t ahead) {
  std::vector<float> out(n);
  double best = 1e9;
  for (int rep = 0; rep < 4; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(threads)
    {
      int t = omp_get_thread_num();
      int64_t n0 = n * t / threads, n1 = n * (t + 1) / threads;
      for (T* w : mats) f(x, w, out.data(), n0, n1, k, ahead);
    }
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::min(best, s);
  }
  double gb = (double)mats.size() * n * k * sizeof(T) / 1e9;
  printf("%-6s thr=%d ahead=%5ld %6.1f GB/s\n", name, threads, (long)ahead, gb / best);
  return gb / best;
}

int main(int argc, char** argv) {
  int64_t n = atoi(argv[1]), k = atoi(argv[2]);
  int64_t mib = atoi(argv[3]);
  size_t bytes = (size_t)mib << 20;
  char* raw = (char*)aligned_alloc(2 << 20, bytes + (2 << 20));
  madvise(raw, bytes, MADV_HUGEPAGE);
  memset(raw, 0x3c, bytes);
  size_t bf_mat = n * k * 2, f_mat = n * k * 4;
  std::vector<u16*> bm;
  for (size_t o = 0; o + bf_mat <= bytes; o += (bf_mat + 4095) / 4096 * 4096) bm.push_back((u16*)(raw + o));
  std::vector<float*> fm;
  for (size_t o = 0; o + f_mat <= bytes; o += (f_mat + 4095) / 4096 * 4096) fm.push_back((float*)(raw + o));
  std::vector<u16> xb(k, 0x3f80);
  std::vector<float> xf(k, 1.f);
  for (int th : {1, 2}) {
    run(rd, "read", bm, xb.data(), n, k, th, 0);
    run(bf_v0, "bf_v0", bm, xb.data(), n, k, th, 0);
    run(bf_v0, "bf_v0", bm, xb.data(), n, k, th, 1024);
    run(bf_v1, "bf_v1", bm, xb.data(), n, k, th, 0);
    run(bf_v2, "bf_v2", bm, xb.data(), n, k, th, 0);
    run(f_v0, "f_v0", fm, xf.data(), n, k, th, 0);
    run(f_v1, "f_v1", fm, xf.data(), n, k, th, 0);
    run(f_v2, "f_v2", fm, xf.data(), n, k, th, 0);
  }
}
