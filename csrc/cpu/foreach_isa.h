// Compiles the including kernel file once per instruction set (the idea of Highway's foreach_target).
//
// A kernel file `cpu/foo.cpp` defines LF_ISA_SELF "cpu/foo.cpp" and includes this header; this header then
// re-includes that file with LF_ISA set to portable, avx2 and avx512 (x86 only), each time inside a
// `#pragma GCC target` region and after the matching cpu/simd.h, so the same templated kernel source becomes
// three namespaces llama_fast::cpu::{portable,avx2,avx512}. The dispatching code picks one at run time with
// LF_DISPATCH (cpu::isa()). The AVX-512 pass may also use AVX512-BF16 intrinsics, but only in code that a
// run-time check of cpu::isa() == Isa::kAvx512Bf16 guards (AVX512-VNNI ones: isa() >= Isa::kAvx512Vnni).
#ifndef LF_ISA_SELF
#error "define LF_ISA_SELF (the including file's path) before including cpu/foreach_isa.h"
#endif
// Standard headers first, outside any target region (their inline functions must keep the baseline target).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/half_float.h"
#include "common/quant_format.h"
#include "cpu/cpu_features.h"
#include "cpu/tuning.h"
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LF_HAVE_X86 1
#endif

#define LF_ISA portable
#define LF_ISA_LEVEL 0
#include "cpu/simd.h"
#include LF_ISA_SELF
#undef LF_ISA
#undef LF_ISA_LEVEL

#ifdef LF_HAVE_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define LF_ISA avx2
#define LF_ISA_LEVEL 1
#include "cpu/simd.h"
#include LF_ISA_SELF
#undef LF_ISA
#undef LF_ISA_LEVEL
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
#define LF_ISA avx512
#define LF_ISA_LEVEL 2
#include "cpu/simd.h"
#include LF_ISA_SELF
#undef LF_ISA
#undef LF_ISA_LEVEL
#pragma GCC pop_options
#endif

#undef LF_ISA_SELF

// LF_DISPATCH(fn, args...): calls <isa>::fn(args...) for the instruction set cpu::isa() chose.
#ifndef LF_DISPATCH
#ifdef LF_HAVE_X86
#define LF_DISPATCH(fn, ...)                                                                   \
  do {                                                                                         \
    switch (::llama_fast::cpu::isa()) {                                                        \
      case ::llama_fast::cpu::Isa::kAvx512Bf16:                                                \
      case ::llama_fast::cpu::Isa::kAvx512Vnni:                                                \
      case ::llama_fast::cpu::Isa::kAvx512: ::llama_fast::cpu::avx512::fn(__VA_ARGS__); break; \
      case ::llama_fast::cpu::Isa::kAvx2: ::llama_fast::cpu::avx2::fn(__VA_ARGS__); break;     \
      default: ::llama_fast::cpu::portable::fn(__VA_ARGS__); break;                            \
    }                                                                                          \
  } while (0)
#else
#define LF_DISPATCH(fn, ...) ::llama_fast::cpu::portable::fn(__VA_ARGS__)
#endif
#endif
