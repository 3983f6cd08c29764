#include "cpu/thread_pool.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
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
// How long an idle helper spins before it blocks, so the many short loops of a decode step never pay a wake-up
// (a ~0.05 ms spin measured ~5% slower decode than ~1 ms). Bounded in time, not in pause instructions: a pause
// takes ~10 to ~140 cycles depending on the microarchitecture. The cost: a spinning helper holds a core, so
// code must not alternate our loops with ATen's (OpenMP) parallel regions in a hot path, whose threads it
// starves (a quantized prefill that did took 2 s for 42 tokens; see ops_cpu.cpp's quant_linear).
constexpr auto kSpinBeforeSleep = std::chrono::microseconds(1000);
// A helper looks at the clock every this many pauses. Past the first kSpinWithoutYield of a wait it also yields
// its core to any other runnable thread (of the user's process or another) each time, so a helper that waits
// long (between decode steps, or after the model stopped) keeps no waiting thread off a core for more than a
// few microseconds; the short gaps between the loops of one step stay pure spinning, as before. With nothing
// else runnable a yield returns at once.
constexpr int kPausesPerCheck = 64;
constexpr auto kSpinWithoutYield = std::chrono::microseconds(100);

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
    job.error = nullptr;
    ticket_.store(gen << kIndexBits, std::memory_order_release);
    if (sleeping_.load(std::memory_order_acquire) > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      cv_.notify_all();
    }
    work(gen);
    // Only chunks a helper actually claimed are waited for; past kSpinWithoutYield (a time, not a count of
    // pauses, whose length varies ~10x between cores) yield, in case its thread got preempted meanwhile.
    if (job.done.load(std::memory_order_acquire) < n) {
      const auto wait_start = std::chrono::steady_clock::now();
      bool yield = false;
      for (int spins = 1; job.done.load(std::memory_order_acquire) < n; ++spins) {
        if (yield) {
          std::this_thread::yield();
          continue;
        }
        LF_PAUSE();
        if (spins % kPausesPerCheck == 0) yield = std::chrono::steady_clock::now() - wait_start >= kSpinWithoutYield;
      }
    }
    // fn threw (on any thread): every claimed chunk has finished and fn is no longer referenced; rethrow here
    if (job.error) std::rethrow_exception(std::exchange(job.error, nullptr));
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
      try {
        (*fn)(begin, end);
      } catch (...) {
        {
          std::lock_guard<std::mutex> lock(error_mu_);
          if (!job.error) job.error = std::current_exception();  // read by the caller after done reaches n
        }
        skip_rest(gen);
      }
      job.done.fetch_add(end - begin, std::memory_order_acq_rel);
    }
  }

  // After an exception: the chunks of generation `gen` nobody has claimed are not run, only counted as done.
  void skip_rest(uint64_t gen) {
    Job& job = jobs_[gen & 1];
    uint64_t t = ticket_.load(std::memory_order_acquire);
    const int64_t n = job.n.load(std::memory_order_relaxed);
    while ((t >> kIndexBits) == gen && static_cast<int64_t>(t & kIndexMask) < n) {
      const int64_t begin = static_cast<int64_t>(t & kIndexMask);
      if (ticket_.compare_exchange_weak(t, (gen << kIndexBits) | static_cast<uint64_t>(n), std::memory_order_acq_rel)) {
        job.done.fetch_add(n - begin, std::memory_order_acq_rel);
        return;
      }
    }
  }

  void helper_loop() {
    uint64_t seen = 0;
    for (;;) {
      int spins = 0;
      auto spin_start = std::chrono::steady_clock::now();
      uint64_t gen;
      while ((gen = ticket_.load(std::memory_order_acquire) >> kIndexBits) == seen) {
        LF_PAUSE();
        if (++spins % kPausesPerCheck != 0) continue;
        const auto waited = std::chrono::steady_clock::now() - spin_start;
        if (waited < kSpinBeforeSleep) {
          if (waited >= kSpinWithoutYield) std::this_thread::yield();
          continue;
        }
        std::unique_lock<std::mutex> lock(mu_);
        sleeping_.fetch_add(1, std::memory_order_acq_rel);
        cv_.wait(lock, [&] { return stop_ || (ticket_.load(std::memory_order_acquire) >> kIndexBits) != seen; });
        sleeping_.fetch_sub(1, std::memory_order_acq_rel);
        if (stop_) return;
        spin_start = std::chrono::steady_clock::now();
      }
      seen = gen;
      work(gen);
    }
  }

 public:
  PoolState state() {
    std::lock_guard<std::mutex> caller(caller_mu_);  // threads_ grows under it
    return {static_cast<int>(threads_.size()), sleeping_.load(std::memory_order_acquire)};
  }

 private:
  void grow(int helpers) {
    while (static_cast<int>(threads_.size()) < helpers) threads_.emplace_back([this] { helper_loop(); });
  }

  std::mutex caller_mu_, mu_, error_mu_;
  std::condition_variable cv_;
  std::vector<std::thread> threads_;
  std::atomic<uint64_t> ticket_{0};
  struct Job {
    std::atomic<const std::function<void(int64_t, int64_t)>*> fn{nullptr};
    std::atomic<int64_t> n{0}, grain{1};
    std::atomic<int64_t> done{0};
    std::exception_ptr error;  // the first exception fn threw (under error_mu_)
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

PoolState pool_state() { return pool().state(); }

int64_t one_range_per_thread(int64_t n, int64_t align) {
  align = std::max<int64_t>(1, align);
  const int64_t threads = num_threads();
  const int64_t per_thread = (std::max<int64_t>(n, 1) + threads - 1) / threads;
  return (per_thread + align - 1) / align * align;
}

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int threads = num_threads();
  if (threads == 1 || n <= grain || in_parallel) {
    fn(0, n);
    return;
  }
  // (restored on the way out, an exception from fn included)
  struct InParallel {
    bool outer = in_parallel;
    InParallel() { in_parallel = true; }
    ~InParallel() { in_parallel = outer; }
  };
  InParallel caller;
  pool().run(n, grain, threads - 1, [&](int64_t b, int64_t e) {
    InParallel chunk;
    fn(b, e);
  });
}

}  // namespace cpu
}  // namespace llama_fast
