#include "cpu/tuning.h"

#include "cpu/cpu_features.h"
#include "cpu/kernels.h"

#include <unistd.h>

#include <algorithm>
#include <cstdlib>
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

int64_t cache_bytes(int level, int sysconf_name, const char* type) {
  const long v = sysconf_name >= 0 ? sysconf(sysconf_name) : -1;
  return v > 0 ? static_cast<int64_t>(v) : sysfs_cache_bytes(level, type);
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
  return t;
}

}  // namespace

const Tuning& tuning() {
  static const Tuning t = measure();
  return t;
}

namespace {

// An environment override of a row count (>= 1), or 0 when unset.
int64_t rows_from_env(const char* name) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return 0;
  return std::clamp<int64_t>(std::strtoll(env, nullptr, 10), 1, int64_t{1} << 30);
}

}  // namespace

int64_t quant_gemm_from_rows(QuantGemm format) {
  static const int64_t env_int = rows_from_env("LLAMA_FAST_QUANT_GEMM_ROWS");
  static const int64_t env_ggml = rows_from_env("LLAMA_FAST_KQUANT_GEMM_ROWS");
  const bool vnni = isa() >= Isa::kAvx512Vnni;  // the reasons: tuning.h
  switch (format) {
    case QuantGemm::kInt4: return env_int > 0 ? env_int : vnni ? kMaxGemvRows + 1 : 24;
    case QuantGemm::kInt8: return env_int > 0 ? env_int : vnni ? kMaxGemvRows + 1 : 16;
    case QuantGemm::kGgmlSuper: return env_ggml > 0 ? env_ggml : vnni ? 48 : 1;
    default: return env_ggml > 0 ? env_ggml : vnni ? 16 : 4;  // kGgmlBlock32
  }
}

}  // namespace cpu
}  // namespace llama_fast
