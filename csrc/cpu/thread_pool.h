// A small work-claiming thread pool for the CPU kernels (instead of OpenMP parallel regions).
//
// Why: a decode step runs ~250 parallel loops. With OpenMP each ends in a barrier that waits for every thread
// to arrive, so on a busy machine (more runnable threads than cores) a helper thread that the OS has not
// scheduled yet stalls the step for a whole time slice, and 2-thread decode got 10-20x slower than 1-thread.
// Here the calling thread and the helpers claim chunks from one atomic counter; the caller waits only for
// chunks that were actually claimed, never for a helper that has not shown up (that helper simply finds no
// work left). On an idle machine it behaves like a static OpenMP split.
#pragma once
#include <cstdint>
#include <functional>

namespace llama_fast {
namespace cpu {

// Threads the kernels use: omp_get_max_threads() (OMP_NUM_THREADS / torch.set_num_threads).
int num_threads();

// The helper threads started so far and how many of them are blocked (not spinning): an idle helper spins
// about a millisecond after its last loop, then blocks, so that it takes no core from the rest of the process.
struct PoolState {
  int helpers, sleeping;
};
PoolState pool_state();

// Calls fn(begin, end) over [0, n) in chunks of `grain` (the last may be shorter) on the calling thread and
// up to num_threads() - 1 helper threads. Returns when every chunk is done. Runs inline when n <= grain or
// with one thread. Not reentrant: fn must not call parallel_for (nested calls run inline). If fn throws (on
// any thread), the chunks not yet claimed are skipped and the first exception is rethrown here once every
// claimed chunk has finished (fn is never called after parallel_for returns).
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

// The grain that gives each of the num_threads() threads one contiguous range of [0, n) (rounded up to a multiple
// of `align`), for the decode GEMVs that stream their weight rows from memory. Chunks handed out in turn cut each
// thread's stream at every chunk, and each new stream starts with the hardware prefetchers not yet running ahead:
// on the Intel Xeon (2 threads, SmolLM2 bf16 decode) 16 / 64 / 256 KiB chunks streamed the weights at 18 / 19.5 /
// 23 GB/s and one range per thread at 26.5 (gate_up_proj, decode profile). A helper that has not shown up still
// costs nothing: the caller claims the helper's range once its own is done. The price is on a busy machine: a
// helper preempted inside its range holds up the loop for what is left of it.
int64_t one_range_per_thread(int64_t n, int64_t align);

}  // namespace cpu
}  // namespace llama_fast
