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

// Read once (sysconf / sysfs), then fixed for the process.
const Tuning& tuning();

// The quantized weight formats whose linears switch from their GEMV kernels to the prefill GEMM (gemm.cpp) at some
// number of activation rows.
enum class QuantGemm {
  kInt,   // int4 / int8 QuantWeight (quant_linear.cpp)
  kGgml,  // ggml blocks (kquant_linear.cpp)
};
// From how many activation rows a linear on `format` weights runs the GEMM instead of its GEMV kernels (both the
// ops and the CPU decode plan, which call the same kernel entries). What decides it is the instruction set in
// effect (cpu::isa(), read at each call: tests lower it): the GEMV kernels read the weights once per call but pay
// their unpacking per activation row (or per few rows), the GEMM unpacks each weight once and then spends one fp32
// FMA per weight and row. With AVX512-VNNI the GEMVs multiply in int16 (vpdpwssd) and stay ahead for a while;
// without it they multiply in fp32 after unpacking, and the GEMM's register tile wins early. The numbers are the
// crossovers measured by benchmarks/bench_quant_crossover.py (docs/KERNELS.md); LLAMA_FAST_QUANT_GEMM_ROWS /
// LLAMA_FAST_KQUANT_GEMM_ROWS override them (for such measurements), never below 1. Always at most
// kMaxGemvRows + 1: beyond a decode step's rows the GEMV kernels are not used at all.
int64_t quant_gemm_from_rows(QuantGemm format);

}  // namespace cpu
}  // namespace llama_fast
