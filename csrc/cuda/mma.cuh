// Tensor-core helpers: the mma.sync m16n8k16 instruction (fp16 / bf16 in, fp32 accumulate) and the
// packing of two 16-bit values into one of its 32-bit fragment registers.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"), with g = lane / 4 and t = lane % 4:
//   A 16x16 row-major, 4 registers: a0 = A[g][2t..2t+1]   a1 = A[g+8][2t..2t+1]
//                                   a2 = A[g][2t+8..+9]   a3 = A[g+8][2t+8..+9]
//   B 16x8 "col" (B[k][n]), 2 regs: b0 = B[2t..2t+1][g]   b1 = B[2t+8..2t+9][g]
//   C/D 16x8 fp32, 4 floats:        c0,c1 = C[g][2t..2t+1]  c2,c3 = C[g+8][2t..2t+1]
// so the C fragments of two adjacent n-tiles are exactly the A fragment of a 16-wide k-chunk, which lets the
// attention kernel feed P = softmax(S) from registers straight into P @ V.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace llama_fast {
namespace cuda {

__device__ __forceinline__ uint16_t bits16(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ uint16_t bits16(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }

template <typename T>
__device__ __forceinline__ uint32_t pack2(T lo, T hi) {
  return static_cast<uint32_t>(bits16(lo)) | (static_cast<uint32_t>(bits16(hi)) << 16);
}

// Two consecutive 16-bit elements (4-byte aligned) as one register.
template <typename T>
__device__ __forceinline__ uint32_t load2(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

template <typename T>
__device__ __forceinline__ void mma_16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

}  // namespace cuda
}  // namespace llama_fast
