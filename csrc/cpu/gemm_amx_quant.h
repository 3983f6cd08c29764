// The int4 / int8 weight-only quantized GEMM on Intel AMX (gemm_amx_quant.cpp): used by quant_linear
// (quant_linear.cpp) from cpu::amx_quant_from_rows() activation rows and by gemm_quant (gemm.cpp) where the CPU has
// AMX-BF16 (amx_bf16_available(), cpu/gemm_amx.h) and the top ISA level is in effect; and on ggml blocks by
// kquant::gemm (gemm.cpp), which kquant::linear calls from cpu::amx_kquant_from_rows rows.
#pragma once
#include <cstdint>
#include <vector>

#include "common/ggml_blocks.h"
#include "cpu/kernels.h"
#include "cpu/kquant_linear.h"

namespace llama_fast {
namespace cpu {

// Whether gemm_amx_quant takes this weight's format: int4 or int8 codes, groups of a multiple of 32 along K.
bool amx_quant_supports(const QuantWeight& w);
// Whether the callers run gemm_amx_quant for w: supported, AMX-BF16 usable (amx_bf16_available(): CPU, OS
// permission, LLAMA_FAST_AMX) and the top ISA level in effect (tests and benchmarks reach the other paths by
// lowering the level, as for gemm_dense's bf16 AMX path).
bool amx_quant_available(const QuantWeight& w);

// out[M, N] = x[M, K] @ dequant(w)^T (+ bias[N]), x / bias / out fp32 or bf16 (bf16 = true: uint16_t bits), with the
// activations not rounded: fp32 rows are split exactly into three bf16 digits, and the codes are exact in bf16, so
// the tile unit's products are exact and each group's sum is fp32; then out = sum over groups of
// scale * (codes . x) + offset * sum(x) in fp32, plus the bias, rounded once to the output dtype.
// Returns false, with nothing written, when w's format is not supported or x holds inf / NaN (the digit split
// cannot carry them: inf - inf); the caller then takes another path. Requires amx_bf16_available().
bool gemm_amx_quant(bool bf16, const void* x, const QuantWeight& w, const void* bias, void* out, int64_t m);

// The same GEMM on ggml blocks (kquant::gemm, gemm.cpp): every type (code * scale + offset per group of 32 along K,
// Q8_0, Q4_K, Q5_K, Q5_0, Q5_1; per group of 16, Q6_K, Q2_K, Q3_K).
bool amx_kquant_supports(ggml::BlockType t);
// Every segment's type supported (and K a multiple of its block).
bool amx_kquant_supports(const std::vector<kquant::Segment>& segs, int64_t k);
// Supported, AMX-BF16 usable and the top ISA level in effect, as amx_quant_available.
bool amx_kquant_available(const std::vector<kquant::Segment>& segs, int64_t k);
// out[m, N] (fp32, row stride N) = x[m, K] @ W^T over the segments (stacked along N), x fp32 or bf16 (bf16 = true),
// exact in the activations as gemm_amx_quant. Returns false, with nothing written, when a segment's type is not
// supported or x holds inf / NaN. Requires amx_bf16_available().
bool gemm_amx_kquant(bool bf16, const void* x, int64_t m, const std::vector<kquant::Segment>& segs, int64_t k,
                     float* out);

}  // namespace cpu
}  // namespace llama_fast
