// Run-time CPU feature dispatch for the CPU kernels. Baseline is x86-64-v3 (AVX2 + FMA + F16C); AVX-512
// paths are compiled with function-level target attributes and picked here. LLAMA_FAST_CPU_ISA=avx2 (or
// portable) forces a lower path so the tests can exercise each one on an AVX-512 machine.
#pragma once
#include <string>

namespace llama_fast {
namespace cpu {

// Ordered: each level has everything below it. kAvx512Vnni: AVX-512 with AVX512-VNNI (the int4/int8/K-quant
// integer GEMVs); kAvx512Bf16: that plus AVX512-BF16 (the bf16 dot products of linear.cpp).
enum class Isa { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Vnni = 3, kAvx512Bf16 = 4 };

// The best instruction set this CPU supports, lowered by LLAMA_FAST_CPU_ISA; read once.
Isa isa();
// The best instruction set this CPU supports, whatever LLAMA_FAST_CPU_ISA / set_isa chose: for kernels whose
// choice follows the hardware rather than the level (kquant_linear_fma.cpp).
Isa detected_isa();
const char* isa_name(Isa isa);
// Lowers the instruction set to `name` (portable, avx2, avx512, avx512_vnni, avx512_bf16; never above what the
// CPU has), for tests that exercise each path in one process. Throws std::invalid_argument on an unknown name.
void set_isa(const char* name);
// Whether this CPU has AVX-VNNI (the VEX-encoded vpdpwssd of Alder Lake and later, Zen 5): outside the chain of
// levels above (Zen 4 has AVX512-VNNI without it); the 256-bit integer GEMVs (cpu/vnni256.h) use it when the
// level has no AVX512-VNNI.
bool has_avx_vnni();
// Whether the GEMVs of quantized weights take their fp32-FMA kernels (kquant_linear_fma.cpp for ggml blocks,
// quant_linear_avx2.cpp for int4 / int8): at the avx2 level on a CPU without AVX512-VNNI or AVX-VNNI, where the
// integer kernels' two limbs cost more than widening the codes to fp32. LLAMA_FAST_FMA_GEMV=0 turns them off,
// LLAMA_FAST_FMA_GEMV=1 forces them at the avx2 level on any CPU (so VNNI machines test these paths too); read
// once. Follows set_isa (the level is read on each call).
bool fp32_fma_gemv();
// Whether LLAMA_FAST_FMA_GEMV=1 forces them (and fp32_fma_gemv() holds): kernels that use them only where they
// measured faster (quant_linear_avx2.cpp) take them for every call.
bool fp32_fma_gemv_forced();

// This CPU's per-core data caches in bytes, for the blocking of the prefill GEMM (gemm.cpp): tile sizes follow
// from them instead of from one machine's measurements. Read once (sysconf); 32 KiB / 1 MiB where unknown.
struct CacheSizes {
  long l1d, l2;
};
CacheSizes cache_sizes();

}  // namespace cpu
}  // namespace llama_fast
