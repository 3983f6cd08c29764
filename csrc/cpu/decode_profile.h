// LLAMA_FAST_DECODE_PROFILE=1: wall time of each phase of cpu_decode_step, summed over calls and printed (as
// microseconds per call) to stderr when the process exits. Off, each mark costs one predictable branch.
#pragma once
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

namespace llama_fast {
namespace cpu {

class DecodeProfile {
 public:
  enum Phase { kChecks, kNorm, kQkv, kRotary, kStoreKv, kAttention, kO, kGateUp, kSilu, kDown, kCount };

  static DecodeProfile& get() {
    static DecodeProfile* p = new DecodeProfile();  // never destroyed: the atexit hook reads it
    return *p;
  }
  // Starts the clock of one call (the phases that follow are charged from here).
  void begin() {
    if (!on_) return;
    ++calls_;
    last_ = now();
  }
  // Charges the time since the previous mark (or begin) to `phase`.
  void mark(Phase phase) {
    if (!on_) return;
    const int64_t t = now();
    total_[phase] += t - last_;
    last_ = t;
  }

 private:
  DecodeProfile() : on_(std::getenv("LLAMA_FAST_DECODE_PROFILE") != nullptr) {
    if (on_) std::atexit([] { get().print(); });
  }
  static int64_t now() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }
  void print() const {
    static const char* names[kCount] = {"checks",    "norms",  "qkv_proj",     "rotary",       "store_kv",
                                        "attention", "o_proj", "gate_up_proj", "silu_and_mul", "down_proj"};
    if (calls_ == 0) return;
    double sum = 0;
    std::fprintf(stderr, "cpu_decode_step, us per call over %lld calls:\n", static_cast<long long>(calls_));
    for (int i = 0; i < kCount; ++i) {
      const double us = static_cast<double>(total_[i]) / 1e3 / static_cast<double>(calls_);
      sum += us;
      std::fprintf(stderr, "  %-13s %9.1f\n", names[i], us);
    }
    std::fprintf(stderr, "  %-13s %9.1f\n", "total", sum);
  }

  const bool on_;
  int64_t last_ = 0, calls_ = 0;
  int64_t total_[kCount] = {};
};

}  // namespace cpu
}  // namespace llama_fast
