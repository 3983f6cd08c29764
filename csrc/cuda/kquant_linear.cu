// x @ W^T for W in ggml's K-quant / Q5_0 / Q5_1 blocks read as stored (csrc/common/ggml_blocks.h, the same
// decoding the CPU kernel and the reference use).
//
// One warp per weight row, up to kRows activation rows per pass (the row's blocks are read once for all of
// them). The row is walked in chunks of 256 weights (one K-quant block, or eight Q5_0 / Q5_1 blocks): lane l
// takes the 8 consecutive weights 8l..8l+7 of a chunk, which lie in one sub-block of 16, so it decodes one
// (scale, offset) pair and folds them out of the sums: sum_e x_e (q_e s + o) = s * sum_e x_e q_e + o * sum_e x_e.
#include "common/ggml_blocks.h"
#include "cuda/cuda_utils.cuh"
#include "cuda/kquant_linear.h"

namespace llama_fast {
namespace cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 8;
constexpr int kPerLane = 8;  // weights per lane and chunk: 32 lanes x 8 = 256

struct HardF16 {
  __device__ __forceinline__ float operator()(const uint8_t* p) const {
    const unsigned short h = static_cast<unsigned short>(p[0] | (p[1] << 8));
    return __half2float(__ushort_as_half(h));
  }
};

template <typename T, ggml::BlockType kType>
__global__ void __launch_bounds__(kThreads) kquant_gemv_kernel(KQuantLinearArgs a) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kRows;
  const int lane = threadIdx.x & 31;
  if (n >= a.n) return;
  constexpr int bw = ggml::block_weights(kType);
  const int bb = ggml::block_bytes(kType);
  const uint8_t* row = a.blocks + n * (a.k / bw) * bb;
  const T* x = static_cast<const T*>(a.x);
  const int rows = static_cast<int>(a.m - m0 < kRows ? a.m - m0 : kRows);
  float acc[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = 0.f;
  for (int64_t c = 0; c < a.k; c += 256) {
    const int64_t g = c + lane * kPerLane;  // this lane's first weight
    if (g >= a.k) break;                    // a Q5_0 / Q5_1 row's last, partial chunk
    const uint8_t* b = row + (g / bw) * bb;
    const int e0 = static_cast<int>(g % bw);
    float scale, offset;
    ggml::sub_block_scale_with(kType, b, e0 / ggml::kSubBlock, &scale, &offset, HardF16{});
    float q[kPerLane];
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) q[e] = static_cast<float>(ggml::block_code(kType, b, e0 + e));
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r >= rows) break;
      const T* xr = x + (m0 + r) * a.k + g;
      float dot = 0.f, sum = 0.f;
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) {
        const float xv = to_float(xr[e]);
        dot += xv * q[e];
        sum += xv;
      }
      acc[r] += dot * scale + sum * offset;
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (r >= rows) break;
    const float v = warp_sum(acc[r]);
    if (lane == 0) {
      const float bias = a.bias ? to_float(static_cast<const T*>(a.bias)[n]) : 0.f;
      static_cast<T*>(a.out)[(m0 + r) * a.ldo + n] = from_float<T>(v + bias);
    }
  }
}

template <typename T>
cudaError_t launch_typed(const KQuantLinearArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((a.n + kWarps - 1) / kWarps), static_cast<unsigned>((a.m + kRows - 1) / kRows));
  switch (static_cast<ggml::BlockType>(a.type)) {
    case ggml::BlockType::kQ4K: kquant_gemv_kernel<T, ggml::BlockType::kQ4K><<<grid, kThreads, 0, stream>>>(a); break;
    case ggml::BlockType::kQ5K: kquant_gemv_kernel<T, ggml::BlockType::kQ5K><<<grid, kThreads, 0, stream>>>(a); break;
    case ggml::BlockType::kQ6K: kquant_gemv_kernel<T, ggml::BlockType::kQ6K><<<grid, kThreads, 0, stream>>>(a); break;
    case ggml::BlockType::kQ2K: kquant_gemv_kernel<T, ggml::BlockType::kQ2K><<<grid, kThreads, 0, stream>>>(a); break;
    case ggml::BlockType::kQ3K: kquant_gemv_kernel<T, ggml::BlockType::kQ3K><<<grid, kThreads, 0, stream>>>(a); break;
    case ggml::BlockType::kQ5_0: kquant_gemv_kernel<T, ggml::BlockType::kQ5_0><<<grid, kThreads, 0, stream>>>(a); break;
    case ggml::BlockType::kQ8_0: kquant_gemv_kernel<T, ggml::BlockType::kQ8_0><<<grid, kThreads, 0, stream>>>(a); break;
    default: kquant_gemv_kernel<T, ggml::BlockType::kQ5_1><<<grid, kThreads, 0, stream>>>(a); break;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t kquant_linear(DType dt, const KQuantLinearArgs& a, cudaStream_t stream) {
  if (a.m == 0 || a.n == 0) return cudaSuccess;
  switch (dt) {
    case DType::kF32: return launch_typed<float>(a, stream);
    case DType::kF16: return launch_typed<__half>(a, stream);
    default: return launch_typed<__nv_bfloat16>(a, stream);
  }
}

}  // namespace cuda
}  // namespace llama_fast
