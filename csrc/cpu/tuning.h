// Machine-dependent choices of the CPU kernels, made at run time from this CPU's own cache sizes instead of
// constants measured on one machine (issue 14: a lead tuned on one microarchitecture was gone on the next).
//
// Only what depends on the machine lives here. Block shapes that follow from the ISA's register file stay next
// to their kernels, and the thread pool's waits are bounded in time, not in pause instructions (a pause takes
// ~10 to ~140 cycles depending on the core).
#pragma once
#include <cstdint>

namespace llama_fast {
namespace cpu {

struct Tuning {
  // Data cache sizes as the OS reports them (per core for L1d / L2; L3 as one instance; 0 = unknown).
  int64_t l1d_bytes, l2_bytes, l3_bytes;
  // How far ahead of use the weight-streaming GEMV kernels software-prefetch (bytes; a multiple of 64). Far
  // enough to cover the DRAM latency at one core's share of the bandwidth (~100-200 ns x 10-20 GB/s: 1-4 KiB),
  // near enough that the lines of the few weight rows in flight are still in L1 when they are read: a quarter
  // of L1d, within [2, 16] KiB. On the Intel Xeon (48 KiB L1d) the int4 / int8 GEMVs streamed from DRAM as
  // fast with 2, 8 or 16 KiB and ~1.7x slower with none; Zen 4 (32 KiB) gets the 8 KiB measured there.
  // LLAMA_FAST_PREFETCH_BYTES overrides it (for such measurements; 0 turns the software prefetch off).
  int64_t prefetch_bytes;
};

// Read once (sysfs / sysconf), then fixed for the process.
const Tuning& tuning();

// Weight buffers on transparent huge pages (llama_fast/weight_arena.py registers each one it makes; `add` false
// removes it). On 2 MiB pages the hardware prefetchers follow a weight stream across 4 KiB boundaries by themselves
// and the dense GEMVs' software prefetch only costs instructions: on a Zen 4 guest a bf16 decode step took 12.2 ms
// of CPU without it and 14.3 with it on huge pages, 23.7 without and 19.6 with it on 4 KiB pages. Up to 64 ranges;
// a hint only (a stale range costs speed, never correctness).
void set_huge_page_range(const void* begin, int64_t bytes, bool add);
// The software prefetch distance for a dense weight stream starting at w: 0 on a registered huge-page buffer,
// tuning().prefetch_bytes otherwise.
int64_t dense_prefetch_bytes(const void* w);

}  // namespace cpu
}  // namespace llama_fast
