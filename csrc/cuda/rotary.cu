// rotary_: in-place rotate_half rotary embedding of q and k from the fp32 cos/sin cache, one block per token.
#include <cmath>

#include "common/rotary_math.h"
#include "cuda/cuda_utils.cuh"

namespace llama_fast {
namespace cuda {
namespace {

constexpr int kThreads = 128;

template <typename T>
__device__ __forceinline__ void rotate_heads(T* base, const int64_t head_stride, int heads, int half, const float* c,
                                             const float* s, bool poison) {
  for (int idx = threadIdx.x; idx < heads * half; idx += kThreads) {
    const int h = idx / half, i = idx - h * half;
    T* x = base + h * head_stride;
    float y1 = NAN, y2 = NAN;
    if (!poison) rotary::rotate_pair(to_float(x[i]), to_float(x[i + half]), c[i], s[i], &y1, &y2);
    x[i] = from_float<T>(y1);
    x[i + half] = from_float<T>(y2);
  }
}

template <typename T, typename Pos>
__global__ void __launch_bounds__(kThreads) rotary_kernel(RotaryArgs a) {
  const int64_t b = blockIdx.x / a.t, t = blockIdx.x - b * a.t;
  const int64_t pos = static_cast<const Pos*>(a.positions)[blockIdx.x];
  const bool poison = pos < 0 || pos >= a.max_pos;
  const int half = a.head_dim / 2;
  const int64_t row = poison ? 0 : pos * half;
  T* q = static_cast<T*>(a.q) + b * a.q_stride[0] + t * a.q_stride[1];
  T* k = static_cast<T*>(a.k) + b * a.k_stride[0] + t * a.k_stride[1];
  rotate_heads(q, a.q_stride[2], a.hq, half, a.cos + row, a.sin + row, poison);
  rotate_heads(k, a.k_stride[2], a.hkv, half, a.cos + row, a.sin + row, poison);
}

}  // namespace

cudaError_t rotary(DType dt, const RotaryArgs& a, cudaStream_t stream) {
  const int64_t tokens = a.batch * a.t;
  if (tokens == 0) return cudaSuccess;
  LF_DISPATCH_DTYPE(dt, T, {
    if (a.positions_int64)
      rotary_kernel<T, int64_t><<<static_cast<unsigned>(tokens), kThreads, 0, stream>>>(a);
    else
      rotary_kernel<T, int32_t><<<static_cast<unsigned>(tokens), kThreads, 0, stream>>>(a);
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace llama_fast
