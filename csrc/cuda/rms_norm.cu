// rms_norm and fused_add_rms_norm: one block per row, 128-bit loads, fp32 sum of squares reduced across the
// warp and then the block. Matches the reference's roundings: x + residual is rounded to the dtype (it is the
// new residual stream), the normalized value is rounded to the dtype before the weight multiply.
#include "cuda/cuda_utils.cuh"

namespace llama_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T, bool kVectorized, bool kResidual>
__global__ void __launch_bounds__(kThreads)
    rms_norm_kernel(const T* __restrict__ x, const T* __restrict__ residual, T* __restrict__ residual_out,
                    const T* __restrict__ weight, T* __restrict__ y, int64_t hidden, float eps) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * hidden;
  const T* rr = kResidual ? residual + row * hidden : nullptr;
  T* ro = kResidual ? residual_out + row * hidden : nullptr;
  T* yr = y + row * hidden;
  constexpr int N = Vec16<T>::kN;

  // Pass 1: the (new residual) row's sum of squares.
  float sumsq = 0.0f;
  if constexpr (kVectorized) {
    for (int64_t i = threadIdx.x; i < hidden / N; i += kThreads) {
      Vec16<T> a = reinterpret_cast<const Vec16<T>*>(xr)[i];
      if constexpr (kResidual) {
        const Vec16<T> b = reinterpret_cast<const Vec16<T>*>(rr)[i];
#pragma unroll
        for (int j = 0; j < N; ++j) a.v[j] = from_float<T>(to_float(a.v[j]) + to_float(b.v[j]));
        reinterpret_cast<Vec16<T>*>(ro)[i] = a;
      }
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const float v = to_float(a.v[j]);
        sumsq += v * v;
      }
    }
  } else {
    for (int64_t i = threadIdx.x; i < hidden; i += kThreads) {
      float v = to_float(xr[i]);
      if constexpr (kResidual) {
        const T r = from_float<T>(v + to_float(rr[i]));
        ro[i] = r;
        v = to_float(r);
      }
      sumsq += v * v;
    }
  }
  const float inv_rms = rsqrtf(block_sum(sumsq) / static_cast<float>(hidden) + eps);

  // Pass 2: normalize. Each thread rereads exactly the elements it wrote, so no barrier is needed.
  const T* src = kResidual ? ro : xr;
  if constexpr (kVectorized) {
    for (int64_t i = threadIdx.x; i < hidden / N; i += kThreads) {
      const Vec16<T> a = reinterpret_cast<const Vec16<T>*>(src)[i];
      const Vec16<T> w = reinterpret_cast<const Vec16<T>*>(weight)[i];
      Vec16<T> out;
#pragma unroll
      for (int j = 0; j < N; ++j) out.v[j] = from_float<T>(to_float(w.v[j]) * round_to<T>(to_float(a.v[j]) * inv_rms));
      reinterpret_cast<Vec16<T>*>(yr)[i] = out;
    }
  } else {
    for (int64_t i = threadIdx.x; i < hidden; i += kThreads)
      yr[i] = from_float<T>(to_float(weight[i]) * round_to<T>(to_float(src[i]) * inv_rms));
  }
}

template <typename T, bool kResidual>
void launch(const void* x, const void* residual, void* residual_out, const void* weight, void* y, int64_t rows,
            int64_t hidden, float eps, cudaStream_t stream) {
  const bool vectorized = hidden % Vec16<T>::kN == 0 && aligned16(x) && aligned16(weight) && aligned16(y) &&
                          (!kResidual || (aligned16(residual) && aligned16(residual_out)));
  auto args = [&](auto kernel) {
    kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(residual), static_cast<T*>(residual_out),
        static_cast<const T*>(weight), static_cast<T*>(y), hidden, eps);
  };
  if (vectorized)
    args(rms_norm_kernel<T, true, kResidual>);
  else
    args(rms_norm_kernel<T, false, kResidual>);
}

}  // namespace

cudaError_t rms_norm(DType dt, const void* x, const void* residual, void* residual_out, const void* weight, void* y,
                     int64_t rows, int64_t hidden, float eps, cudaStream_t stream) {
  if (rows == 0 || hidden == 0) return cudaSuccess;
  LF_DISPATCH_DTYPE(dt, T, {
    if (residual != nullptr)
      launch<T, true>(x, residual, residual_out, weight, y, rows, hidden, eps, stream);
    else
      launch<T, false>(x, nullptr, nullptr, weight, y, rows, hidden, eps, stream);
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace llama_fast
