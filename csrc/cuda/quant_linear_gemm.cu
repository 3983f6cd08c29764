// Weight-only quantized GEMM on tensor cores for prefill batches (fp16 / bf16 activations):
// out[m, n] = sum_k x[m, k] * w[n, k] + bias[n], w dequantized tile by tile into shared memory.
//
// Block tile 64 (m) x 64 (n) x 32 (k), four warps in a 2 x 2 grid of 32 x 32 warp tiles, mma.sync m16n8k16
// with fp32 accumulation. Each k-step, every thread decodes 16 codes of one weight row (one group, since
// group_size % 32 == 0) to w = q * scale + offset in fp32, rounds once to the activation dtype (what a dense
// fp16/bf16 matmul of the dequantized weight does) and stores them to shared memory.
#include "cuda/cuda_utils.cuh"
#include "cuda/mma.cuh"
#include "cuda/quant_codes.cuh"

namespace llama_fast {
namespace cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kBlockM = 64, kBlockN = 64, kBlockK = 32;
constexpr int kStride = kBlockK + 8;  // padded smem row (elements): fragment loads hit 32 distinct banks

template <typename T, int kBits>
__global__ void __launch_bounds__(kThreads) quant_gemm_kernel(QuantLinearArgs a) {
  __shared__ __align__(16) T x_s[kBlockM][kStride];
  __shared__ __align__(16) T w_s[kBlockN][kStride];
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBlockM, n0 = static_cast<int64_t>(blockIdx.x) * kBlockN;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int warp_m = (warp >> 1) * 32, warp_n = (warp & 1) * 32;
  const T* x = static_cast<const T*>(a.x);
  const int64_t row_bytes = kBits == 4 ? a.k / 2 : a.k, groups = a.k / a.group_size;

  // The weight row and 16-element half of the k-tile this thread dequantizes.
  const int w_row = threadIdx.x >> 1, w_half = (threadIdx.x & 1) * 16;
  const int64_t wn = n0 + w_row;
  const uint8_t* qrow = static_cast<const uint8_t*>(a.qweight) + wn * row_bytes;
  const T* scale = static_cast<const T*>(a.scale) + wn * groups;
  const T* offset = a.offset ? static_cast<const T*>(a.offset) + wn * groups : nullptr;

  float acc[2][4][4] = {};
  for (int64_t k0 = 0; k0 < a.k; k0 += kBlockK) {
    __syncthreads();
    // x tile: 64 rows x 32 elements = 4 x 16-byte vectors per row, two per thread.
    for (int i = threadIdx.x; i < kBlockM * 4; i += kThreads) {
      const int r = i >> 2, c = (i & 3) * 8;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (m0 + r < a.m) v = *reinterpret_cast<const uint4*>(x + (m0 + r) * a.k + k0 + c);
      *reinterpret_cast<uint4*>(&x_s[r][c]) = v;
    }
    // w tile, dequantized, packed two elements per register (no local-memory array).
    {
      uint32_t w[8] = {};
      if (wn < a.n) {
        float q[16];
        load_codes<kBits>(qrow, k0 + w_half, q);
        const int64_t grp = (k0 + w_half) / a.group_size;
        const float s = to_float(scale[grp]), o = offset ? to_float(offset[grp]) : 0.0f;
#pragma unroll
        for (int e = 0; e < 8; ++e) w[e] = pack2(from_float<T>(q[2 * e] * s + o), from_float<T>(q[2 * e + 1] * s + o));
      }
      *reinterpret_cast<uint4*>(&w_s[w_row][w_half]) = make_uint4(w[0], w[1], w[2], w[3]);
      *reinterpret_cast<uint4*>(&w_s[w_row][w_half + 8]) = make_uint4(w[4], w[5], w[6], w[7]);
    }
    __syncthreads();

#pragma unroll
    for (int kc = 0; kc < kBlockK; kc += 16) {
      uint32_t af[2][4];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int r = warp_m + i * 16 + g;
        af[i][0] = load2(&x_s[r][kc + 2 * t]);
        af[i][1] = load2(&x_s[r + 8][kc + 2 * t]);
        af[i][2] = load2(&x_s[r][kc + 8 + 2 * t]);
        af[i][3] = load2(&x_s[r + 8][kc + 8 + 2 * t]);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int c = warp_n + j * 8 + g;
        const uint32_t b0 = load2(&w_s[c][kc + 2 * t]), b1 = load2(&w_s[c][kc + 8 + 2 * t]);
#pragma unroll
        for (int i = 0; i < 2; ++i) mma_16816<T>(acc[i][j], af[i], b0, b1);
      }
    }
  }

  const T* bias = static_cast<const T*>(a.bias);
  T* out = static_cast<T*>(a.out);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t m = m0 + warp_m + i * 16 + g + 8 * (e >> 1);
        const int64_t n = n0 + warp_n + j * 8 + 2 * t + (e & 1);
        if (m < a.m && n < a.n) out[m * a.n + n] = from_float<T>(acc[i][j][e] + (bias ? to_float(bias[n]) : 0.0f));
      }
    }
  }
}

}  // namespace

bool quant_prefers_gemm(DType dt, const QuantLinearArgs& a) {
  return dt != DType::kF32 && a.m > 8 && a.k % kBlockK == 0 && a.group_size % kBlockK == 0 && aligned16(a.x) &&
         aligned16(a.qweight);
}

cudaError_t quant_gemm_mma(DType dt, const QuantLinearArgs& a, cudaStream_t stream) {
  if (a.m == 0 || a.n == 0) return cudaSuccess;
  if (dt == DType::kF32 || a.k % kBlockK != 0 || a.group_size % kBlockK != 0) return cudaErrorInvalidValue;
  if (ceil_div(a.m, kBlockM) > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(ceil_div(a.n, kBlockN)), static_cast<unsigned>(ceil_div(a.m, kBlockM)));
  if (dt == DType::kF16) {
    if (a.bits == 4)
      quant_gemm_kernel<__half, 4><<<grid, kThreads, 0, stream>>>(a);
    else
      quant_gemm_kernel<__half, 8><<<grid, kThreads, 0, stream>>>(a);
  } else {
    if (a.bits == 4)
      quant_gemm_kernel<__nv_bfloat16, 4><<<grid, kThreads, 0, stream>>>(a);
    else
      quant_gemm_kernel<__nv_bfloat16, 8><<<grid, kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace llama_fast
