// The integer GEMVs of quant_linear_vnni.cpp (int4 / int8) and kquant_linear.cpp (ggml blocks) over 256-bit
// vectors, for x86 CPUs without AVX512-VNNI: every x86-64-v3 machine (Haswell and later, Zen 1-3), and the
// avx2 / avx512 dispatch levels of this library (LLAMA_FAST_CPU_ISA=avx2 exercises them on any AVX2 machine).
//
// Same arithmetic as the VNNI kernels: the activations as 29-bit fixed point in two int16 limbs (one for bf16),
// prepared exactly as vnni::prepare prepares them (same layout, same values), and int32 sums of int16 products
// taken in pairs. vpdpwssd, the VNNI instruction, is vpmaddwd (_mm256_madd_epi16: the pair sums) followed by
// vpaddd, so on plain AVX2 each of its 16 lanes is two 8-lane ops; on CPUs with AVX-VNNI (the VEX encoding:
// Alder Lake and later, Zen 5) it is the one instruction _mm256_dpwssd_avx_epi32, chosen at run time. The
// kernels keep the VNNI kernels' 16 fp32 lanes as two 8-lane halves and repeat their fp32 operations lane by
// lane, in the same order, so that they return the same bits (tests/ops/test_quant_linear.py checks it).
#pragma once
#include <cstdint>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/kquant_linear.h"

namespace llama_fast {
namespace cpu {
namespace vnni256 {

// Whether the dispatch level is one these kernels serve: AVX2 or AVX-512 without AVX512-VNNI (x86 only).
bool available();
// Whether the kernels use AVX-VNNI's vpdpwssd (this CPU has it and LLAMA_FAST_AVX_VNNI is not 0), else
// vpmaddwd + vpaddd.
bool uses_avx_vnni();

// int4 / int8 (quant_linear.cpp): whether the kernel takes `w` (int4 or int8, group_size a multiple of 32) at
// this dispatch level; prepare and rows have the contracts of vnni::prepare and vnni::rows
// (quant_linear_vnni.h), and prepare writes the same xp, xsum and xscale.
bool supports(const QuantWeight& w);
// On AVX2 cores without VNNI (cpu::fp32_fma_gemv) prepare may instead lay the activations out for the fp32-FMA
// kernel (quant_linear_avx2.cpp's header), marked by xscale -1, which rows() recognizes.
bool prepare(bool bf16, const void* x, int64_t m, const QuantWeight& w, int16_t* xp, float* xsum, float* xscale);
// vnni::prepare's fixed point always (kquant_linear_avx2.cpp's kernels read only that).
bool prepare_fixed_point(bool bf16, const void* x, int64_t m, const QuantWeight& w, int16_t* xp, float* xsum,
                         float* xscale);
void rows(const QuantWeight& w, const int16_t* xp, const float* xsum, const float* xscale, int64_t m, bool two_limbs,
          int64_t n0, int64_t n1, float* out, int64_t ldo);

// ggml blocks (kquant_linear.cpp): whether every segment's type has a kernel here, and out[m, ldo] = x @ W^T over
// the segments as kquant::linear computes it. False (nothing written) when x holds values the fixed point cannot
// carry (inf, NaN).
bool kquant_supports(const std::vector<kquant::Segment>& segs);
bool kquant_linear(bool bf16, const void* x, int64_t m, const std::vector<kquant::Segment>& segs, int64_t k, float* out,
                   int64_t ldo);

}  // namespace vnni256
}  // namespace cpu
}  // namespace llama_fast
