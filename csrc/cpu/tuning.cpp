#include "cpu/tuning.h"

#include "cpu/cpu_features.h"
#include "cpu/kernels.h"

#include <unistd.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

namespace llama_fast {
namespace cpu {
namespace {

// A cache size from sysfs ("48K", "2048K", "260M"), 0 when absent or unreadable.
int64_t sysfs_cache_bytes(int level, const char* type) {
  for (int index = 0; index < 8; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    std::ifstream lvl(dir + "level"), typ(dir + "type"), size(dir + "size");
    int l = 0;
    std::string t, s;
    if (!(lvl >> l) || !(typ >> t) || !(size >> s)) continue;
    if (l != level || (t != type && t != "Unified")) continue;
    char* end = nullptr;
    const int64_t v = std::strtoll(s.c_str(), &end, 10);
    const int64_t unit = *end == 'K' ? 1024 : *end == 'M' ? 1024 * 1024 : *end == 'G' ? int64_t{1} << 30 : 1;
    return v > 0 ? v * unit : 0;
  }
  return 0;
}

// The kernel's sysfs view first: glibc's sysconf derives the L3 from cpuid, which under KVM can report the host's
// whole L3 times the guest's threads (320 MiB on a 2-vCPU AMD EPYC guest whose sysfs says 32 MiB).
int64_t cache_bytes(int level, int sysconf_name, const char* type) {
  if (const int64_t v = sysfs_cache_bytes(level, type); v > 0) return v;
  const long v = sysconf_name >= 0 ? sysconf(sysconf_name) : -1;
  return v > 0 ? static_cast<int64_t>(v) : 0;
}

// Whether the CPU reports itself as Intel's (cpuid leaf 0's vendor string).
bool intel_cpu() {
#if defined(__x86_64__) || defined(_M_X64)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid(0, &eax, &ebx, &ecx, &edx) == 0) return false;
  char vendor[13] = {};
  std::memcpy(vendor, &ebx, 4);
  std::memcpy(vendor + 4, &edx, 4);
  std::memcpy(vendor + 8, &ecx, 4);
  return std::strcmp(vendor, "GenuineIntel") == 0;
#else
  return false;
#endif
}

Tuning measure() {
  Tuning t{};
#if defined(_SC_LEVEL1_DCACHE_SIZE)
  t.l1d_bytes = cache_bytes(1, _SC_LEVEL1_DCACHE_SIZE, "Data");
  t.l2_bytes = cache_bytes(2, _SC_LEVEL2_CACHE_SIZE, "Unified");
  t.l3_bytes = cache_bytes(3, _SC_LEVEL3_CACHE_SIZE, "Unified");
#else
  t.l1d_bytes = cache_bytes(1, -1, "Data");
  t.l2_bytes = cache_bytes(2, -1, "Unified");
  t.l3_bytes = cache_bytes(3, -1, "Unified");
#endif
  const int64_t l1d = t.l1d_bytes > 0 ? t.l1d_bytes : 32 * 1024;  // unknown: the smallest L1d of x86-64-v3 cores
  t.prefetch_bytes = std::clamp<int64_t>(l1d / 4, 2048, 16384) / 64 * 64;
  if (const char* env = std::getenv("LLAMA_FAST_PREFETCH_BYTES"); env != nullptr && *env != '\0')
    t.prefetch_bytes = std::clamp<int64_t>(std::strtoll(env, nullptr, 10), 0, 1 << 20) / 64 * 64;
  t.prefetch_on_huge_pages = intel_cpu();
  if (const char* env = std::getenv("LLAMA_FAST_HUGE_PAGE_PREFETCH"); env != nullptr && *env != '\0')
    t.prefetch_on_huge_pages = std::strtoll(env, nullptr, 10) != 0;
  t.int4_prefetch_into_l2 = !intel_cpu();
  if (const char* env = std::getenv("LLAMA_FAST_INT4_PREFETCH_L2"); env != nullptr && *env != '\0')
    t.int4_prefetch_into_l2 = std::strtoll(env, nullptr, 10) != 0;
  return t;
}

}  // namespace

const Tuning& tuning() {
  static const Tuning t = measure();
  return t;
}

namespace {
// Lock-free: the kernels look a range up once per linear call, from any thread. A slot is free when its begin is
// 0; a writer claims it with 1, writes end, then publishes begin.
constexpr int kHugeRanges = 64;
std::atomic<uintptr_t> huge_begin[kHugeRanges], huge_end[kHugeRanges];

// An environment override of a row count (>= 1), or 0 when unset.
int64_t rows_from_env(const char* name) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return 0;
  return std::clamp<int64_t>(std::strtoll(env, nullptr, 10), 1, int64_t{1} << 30);
}
}  // namespace

void set_huge_page_range(const void* begin, int64_t bytes, bool add) {
  const auto b = reinterpret_cast<uintptr_t>(begin);
  if (b == 0 || bytes <= 0) return;
  for (int i = 0; i < kHugeRanges; ++i) {
    if (add) {
      uintptr_t expected = 0;  // claim a free slot (1: being written, skipped by readers), then publish it
      if (!huge_begin[i].compare_exchange_strong(expected, 1, std::memory_order_acq_rel)) continue;
      huge_end[i].store(b + static_cast<uintptr_t>(bytes), std::memory_order_relaxed);
      huge_begin[i].store(b, std::memory_order_release);
      return;
    } else if (huge_begin[i].load(std::memory_order_acquire) == b) {
      huge_begin[i].store(0, std::memory_order_release);
      return;
    }
  }
}

int64_t dense_prefetch_bytes(const void* w) {
  const auto p = reinterpret_cast<uintptr_t>(w);
  for (int i = 0; i < kHugeRanges; ++i) {
    const uintptr_t b = huge_begin[i].load(std::memory_order_acquire);
    if (b > 1 && p >= b && p < huge_end[i].load(std::memory_order_relaxed))
      return tuning().prefetch_on_huge_pages ? tuning().prefetch_bytes : 0;
  }
  return tuning().prefetch_bytes;
}

// bf16 rows from which gemm_amx.cpp beats linear.cpp's kernels (the vdpbf16ps GEMV up to 8 rows, the tiled fp32
// kernel on widened weights above). Intel Xeon (Emerald Rapids guest), weights cycled from memory, microseconds per
// linear (GEMV / AMX), SmolLM2 shapes N x K:
//   1 thread:  1536x576  m=3 74 / 81, m=4 83 / 82, m=5 105 / 83, m=16 308 / 87;  576x1536 m=3 75 / 72, m=5 99 / 73;
//              192x576 m=4 12.7 / 12.6, m=5 15.3 / 12.5;  49152x576 m=4 2498 / 2334, m=5 3215 / 2343
//   2 threads: 1536x576  m=4 64 / 47, m=5 69 / 48;  192x576 m=5 11.7 / 13.4, m=8 15.4 / 13.4 (the pool's start
//              costs more than the split saves on so small a linear);  49152x576 m=2 1569 / 1178
// The AMX GEMM's time is flat up to 16 rows (one tile of rows; it streams the weights once, at ~22 GB/s against
// the GEMV's ~26), so it takes over where the GEMV's per-row work passes the stream: 5 rows.
constexpr int64_t kAmxBf16FromRows = 5;

int64_t quant_gemm_from_rows(QuantGemm format) {
  static const int64_t env_int = rows_from_env("LLAMA_FAST_QUANT_GEMM_ROWS");
  static const int64_t env_ggml = rows_from_env("LLAMA_FAST_KQUANT_GEMM_ROWS");
  switch (format) {
    // int4 / int8: never within a decode step, with or without VNNI (without it the 256-bit integer GEMV of
    // quant_linear_avx2.cpp, 1.2-2x the path the AVX2 crossover of 24 / 16 rows was measured against)
    case QuantGemm::kInt4: return env_int > 0 ? env_int : kMaxGemvRows + 1;
    case QuantGemm::kInt8: return env_int > 0 ? env_int : kMaxGemvRows + 1;
    // ggml blocks: the same rows with or without VNNI (the 256-bit kernels, kquant_linear_avx2.cpp, do the VNNI
    // kernel's work per row at half the width, as the GEMM's FMAs are then half as wide too)
    case QuantGemm::kGgmlSuper: return env_ggml > 0 ? env_ggml : 48;
    default: return env_ggml > 0 ? env_ggml : 16;  // kGgmlBlock32
  }
}

int64_t amx_quant_from_rows(bool bf16_activations) {
  static const int64_t env = rows_from_env("LLAMA_FAST_AMX_QUANT_ROWS");
  if (env > 0) return env;
  // Measured against the old paths (VNNI GEMV; fp32 from 8 rows the dequantized tiles), 1 thread, Intel Xeon KVM guest
  // (family 6 model 167 as it reports, AMX-BF16), int4 groups of 32 with offsets, SmolLM2's 576 x 1536 and 1536 x 576,
  // 150 weight copies cycled (streamed from memory, as in a decode step), G multiply-adds/s old -> AMX: fp32
  // activations 25.5 -> 24.0 and 34.6 -> 21.7 at 5 rows, 33.7 -> 29.2 and 29.3 -> 26.0 at 6, 30.2 -> 40.9 and 23.9
  // -> 33.6 at 8; bf16 (one digit against a one-limb GEMV) 54.0 -> 49.7 and 41.4 -> 44.9 at 8, 48.0 -> 63.3 and 40.2
  // -> 57.2 at 10, 52.4 -> 102 and 61.8 -> 100 at 16. (With the weights in L2 the AMX path wins from 5 fp32 / 8 bf16
  // rows.) The tile path costs about the same for 1 to 16 rows, so its time per row falls until then.
  return bf16_activations ? 10 : 8;
}

int64_t amx_kquant_from_rows(bool super_blocks) {
  static const int64_t env = rows_from_env("LLAMA_FAST_AMX_KQUANT_ROWS");
  if (env > 0) return env;
  // Measured against the old paths (VNNI GEMV, from 16 / 48 rows the fp32 GEMM on dequantized tiles), 1 thread, CPU
  // time, the Intel Xeon KVM guest above, random blocks cycled from memory (benchmarks/bench_amx_kquant.py), G
  // multiply-adds/s old -> AMX, fp32 / bf16 activations: Q8_0 576 x 1536 and 1536 x 576 at 12 rows 22-23 -> 23-24 /
  // 36-38 -> 24-26, at 16 rows 26-27 -> 30-31 / 26-27 -> 32-34; Q4_K 2048 x 2048 at 16 rows 38 -> 32 / 52 -> 33, at
  // 32 rows 31 -> 53 / 50 -> 55. The tile path costs about the same for 1 to 16 rows (one activation block), so a
  // second block (17 rows on) halves its rate until it fills: Q4_K's faster GEMV keeps up to 32. Q6_K / Q3_K / Q2_K
  // 2048 x 2048 (groups of 16) at 16 rows 43-44 -> 39-44 / 58-63 -> 44-49, at 32 rows 44-45 -> 58-65 / 58-61 -> 66-72
  // (benchmarks/results/amx_kquant_ops_1thread_intel_amx.json, a later run): the same 32.
  return super_blocks ? 32 : 16;
}

int64_t amx_bf16_from_rows() {
  static const int64_t env = rows_from_env("LLAMA_FAST_AMX_BF16_ROWS");
  return env > 0 ? env : kAmxBf16FromRows;
}

}  // namespace cpu
}  // namespace llama_fast
