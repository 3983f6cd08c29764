// int4 GEMV on AVX512-VNNI integer dot products (quant_linear_vnni.cpp): the decode path of quant_linear for
// int4 / int8 weights whose group size is a multiple of 32, at the dispatch level avx512_vnni and above.
#pragma once
#include <cstdint>

#include "cpu/kernels.h"

namespace llama_fast {
namespace cpu {
namespace vnni {

// Whether this kernel takes `w` on this CPU (int4 or int8, group_size a multiple of 32, isa() >= kAvx512Vnni).
bool supports(const QuantWeight& w);

// The activations of `m` rows x[m, K] (fp32 or bf16) as fixed point, prepared once per call for rows():
// xp holds 2K int16 per row (two limbs for fp32 rows, one for bf16 rows; for int4 de-interleaved per
// 64-element chunk), xsum[m, K / group_size] the per-group sums of x as represented, xscale[m] the value of
// one unit.
// Returns false when a row holds an inf or NaN, or nothing above ~2^-97 in magnitude, which this fixed point
// cannot carry (the caller takes another path).
bool prepare(bool bf16, const void* x, int64_t m, const QuantWeight& w, int16_t* xp, float* xsum, float* xscale);

// out[mm * ldo + n] for mm < m (1..8) and n in [n0, n1): the dot products of the prepared rows with weight
// rows n. `two_limbs`: the rows were prepared from fp32.
void rows(const QuantWeight& w, const int16_t* xp, const float* xsum, const float* xscale, int64_t m, bool two_limbs,
          int64_t n0, int64_t n1, float* out, int64_t ldo);

}  // namespace vnni
}  // namespace cpu
}  // namespace llama_fast
