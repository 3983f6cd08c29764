// silu_and_mul: [rows, 2I] = [gate | up] -> silu(gate) * up, computed in fp32 and rounded once.
#include <algorithm>

#include "common/activation_math.h"
#include "cuda/cuda_utils.cuh"

namespace llama_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// grid (column blocks, rows): each thread handles one 16-byte vector (or one element when unaligned).
template <typename T, bool kVectorized>
__global__ void __launch_bounds__(kThreads)
    silu_and_mul_kernel(const T* __restrict__ gate_up, T* __restrict__ out, int64_t inter) {
  const int64_t row = blockIdx.y;
  const T* gate = gate_up + row * 2 * inter;
  const T* up = gate + inter;
  T* o = out + row * inter;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if constexpr (kVectorized) {
    constexpr int N = Vec16<T>::kN;
    if (i >= inter / N) return;
    const Vec16<T> g = reinterpret_cast<const Vec16<T>*>(gate)[i];
    const Vec16<T> u = reinterpret_cast<const Vec16<T>*>(up)[i];
    Vec16<T> r;
#pragma unroll
    for (int j = 0; j < N; ++j) r.v[j] = from_float<T>(activation::silu_mul(to_float(g.v[j]), to_float(u.v[j])));
    reinterpret_cast<Vec16<T>*>(o)[i] = r;
  } else {
    if (i >= inter) return;
    o[i] = from_float<T>(activation::silu_mul(to_float(gate[i]), to_float(up[i])));
  }
}

}  // namespace

cudaError_t silu_and_mul(DType dt, const void* gate_up, void* out, int64_t rows, int64_t inter, cudaStream_t stream) {
  if (rows == 0 || inter == 0) return cudaSuccess;
  LF_DISPATCH_DTYPE(dt, T, {
    const bool vectorized = inter % Vec16<T>::kN == 0 && aligned16(gate_up) && aligned16(out);
    const int64_t per_row = vectorized ? inter / Vec16<T>::kN : inter;
    // Rows go on grid.y (at most 65535 per launch); longer inputs are launched in slices.
    for (int64_t r0 = 0; r0 < rows; r0 += 65535) {
      const dim3 grid(static_cast<unsigned>(ceil_div(per_row, kThreads)),
                      static_cast<unsigned>(std::min<int64_t>(65535, rows - r0)));
      const T* in = static_cast<const T*>(gate_up) + r0 * 2 * inter;
      T* o = static_cast<T*>(out) + r0 * inter;
      if (vectorized)
        silu_and_mul_kernel<T, true><<<grid, kThreads, 0, stream>>>(in, o, inter);
      else
        silu_and_mul_kernel<T, false><<<grid, kThreads, 0, stream>>>(in, o, inter);
    }
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace llama_fast
