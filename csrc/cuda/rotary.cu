// rotary_: in-place rotate_half rotary embedding of q and k from the fp32 cos/sin cache.
//
// Grid (token, head chunk): a block rotates kThreads (head, pair) items of one token, q's heads first, then k's.
// Spreading a token's heads over blocks matters for decode, where a whole step is one or a few tokens: one
// block per token would put a 32-head step on a single SM, looping 16 times per thread.
#include <cmath>

#include "common/rotary_math.h"
#include "cuda/cuda_utils.cuh"

namespace llama_fast {
namespace cuda {
namespace {

constexpr int kThreads = 128;

template <typename T, typename Pos>
__global__ void __launch_bounds__(kThreads) rotary_kernel(RotaryArgs a) {
  const int half = a.head_dim / 2;
  const int item = blockIdx.y * kThreads + threadIdx.x;  // (head, pair) over q's heads then k's
  if (item >= (a.hq + a.hkv) * half) return;
  const int64_t b = blockIdx.x / a.t, t = blockIdx.x - b * a.t;
  const int64_t pos = static_cast<const Pos*>(a.positions)[blockIdx.x];
  const bool poison = pos < 0 || pos >= a.max_pos;
  const int64_t row = poison ? 0 : pos * half;
  int h = item / half;
  const int i = item - h * half;
  T* x;
  if (h < a.hq) {
    x = static_cast<T*>(a.q) + b * a.q_stride[0] + t * a.q_stride[1] + h * a.q_stride[2];
  } else {
    h -= a.hq;
    x = static_cast<T*>(a.k) + b * a.k_stride[0] + t * a.k_stride[1] + h * a.k_stride[2];
  }
  float y1 = NAN, y2 = NAN;
  if (!poison) rotary::rotate_pair(to_float(x[i]), to_float(x[i + half]), a.cos[row + i], a.sin[row + i], &y1, &y2);
  x[i] = from_float<T>(y1);
  x[i + half] = from_float<T>(y2);
}

}  // namespace

cudaError_t rotary(DType dt, const RotaryArgs& a, cudaStream_t stream) {
  const int64_t tokens = a.batch * a.t;
  if (tokens == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(tokens),
                  static_cast<unsigned>(ceil_div(static_cast<int64_t>(a.hq + a.hkv) * (a.head_dim / 2), kThreads)));
  LF_DISPATCH_DTYPE(dt, T, {
    if (a.positions_int64)
      rotary_kernel<T, int64_t><<<grid, kThreads, 0, stream>>>(a);
    else
      rotary_kernel<T, int32_t><<<grid, kThreads, 0, stream>>>(a);
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace llama_fast
