#include "cpu/cpu_features.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include <unistd.h>

namespace llama_fast {
namespace cpu {
namespace {

Isa detect() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  const bool avx512_vnni = avx512 && __builtin_cpu_supports("avx512vnni");
  // The levels are a chain: the top one takes VNNI too (every CPU with AVX512-BF16 has it).
  const bool avx512_bf16 = avx512_vnni && __builtin_cpu_supports("avx512bf16");
  if (avx512_bf16) return Isa::kAvx512Bf16;
  if (avx512_vnni) return Isa::kAvx512Vnni;
  if (avx512) return Isa::kAvx512;
  if (avx2) return Isa::kAvx2;
#endif
  return Isa::kPortable;
}

Isa parse_and_clamp(const char* env, Isa best) {
  Isa want;
  if (!std::strcmp(env, "portable"))
    want = Isa::kPortable;
  else if (!std::strcmp(env, "avx2"))
    want = Isa::kAvx2;
  else if (!std::strcmp(env, "avx512"))
    want = Isa::kAvx512;
  else if (!std::strcmp(env, "avx512_vnni"))
    want = Isa::kAvx512Vnni;
  else if (!std::strcmp(env, "avx512_bf16"))
    want = Isa::kAvx512Bf16;
  else
    throw std::invalid_argument(std::string("LLAMA_FAST_CPU_ISA=") + env +
                                " is not one of portable, avx2, avx512, avx512_vnni, avx512_bf16");
  // Never go above what the CPU has: forcing avx512 on an AVX2 machine would crash with SIGILL.
  return static_cast<int>(want) < static_cast<int>(best) ? want : best;
}

Isa apply_override(Isa best) {
  const char* env = std::getenv("LLAMA_FAST_CPU_ISA");
  if (env == nullptr || *env == '\0') return best;
  return parse_and_clamp(env, best);
}

std::atomic<int>& current() {
  static std::atomic<int> chosen{static_cast<int>(apply_override(detect()))};
  return chosen;
}

}  // namespace

Isa isa() { return static_cast<Isa>(current().load(std::memory_order_relaxed)); }

Isa detected_isa() {
  static const Isa best = detect();
  return best;
}

void set_isa(const char* name) {
  const Isa best = detected_isa();
  current().store(static_cast<int>(parse_and_clamp(name, best)));
}

bool has_avx_vnni() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("avxvnni");
  }();
  return has;
#else
  return false;
#endif
}

namespace {
// LLAMA_FAST_FMA_GEMV: -1 off (0), 1 forced (1), 0 the hardware decides (unset, anything else); read once.
int fma_gemv_mode() {
  static const int mode = [] {
    const char* env = std::getenv("LLAMA_FAST_FMA_GEMV");
    if (env != nullptr && std::strcmp(env, "0") == 0) return -1;
    if (env != nullptr && std::strcmp(env, "1") == 0) return 1;
    return 0;
  }();
  return mode;
}
}  // namespace

bool fp32_fma_gemv() {
#if defined(__x86_64__) || defined(_M_X64)
  const int mode = fma_gemv_mode();
  if (isa() != Isa::kAvx2 || mode < 0) return false;
  return mode > 0 || (detected_isa() < Isa::kAvx512Vnni && !has_avx_vnni());
#else
  return false;
#endif
}

bool fp32_fma_gemv_forced() { return fp32_fma_gemv() && fma_gemv_mode() > 0; }

CacheSizes cache_sizes() {
  static const CacheSizes sizes = [] {
    // sysconf reports 0 (or -1) where it does not know; clamp to what real x86 cores have
    auto read = [](int name, long fallback, long lo, long hi) {
      const long v = sysconf(name);
      return v > 0 ? std::min(std::max(v, lo), hi) : fallback;
    };
    return CacheSizes{read(_SC_LEVEL1_DCACHE_SIZE, 32L << 10, 16L << 10, 128L << 10),
                      read(_SC_LEVEL2_CACHE_SIZE, 1L << 20, 256L << 10, 8L << 20)};
  }();
  return sizes;
}

const char* isa_name(Isa i) {
  switch (i) {
    case Isa::kPortable: return "portable";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx512Vnni: return "avx512_vnni";
    case Isa::kAvx512Bf16: return "avx512_bf16";
  }
  return "unknown";
}

}  // namespace cpu

std::string cpu_features() { return cpu::isa_name(cpu::isa()); }

}  // namespace llama_fast
