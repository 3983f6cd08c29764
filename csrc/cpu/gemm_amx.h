// The bf16 GEMM on Intel AMX (gemm_amx.cpp): used by gemm_dense (gemm.cpp) for bf16 activations and weights where
// the CPU has AMX-BF16 and the OS grants the tile state.
#pragma once
#include <cstdint>

namespace llama_fast {
namespace cpu {

// Whether this process can run AMX-BF16 tile instructions: the CPU has AMX-TILE and AMX-BF16 and Linux granted
// the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM, requested once here). LLAMA_FAST_AMX=0 turns it off (for
// before / after measurements). Read once.
bool amx_bf16_available();
// Whether the kernels use AMX now: amx_bf16_available() and the top ISA level in effect (cpu_features.h), so that
// lowering the level (tests, benchmarks, LLAMA_FAST_CPU_ISA) reaches the AVX-512 / AVX2 paths. The one gate of every
// AMX path (bf16 GEMM, quantized GEMM, their row thresholds).
bool amx_in_effect();

// out[M, N] = x[M, K] @ w[N, K]^T (+ bias[N]), all bf16 (uint16_t bits): each output a fp32 sum of exact bf16
// products, plus the bias, rounded once to bf16 (nearest even), the contract of gemm.cpp's fp32 GEMM; only the
// order of the fp32 additions differs. Requires amx_bf16_available().
void gemm_amx_bf16(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* out, int64_t m, int64_t n,
                   int64_t k);

}  // namespace cpu
}  // namespace llama_fast
