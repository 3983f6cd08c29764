// Torch-free launch helpers of the CUDA kernels (csrc/cuda/*.cu). ops_cuda.cpp checks every argument and
// calls these with raw pointers and the current stream; each returns the launch's cudaError_t.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

namespace llama_fast {
namespace cuda {

enum class DType { kF32, kF16, kBF16 };

// rms_norm.cu. residual / residual_out null: plain rms_norm. Otherwise r = x + residual is written to
// residual_out (rounded to the dtype) and normalized.
cudaError_t rms_norm(DType dt, const void* x, const void* residual, void* residual_out, const void* weight, void* y,
                     int64_t rows, int64_t hidden, float eps, cudaStream_t stream);

// rotary.cu. q [batch, t, hq, d] and k [batch, t, hkv, d] rotated in place; any strides for the first three
// dims (views of a fused qkv projection), unit stride along d. positions [batch, t] contiguous (int64 when
// positions_int64, else int32); cos/sin fp32 [max_pos, d/2]. A position outside [0, max_pos) makes that
// token's q and k NaN: the error shows in the output instead of an out-of-bounds read.
struct RotaryArgs {
  void* q;
  void* k;
  const void* positions;
  bool positions_int64;
  const float* cos;
  const float* sin;
  int64_t batch, t, max_pos;
  int hq, hkv, head_dim;
  int64_t q_stride[3], k_stride[3];  // elements, for dims batch, t, head
};
cudaError_t rotary(DType dt, const RotaryArgs& a, cudaStream_t stream);

// silu_and_mul.cu. gate_up [rows, 2 * inter] -> out [rows, inter].
cudaError_t silu_and_mul(DType dt, const void* gate_up, void* out, int64_t rows, int64_t inter, cudaStream_t stream);

// store_kv.cu. caches [batch, slots_per_seq, hkv * d]; k/v [batch, t, hkv * d]; slots [batch, t]; batch < 65536.
// Negative slots are skipped; slots >= slots_per_seq too (the Python cache checks overflow on the host).
cudaError_t store_kv(DType dt, void* k_cache, void* v_cache, const void* k, const void* v, const void* slots,
                     bool slots_int64, int64_t batch, int64_t t, int64_t slots_per_seq, int64_t row_elems,
                     cudaStream_t stream);

// attention_*.cu. q [b, tq, hq, d], k/v [b, tk, hkv, d], out [b, tq, hq, d] contiguous; kv_lens [b] int32 or
// null (= tk). q, k and v may be strided along batch and token (q a slice of a fused qkv projection, k/v a
// prefix of a static cache) but each token's heads are contiguous: element (b, t, h, e) of q sits at
// b * q_stride_b + t * q_stride_t + h * d + e. Strides are multiples of 8 elements (16-byte loads).
struct AttentionArgs {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  const int32_t* kv_lens;
  int batch, tq, tk, hq, hkv, head_dim;
  bool causal;
  float scale;
  int64_t q_stride_b, q_stride_t, kv_stride_b, kv_stride_t;  // elements; k and v share theirs
};

// Split-K flash-decoding (SIMT, any dtype, any tq): workspace holds the partials of the splits, sized by
// attention_split_workspace_floats; num_splits from attention_num_splits.
int attention_num_splits(const AttentionArgs& a, int device);
int64_t attention_split_workspace_floats(const AttentionArgs& a, int num_splits);
cudaError_t attention_split_k(DType dt, const AttentionArgs& a, int num_splits, float* workspace, cudaStream_t stream);
// Tensor-core prefill (fp16 / bf16, head_dim 64 or 128).
cudaError_t attention_prefill_mma(DType dt, const AttentionArgs& a, cudaStream_t stream);
// Which kernel attention should use: the tensor-core one when many query rows share a kv head.
bool attention_prefers_mma(DType dt, const AttentionArgs& a);

// quant_linear_gemv.cu / quant_linear_gemm.cu: out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]), w in the serialized
// format of csrc/common/quant_format.h; offset may be null (int8). scale / offset / bias share x's dtype.
struct QuantLinearArgs {
  const void* x;
  const void* qweight;
  const void* scale;
  const void* offset;
  const void* bias;
  void* out;
  int64_t m, n, k;
  int bits, group_size;
};
cudaError_t quant_gemv(DType dt, const QuantLinearArgs& a, cudaStream_t stream);
cudaError_t quant_gemm_mma(DType dt, const QuantLinearArgs& a, cudaStream_t stream);
// True when the tensor-core GEMM applies (fp16/bf16, m large enough, k and group_size multiples of 32).
bool quant_prefers_gemm(DType dt, const QuantLinearArgs& a);

}  // namespace cuda
}  // namespace llama_fast
