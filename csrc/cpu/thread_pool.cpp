#include "cpu/thread_pool.h"

#include <omp.h>

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LF_PAUSE() _mm_pause()
#else
#define LF_PAUSE() std::this_thread::yield()
#endif

namespace llama_fast {
namespace cpu {
namespace {

// The ticket packs the job generation (high 24 bits) and the next unclaimed index (low 40 bits), so a helper
// that wakes up late can never claim a chunk of a newer job with the older job's function.
constexpr int kIndexBits = 40;
constexpr uint64_t kIndexMask = (uint64_t{1} << kIndexBits) - 1;
// Pause iterations (a pause is ~40-140 cycles: up to ~1 ms) before a helper blocks, so the many short loops of
// a decode step never pay a wake-up (1000 measured ~5% slower decode). The cost: a spinning helper holds a
// core, so code must not alternate our loops with ATen's (OpenMP) parallel regions in a hot path, whose
// threads it starves (a quantized prefill that did took 2 s for 42 tokens; see ops_cpu.cpp's quant_linear).
constexpr int kSpinBeforeSleep = 20000;

class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }

  void run(int64_t n, int64_t grain, int helpers, const std::function<void(int64_t, int64_t)>& fn) {
    std::lock_guard<std::mutex> caller(caller_mu_);  // one job at a time (calls from several Python threads)
    grow(helpers);
    const uint64_t gen = (generation_ + 1) & ((uint64_t{1} << (64 - kIndexBits)) - 1);
    generation_ = gen;
    Job& job = jobs_[gen & 1];
    job.fn.store(&fn, std::memory_order_relaxed);  // published by the ticket's release store below
    job.n.store(n, std::memory_order_relaxed);
    job.grain.store(grain, std::memory_order_relaxed);
    job.done.store(0, std::memory_order_relaxed);
    ticket_.store(gen << kIndexBits, std::memory_order_release);
    if (sleeping_.load(std::memory_order_acquire) > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      cv_.notify_all();
    }
    work(gen);
    // Only chunks a helper actually claimed are waited for; yield if its thread got preempted meanwhile.
    for (int spins = 0; job.done.load(std::memory_order_acquire) < n; ++spins) {
      if (spins < 4000)
        LF_PAUSE();
      else
        std::this_thread::yield();
    }
  }

 private:
  // Claims and runs chunks of generation `gen` until none are left. The job of generation g lives in
  // jobs_[g & 1] and is rewritten only for generation g + 2, which is published after g + 1: a claim (a
  // successful CAS on a ticket still carrying g) therefore always pairs with g's own job fields.
  void work(uint64_t gen) {
    Job& job = jobs_[gen & 1];
    for (;;) {
      uint64_t t = ticket_.load(std::memory_order_acquire);
      if ((t >> kIndexBits) != gen) return;
      const int64_t begin = static_cast<int64_t>(t & kIndexMask);
      const int64_t n = job.n.load(std::memory_order_relaxed), grain = job.grain.load(std::memory_order_relaxed);
      const auto* fn = job.fn.load(std::memory_order_relaxed);
      if (begin >= n) return;
      const int64_t end = std::min(n, begin + grain);
      if (!ticket_.compare_exchange_weak(t, (gen << kIndexBits) | static_cast<uint64_t>(end),
                                         std::memory_order_acq_rel))
        continue;
      (*fn)(begin, end);
      job.done.fetch_add(end - begin, std::memory_order_acq_rel);
    }
  }

  void helper_loop() {
    uint64_t seen = 0;
    for (;;) {
      int spins = 0;
      uint64_t gen;
      while ((gen = ticket_.load(std::memory_order_acquire) >> kIndexBits) == seen) {
        if (++spins < kSpinBeforeSleep) {
          LF_PAUSE();
          continue;
        }
        std::unique_lock<std::mutex> lock(mu_);
        sleeping_.fetch_add(1, std::memory_order_acq_rel);
        cv_.wait(lock, [&] { return stop_ || (ticket_.load(std::memory_order_acquire) >> kIndexBits) != seen; });
        sleeping_.fetch_sub(1, std::memory_order_acq_rel);
        if (stop_) return;
        spins = 0;
      }
      seen = gen;
      work(gen);
    }
  }

  void grow(int helpers) {
    while (static_cast<int>(threads_.size()) < helpers) threads_.emplace_back([this] { helper_loop(); });
  }

  std::mutex caller_mu_, mu_;
  std::condition_variable cv_;
  std::vector<std::thread> threads_;
  std::atomic<uint64_t> ticket_{0};
  struct Job {
    std::atomic<const std::function<void(int64_t, int64_t)>*> fn{nullptr};
    std::atomic<int64_t> n{0}, grain{1};
    std::atomic<int64_t> done{0};
  };
  Job jobs_[2];
  std::atomic<int> sleeping_{0};
  uint64_t generation_ = 0;
  bool stop_ = false;
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: helper threads must not be joined during static teardown
  return *p;
}

thread_local bool in_parallel = false;

}  // namespace

int num_threads() { return std::max(1, omp_get_max_threads()); }

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int threads = num_threads();
  if (threads == 1 || n <= grain || in_parallel) {
    fn(0, n);
    return;
  }
  in_parallel = true;
  pool().run(n, grain, threads - 1, [&](int64_t b, int64_t e) {
    const bool outer = in_parallel;
    in_parallel = true;
    fn(b, e);
    in_parallel = outer;
  });
  in_parallel = false;
}

}  // namespace cpu
}  // namespace llama_fast
