// Weight-only quantized GEMV for decode (few activation rows): out[m, n] = sum_k x[m, k] * w[n, k] + bias[n].
//
// One warp per weight row n, up to kMaxRows activation rows per pass so the row's codes are read once for all
// of them. The fast path (K and group_size multiples of kCodes, 16-byte aligned rows) gives each lane kCodes
// consecutive codes per step (32 int4 codes = one 16-byte load when the groups allow, else 16), all in one
// group, so the dequantization folds into two sums:
//   sum_k x_k (q_k s + o) = s * sum_k x_k q_k + o * sum_k x_k.
// The general path decodes one element at a time with the quant_format.h definitions.
#include <algorithm>

#include "common/quant_format.h"
#include "cuda/cuda_utils.cuh"
#include "cuda/quant_codes.cuh"

namespace llama_fast {
namespace cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxRows = 4;

// 16 consecutive activations as floats (16-byte aligned).
template <typename T>
__device__ __forceinline__ void load_x16(const T* p, float x[16]) {
  constexpr int N = Vec16<T>::kN;
#pragma unroll
  for (int v = 0; v < 16 / N; ++v) {
    const Vec16<T> chunk = reinterpret_cast<const Vec16<T>*>(p)[v];
#pragma unroll
    for (int e = 0; e < N; ++e) x[v * N + e] = to_float(chunk.v[e]);
  }
}

// kCodes: codes per lane and step on the fast path; 0 selects the general path.
template <typename T, int kBits, int kRows, int kCodes>
__global__ void __launch_bounds__(kThreads) quant_gemv_kernel(QuantLinearArgs a) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kRows;
  const int lane = threadIdx.x & 31;
  if (n >= a.n) return;
  const T* x = static_cast<const T*>(a.x) + m0 * a.k;
  const int64_t row_bytes = kBits == 4 ? a.k / 2 : a.k;
  const uint8_t* row = static_cast<const uint8_t*>(a.qweight) + n * row_bytes;
  const int64_t groups = a.k / a.group_size;
  const T* scale = static_cast<const T*>(a.scale) + n * groups;
  const T* offset = a.offset ? static_cast<const T*>(a.offset) + n * groups : nullptr;
  const int rows = a.m - m0 < kRows ? static_cast<int>(a.m - m0) : kRows;

  float acc[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = 0.0f;

  if constexpr (kCodes > 0) {
    for (int64_t k = lane * kCodes; k < a.k; k += 32 * kCodes) {
      float q[kCodes];
      load_codes<kBits, kCodes>(row, k, q);
      const float s = to_float(scale[k / a.group_size]);
      const float o = offset ? to_float(offset[k / a.group_size]) : 0.0f;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (r >= rows) break;
        float dot = 0.0f, sum = 0.0f;
#pragma unroll
        for (int c = 0; c < kCodes; c += 16) {
          float xv[16];
          load_x16(x + r * a.k + k + c, xv);
#pragma unroll
          for (int e = 0; e < 16; ++e) {
            dot += xv[e] * q[c + e];
            sum += xv[e];
          }
        }
        acc[r] += s * dot + o * sum;
      }
    }
  } else {
    for (int64_t k = lane; k < a.k; k += 32) {
      const int code =
          kBits == 4 ? quant::int4_code(row, k) : static_cast<int>(reinterpret_cast<const int8_t*>(row)[k]);
      const float w = quant::dequant_value(code, to_float(scale[k / a.group_size]),
                                           offset ? to_float(offset[k / a.group_size]) : 0.0f);
#pragma unroll
      for (int r = 0; r < kRows; ++r)
        if (r < rows) acc[r] += w * to_float(x[r * a.k + k]);
    }
  }

  const float bias = a.bias ? to_float(static_cast<const T*>(a.bias)[n]) : 0.0f;
  T* out = static_cast<T*>(a.out) + m0 * a.n + n;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const float total = warp_sum(acc[r]);
    if (lane == 0 && r < rows) out[r * a.n] = from_float<T>(total + bias);
  }
}

template <typename T, int kBits, int kRows>
void launch_rows(const QuantLinearArgs& a, int codes, cudaStream_t stream) {
  // Row passes go on grid.y (at most 65535): longer inputs (fp32 prefill) are launched in slices.
  constexpr int64_t kRowsPerLaunch = 65535LL * kRows;
  for (int64_t m0 = 0; m0 < a.m; m0 += kRowsPerLaunch) {
    QuantLinearArgs s = a;
    s.m = a.m - m0 < kRowsPerLaunch ? a.m - m0 : kRowsPerLaunch;
    s.x = static_cast<const T*>(a.x) + m0 * a.k;
    s.out = static_cast<T*>(a.out) + m0 * a.n;
    const dim3 grid(static_cast<unsigned>(ceil_div(a.n, kWarps)), static_cast<unsigned>(ceil_div(s.m, kRows)));
    if (codes == 32)
      quant_gemv_kernel<T, kBits, kRows, (kBits == 4 ? 32 : 16)><<<grid, kThreads, 0, stream>>>(s);
    else if (codes == 16)
      quant_gemv_kernel<T, kBits, kRows, 16><<<grid, kThreads, 0, stream>>>(s);
    else
      quant_gemv_kernel<T, kBits, kRows, 0><<<grid, kThreads, 0, stream>>>(s);
  }
}

template <typename T, int kBits>
void launch(const QuantLinearArgs& a, cudaStream_t stream) {
  const bool aligned = aligned16(a.x) && aligned16(a.qweight);
  const auto fits = [&](int codes) { return aligned && a.k % codes == 0 && a.group_size % codes == 0; };
  const int codes = (kBits == 4 && fits(32)) ? 32 : (fits(16) ? 16 : 0);
  // Rows per pass: one for a single token, else the most that fit.
  if (a.m == 1)
    launch_rows<T, kBits, 1>(a, codes, stream);
  else if (a.m == 2)
    launch_rows<T, kBits, 2>(a, codes, stream);
  else
    launch_rows<T, kBits, kMaxRows>(a, codes, stream);
}

}  // namespace

cudaError_t quant_gemv(DType dt, const QuantLinearArgs& a, cudaStream_t stream) {
  if (a.m == 0 || a.n == 0) return cudaSuccess;
  LF_DISPATCH_DTYPE(dt, T, {
    if (a.bits == 4)
      launch<T, 4>(a, stream);
    else
      launch<T, 8>(a, stream);
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace llama_fast
