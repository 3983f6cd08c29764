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
  // Whether the dense GEMVs software-prefetch weights that lie on transparent huge pages too (on 4 KiB pages they
  // always do). Measured both ways, SmolLM2 bf16 decode, 2 threads: on an AMD Zen 4 guest the prefetch only cost
  // instructions (12.2 ms of CPU per step without it, 14.3 with it); on the Intel Xeon KVM guest (Sapphire Rapids
  // class, AVX512-BF16 + AMX) it sped the GEMVs up: 77-85 tok/s without it, 91-100 with it (gate_up_proj 25-28 GB/s
  // against 30-34). Chosen by CPU vendor, true on Intel, false elsewhere, from those two measurements.
  // LLAMA_FAST_HUGE_PAGE_PREFETCH=0 / 1 overrides it.
  bool prefetch_on_huge_pages;
  // Whether the int4 VNNI GEMV (quant_linear_vnni.cpp) prefetches its weight stream into L2 instead of L1. On the AMD
  // Zen 4 guest into L2 was faster (SmolLM2 int4 decode, 2 threads, runs alternated: batch 1 149-185 -> 180-188
  // tok/s, batch 4 249-283 -> 294-315): a line fetched into L1 holds one of its few fill buffers until it is read.
  // The Intel Xeons' measurements were made with L1 (2, 8 and 16 KiB ahead alike), so there it stays: chosen by CPU
  // vendor, false on Intel, true elsewhere. LLAMA_FAST_INT4_PREFETCH_L2=0 / 1 overrides it.
  bool int4_prefetch_into_l2;
};

// Read once (sysfs / sysconf), then fixed for the process.
const Tuning& tuning();

// Weight buffers on transparent huge pages (llama_fast/weight_arena.py registers each one it makes; `add` false
// removes it). On 2 MiB pages the hardware prefetchers follow a weight stream across 4 KiB boundaries by themselves
// and the dense GEMVs' software prefetch only costs instructions: on a Zen 4 guest a bf16 decode step took 12.2 ms
// of CPU without it and 14.3 with it on huge pages, 23.7 without and 19.6 with it on 4 KiB pages. Up to 64 ranges;
// a hint only (a stale range costs speed, never correctness).
void set_huge_page_range(const void* begin, int64_t bytes, bool add);
// The software prefetch distance for a dense weight stream starting at w: 0 on a registered huge-page buffer unless
// tuning().prefetch_on_huge_pages, tuning().prefetch_bytes otherwise.
int64_t dense_prefetch_bytes(const void* w);
// The quantized weights whose linears switch from their GEMV kernels to the prefill GEMM (gemm.cpp) at some number
// of activation rows, grouped by GEMV kernel.
enum class QuantGemm {
  kInt4,        // int4 QuantWeight (quant_linear.cpp: quant_linear_vnni.cpp / row_tiles.h)
  kInt8,        // int8 QuantWeight
  kGgmlSuper,   // ggml super-blocks of 256, Q2_K..Q6_K (kquant_linear.cpp: rows_k, 4 activation rows per pass)
  kGgmlBlock32  // ggml blocks of 32, Q5_0 / Q5_1 / Q8_0 (rows_b32, 8 rows per pass)
};
// From how many activation rows a linear on `format` weights runs the GEMM instead of its GEMV kernels (the ops and
// the CPU decode plan alike: they call the same kernel entries). A choice by instruction set in effect (cpu::isa(),
// read at each call: tests lower it), not by one machine's number: the GEMV kernels read the weights once per call
// but unpack them again for every activation row (or every 4 / 8), the GEMM unpacks each weight once and then
// spends one fp32 FMA per weight and row (16 rows per zmm instruction). Whether that wins depends on the GEMV's
// cost per row, which the ISA decides:
// - AVX512-VNNI: the GEMVs multiply int16 limbs with vpdpwssd, as many products per instruction as the GEMM's
//   fp32 FMAs, so the GEMM wins only once the unpacking it saves outweighs its own fill: int4 / int8 not within a
//   decode step (their GEMV then dequantizes into tiles itself), the K-quants from 48 rows (their per-row work
//   includes the integer sub-block scales), the blocks of 32 from 16.
// - without VNNI the crossovers were measured against the old paths (int4 24 rows, int8 16 against the lookup /
//   tiled GEMV; the ggml blocks 1 / 4 against the portable fp32 GEMV). Since then both have 256-bit integer GEMVs
//   (quant_linear_avx2.cpp, kquant_linear_avx2.cpp) doing the VNNI kernels' work per row at half the width, against
//   a GEMM also half as wide, so they take VNNI's rows (not re-measured).
// Measured with benchmarks/bench_quant_crossover.py (1 thread, Zen 4; docs/KERNELS.md has the table). At most
// kMaxGemvRows + 1: prefill always takes the GEMM. LLAMA_FAST_QUANT_GEMM_ROWS (int4 / int8) and
// LLAMA_FAST_KQUANT_GEMM_ROWS (ggml blocks) override it for such measurements (at least 1; a larger value keeps
// the GEMV kernels where they take more rows: the ggml blocks' VNNI kernel takes any number, the int4 / int8 op
// runs the GEMM beyond kMaxGemvRows whatever this says).
int64_t quant_gemm_from_rows(QuantGemm format);
// From how many activation rows an int4 / int8 linear runs the AMX tile GEMM (gemm_amx_quant.cpp) where it is
// available, instead of its GEMV kernels; fp32 or bf16 activations (bf16: one tile multiply per group instead of
// three, against a cheaper GEMV): 8 fp32 / 10 bf16 rows, measured (tuning.cpp). LLAMA_FAST_AMX_QUANT_ROWS
// overrides both (at least 1).
int64_t amx_quant_from_rows(bool bf16_activations);
// The same for ggml blocks (kquant::linear) whose segments the AMX GEMM takes (amx_kquant_supports: every type),
// against their VNNI GEMV, by whether a segment has super-blocks of 256 (the K-quants: 32 rows) or all blocks of 32
// (16), either activation dtype (measured: tuning.cpp). LLAMA_FAST_AMX_KQUANT_ROWS overrides it
// (at least 1).
int64_t amx_kquant_from_rows(bool super_blocks);
// From how many activation rows a bf16 dense linear runs the AMX GEMM (gemm_amx.cpp) instead of the GEMV / tiled
// kernels of linear.cpp, where the CPU has AMX (cpu::amx_bf16_available(), top ISA level). Those kernels read each
// weight once per call too but spend AVX-512 instructions per row; a TDPBF16PS tile does 16 rows' multiplies.
// LLAMA_FAST_AMX_BF16_ROWS overrides it (at least 1; above kMaxGemvRows the decode steps never take the AMX GEMM).
int64_t amx_bf16_from_rows();

}  // namespace cpu
}  // namespace llama_fast
