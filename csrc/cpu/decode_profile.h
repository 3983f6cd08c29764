// LLAMA_FAST_DECODE_PROFILE=1: wall time of each phase of cpu_decode_step, summed over calls and printed (as
// microseconds per call) to stderr when the process exits, with the GB/s each linear achieved over the bytes
// of its weights. LLAMA_FAST_DECODE_PROFILE=cpu charges the calling thread's CPU time instead of wall time:
// with one thread (OMP_NUM_THREADS=1) that is the work itself, unaffected by other processes taking the core
// on a shared machine (each reading costs ~0.3 us more than a steady_clock one, which the phases absorb). Off,
// each mark costs one predictable branch.
#pragma once
#include <time.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace llama_fast {
namespace cpu {

class DecodeProfile {
 public:
  enum Phase { kChecks, kNorm, kQkv, kRotary, kStoreKv, kAttention, kO, kGateUp, kSilu, kDown, kCount };

  static DecodeProfile& get() {
    static DecodeProfile* p = new DecodeProfile();  // never destroyed: the atexit hook reads it
    return *p;
  }
  bool on() const { return on_; }
  // Starts the clock of one call (the phases that follow are charged from here).
  void begin() {
    if (!on_) return;
    ++calls_;
    last_ = now();
  }
  // Charges the time since the previous mark (or begin) to `phase`, and `weight_bytes` read by it.
  void mark(Phase phase, int64_t weight_bytes = 0) {
    if (!on_) return;
    const int64_t t = now();
    total_[phase] += t - last_;
    bytes_[phase] += weight_bytes;
    last_ = t;
  }

 private:
  DecodeProfile() {
    const char* v = std::getenv("LLAMA_FAST_DECODE_PROFILE");
    on_ = v != nullptr;
    cpu_time_ = on_ && std::strcmp(v, "cpu") == 0;
    if (on_) std::atexit([] { get().print(); });
  }
  int64_t now() const {
    if (cpu_time_) {
      timespec ts;
      clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
      return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
    }
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }
  void print() const {
    static const char* names[kCount] = {"checks",    "norms",  "qkv_proj",     "rotary",       "store_kv",
                                        "attention", "o_proj", "gate_up_proj", "silu_and_mul", "down_proj"};
    if (calls_ == 0) return;
    double sum = 0;
    std::fprintf(stderr, "cpu_decode_step, us per call (%s) over %lld calls:\n",
                 cpu_time_ ? "calling thread's CPU time" : "wall", static_cast<long long>(calls_));
    for (int i = 0; i < kCount; ++i) {
      const double us = static_cast<double>(total_[i]) / 1e3 / static_cast<double>(calls_);
      sum += us;
      if (bytes_[i] > 0)  // bytes per ns = GB/s
        std::fprintf(stderr, "  %-13s %9.1f  %6.1f GB/s of weights\n", names[i], us,
                     static_cast<double>(bytes_[i]) / static_cast<double>(total_[i]));
      else
        std::fprintf(stderr, "  %-13s %9.1f\n", names[i], us);
    }
    std::fprintf(stderr, "  %-13s %9.1f\n", "total", sum);
  }

  bool on_ = false, cpu_time_ = false;
  int64_t last_ = 0, calls_ = 0;
  int64_t total_[kCount] = {};
  int64_t bytes_[kCount] = {};
};

}  // namespace cpu
}  // namespace llama_fast
