// CUDA registrations of the llama_fast ops: every argument is checked here (device, dtype, shape, layout,
// alignment) with a message naming the op and the argument, then handed to the torch-free launch helpers of
// csrc/cuda/*.cu on the current stream of the input's device.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/all.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "cuda/launch.h"
#include "op_checks.h"

namespace llama_fast {
namespace {

using cuda::DType;

DType float_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kF32;
    case at::kHalf: return DType::kF16;
    case at::kBFloat16: return DType::kBF16;
    default: TORCH_CHECK(false, op, ": ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return DType::kF32;
}

void check_on(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but the input is on ", ref.device());
}

void check_aligned16(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, op, ": ", name,
              " must start at a 16-byte aligned address (a view with an odd storage offset?)");
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

// ---- rms_norm / fused_add_rms_norm ----------------------------------------------------------------------

void check_norm_args(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device());
  float_dtype(x, op, "x");
  check_on(weight, x, op, "weight");
  check_same_dtype(weight, x, op, "weight");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension");
  check_contiguous(x, op, "x");
  check_contiguous(weight, op, "weight");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), op, ": weight must be [", x.size(-1), "], got ",
              weight.sizes());
  TORCH_CHECK(x.size(-1) == 0 || x.numel() / x.size(-1) < (1LL << 31), op, ": more than 2^31 - 1 rows");
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  constexpr const char* op = "llama_fast::rms_norm (CUDA)";
  check_norm_args(x, weight, op);
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty_like(x);
  const int64_t hidden = x.size(-1), rows = hidden == 0 ? 0 : x.numel() / hidden;
  check_launch(cuda::rms_norm(float_dtype(x, op, "x"), x.data_ptr(), nullptr, nullptr, weight.data_ptr(), y.data_ptr(),
                              rows, hidden, static_cast<float>(eps), stream_of(x)),
               op);
  return y;
}

std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                      const at::Tensor& weight, double eps) {
  constexpr const char* op = "llama_fast::fused_add_rms_norm (CUDA)";
  check_norm_args(x, weight, op);
  check_on(residual, x, op, "residual");
  check_same_dtype(residual, x, op, "residual");
  check_contiguous(residual, op, "residual");
  TORCH_CHECK(residual.sizes() == x.sizes(), op, ": residual shape ", residual.sizes(), " differs from x shape ",
              x.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty_like(x);
  auto new_residual = at::empty_like(x);
  const int64_t hidden = x.size(-1), rows = hidden == 0 ? 0 : x.numel() / hidden;
  check_launch(cuda::rms_norm(float_dtype(x, op, "x"), x.data_ptr(), residual.data_ptr(), new_residual.data_ptr(),
                              weight.data_ptr(), y.data_ptr(), rows, hidden, static_cast<float>(eps), stream_of(x)),
               op);
  return {y, new_residual};
}

// ---- rotary_ ----------------------------------------------------------------------------------------------

void check_index_tensor(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  check_on(t, ref, op, name);
  TORCH_CHECK(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, op, ": ", name,
              " must be int64 or int32, got ", t.scalar_type());
  check_contiguous(t, op, name);
}

void rotary_(at::Tensor& q, at::Tensor& k, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin) {
  constexpr const char* op = "llama_fast::rotary_ (CUDA)";
  TORCH_CHECK(q.is_cuda(), op, ": q must be a CUDA tensor, got ", q.device());
  const DType dt = float_dtype(q, op, "q");
  check_on(k, q, op, "k");
  check_same_dtype(k, q, op, "k");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, op, ": q and k must be [B, T, H, D], got ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3), op, ": q ", q.sizes(),
              " and k ", k.sizes(), " disagree on B, T or D");
  const int64_t d = q.size(3);
  TORCH_CHECK(d % 2 == 0 && d > 0, op, ": head_dim must be even and positive, got ", d);
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1, op, ": q and k must be contiguous along head_dim");
  TORCH_CHECK(q.size(0) * q.size(1) < (1LL << 31), op, ": more than 2^31 - 1 tokens");
  TORCH_CHECK((q.size(2) + k.size(2)) * (d / 2) <= 65535LL * 128, op,
              ": too many heads for one token's grid: ", q.size(2), " + ", k.size(2), " heads of ", d);
  check_index_tensor(positions, q, op, "positions");
  TORCH_CHECK(positions.dim() == 2 && positions.size(0) == q.size(0) && positions.size(1) == q.size(1), op,
              ": positions must be [", q.size(0), ", ", q.size(1), "], got ", positions.sizes());
  for (const auto* t : {&cos, &sin}) {
    const char* name = t == &cos ? "cos" : "sin";
    check_on(*t, q, op, name);
    TORCH_CHECK(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t->scalar_type());
    check_contiguous(*t, op, name);
    TORCH_CHECK(t->dim() == 2 && t->size(1) == d / 2, op, ": ", name, " must be [max_pos, ", d / 2, "], got ",
                t->sizes());
  }
  TORCH_CHECK(cos.sizes() == sin.sizes(), op, ": cos ", cos.sizes(), " and sin ", sin.sizes(), " differ");
  const c10::cuda::CUDAGuard guard(q.device());
  cuda::RotaryArgs a{};
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.positions = positions.data_ptr();
  a.positions_int64 = positions.scalar_type() == at::kLong;
  a.cos = cos.data_ptr<float>();
  a.sin = sin.data_ptr<float>();
  a.batch = q.size(0);
  a.t = q.size(1);
  a.max_pos = cos.size(0);
  a.hq = static_cast<int>(q.size(2));
  a.hkv = static_cast<int>(k.size(2));
  a.head_dim = static_cast<int>(d);
  for (int i = 0; i < 3; ++i) {
    a.q_stride[i] = q.stride(i);
    a.k_stride[i] = k.stride(i);
  }
  check_launch(cuda::rotary(dt, a, stream_of(q)), op);
}

// ---- attention --------------------------------------------------------------------------------------------

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                     const std::optional<at::Tensor>& kv_lens, double scale) {
  constexpr const char* op = "llama_fast::attention (CUDA)";
  TORCH_CHECK(q.is_cuda(), op, ": q must be a CUDA tensor, got ", q.device());
  const DType dt = float_dtype(q, op, "q");
  for (const auto* t : {&k, &v}) {
    const char* name = t == &k ? "k" : "v";
    check_on(*t, q, op, name);
    check_same_dtype(*t, q, op, name);
  }
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k, v must be 4-D [B, T, H, D], got ", q.sizes(),
              ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k ", k.sizes(), " and v ", v.sizes(), " differ");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3), op, ": q ", q.sizes(), " and k ", k.sizes(),
              " disagree on batch or head_dim");
  const int64_t hq = q.size(2), hkv = k.size(2), d = q.size(3);
  TORCH_CHECK(hkv > 0 && hq % hkv == 0, op, ": query heads (", hq, ") must be a multiple of kv heads (", hkv, ")");
  TORCH_CHECK(d == 64 || d == 128, op, ": head_dim must be 64 or 128 for the CUDA kernels, got ", d);
  // Each token's heads must be contiguous; batch and token strides are free (a slice of a fused qkv
  // projection, a prefix of a static cache) but must keep the 16-byte vector loads aligned.
  const int64_t vec = 16 / q.element_size();
  // A size-1 dimension's stride is never used.
  auto stride = [](const at::Tensor& t, int dim) { return t.size(dim) == 1 ? int64_t{0} : t.stride(dim); };
  for (const auto* t : {&q, &k, &v}) {
    const char* name = t == &q ? "q" : (t == &k ? "k" : "v");
    TORCH_CHECK(t->stride(3) == 1 && (t->size(2) == 1 || t->stride(2) == d), op, ": ", name,
                " must have contiguous heads (strides [*, *, ", d, ", 1]), got strides ", t->strides());
    for (int dim = 0; dim < 2; ++dim)
      TORCH_CHECK(t->size(dim) == 1 || t->stride(dim) % vec == 0, op, ": ", name, " stride ", t->stride(dim),
                  " along dim ", dim, " must be a multiple of ", vec, " elements (16 bytes)");
    check_aligned16(*t, op, name);
  }
  TORCH_CHECK(stride(k, 0) == stride(v, 0) && stride(k, 1) == stride(v, 1), op,
              ": k and v must have the same batch and token strides, got ", k.strides(), " and ", v.strides());
  TORCH_CHECK(q.size(1) < (1LL << 30) && k.size(1) < (1LL << 30) && q.size(0) < 65536 && hkv < 65536, op,
              ": sizes too large: q ", q.sizes(), ", k ", k.sizes());
  const int32_t* lens = nullptr;
  if (kv_lens.has_value()) {
    const at::Tensor& kl = *kv_lens;
    check_on(kl, q, op, "kv_lens");
    TORCH_CHECK(kl.scalar_type() == at::kInt, op, ": kv_lens must be int32, got ", kl.scalar_type());
    TORCH_CHECK(kl.dim() == 1 && kl.size(0) == q.size(0), op, ": kv_lens must be [", q.size(0), "], got ", kl.sizes());
    check_contiguous(kl, op, "kv_lens");
    lens = kl.data_ptr<int32_t>();
  }
  const c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty(q.sizes(), q.options());  // contiguous whatever q's strides
  cuda::AttentionArgs a{q.data_ptr(),
                        k.data_ptr(),
                        v.data_ptr(),
                        out.data_ptr(),
                        lens,
                        static_cast<int>(q.size(0)),
                        static_cast<int>(q.size(1)),
                        static_cast<int>(k.size(1)),
                        static_cast<int>(hq),
                        static_cast<int>(hkv),
                        static_cast<int>(d),
                        causal,
                        static_cast<float>(scale),
                        stride(q, 0),
                        stride(q, 1),
                        stride(k, 0),
                        stride(k, 1)};
  if (cuda::attention_prefers_mma(dt, a)) {
    check_launch(cuda::attention_prefill_mma(dt, a, stream_of(q)), op);
    return out;
  }
  const int splits = cuda::attention_num_splits(a, q.device().index());
  const int64_t floats = cuda::attention_split_workspace_floats(a, splits);
  at::Tensor workspace = floats > 0 ? at::empty({floats}, q.options().dtype(at::kFloat)) : at::Tensor();
  check_launch(cuda::attention_split_k(dt, a, splits, floats > 0 ? workspace.data_ptr<float>() : nullptr, stream_of(q)),
               op);
  return out;
}

// ---- silu_and_mul -----------------------------------------------------------------------------------------

at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  constexpr const char* op = "llama_fast::silu_and_mul (CUDA)";
  TORCH_CHECK(gate_up.is_cuda(), op, ": gate_up must be a CUDA tensor, got ", gate_up.device());
  const DType dt = float_dtype(gate_up, op, "gate_up");
  TORCH_CHECK(gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0, op,
              ": the last dimension of gate_up must be even ([..., 2I]), got ", gate_up.sizes());
  check_contiguous(gate_up, op, "gate_up");
  const c10::cuda::CUDAGuard guard(gate_up.device());
  auto sizes = gate_up.sizes().vec();
  const int64_t inter = sizes.back() / 2;
  sizes.back() = inter;
  auto out = at::empty(sizes, gate_up.options());
  const int64_t rows = inter == 0 ? 0 : gate_up.numel() / (2 * inter);
  check_launch(cuda::silu_and_mul(dt, gate_up.data_ptr(), out.data_ptr(), rows, inter, stream_of(gate_up)), op);
  return out;
}

// ---- quant_linear -----------------------------------------------------------------------------------------

at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                        const std::optional<at::Tensor>& offset, int64_t bits, int64_t group_size,
                        const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "llama_fast::quant_linear (CUDA)";
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device());
  const DType dt = float_dtype(x, op, "x");
  TORCH_CHECK(bits == 4 || bits == 8, op, ": bits must be 4 or 8, got ", bits);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension");
  check_contiguous(x, op, "x");
  check_on(qweight, x, op, "qweight");
  check_contiguous(qweight, op, "qweight");
  TORCH_CHECK(qweight.dim() == 2, op, ": qweight must be 2-D, got ", qweight.sizes());
  const int64_t k = x.size(-1), n = qweight.size(0);
  if (bits == 8) {
    TORCH_CHECK(qweight.scalar_type() == at::kChar, op, ": int8 qweight must be int8, got ", qweight.scalar_type());
    TORCH_CHECK(qweight.size(1) == k, op, ": int8 qweight must be [N, ", k, "] for x [..., ", k, "], got ",
                qweight.sizes());
  } else {
    TORCH_CHECK(qweight.scalar_type() == at::kByte, op, ": int4 qweight must be uint8 (two codes per byte), got ",
                qweight.scalar_type());
    TORCH_CHECK(k % 2 == 0 && qweight.size(1) * 2 == k, op, ": int4 qweight must be [N, ", k / 2, "] for x [..., ", k,
                "], got ", qweight.sizes());
  }
  TORCH_CHECK(k > 0, op, ": x has an empty last dimension");
  TORCH_CHECK(group_size > 0 && k % group_size == 0, op, ": group_size ", group_size, " does not divide K=", k);
  const int64_t groups = k / group_size;
  check_on(scale, x, op, "scale");
  check_same_dtype(scale, x, op, "scale");
  check_contiguous(scale, op, "scale");
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == n && scale.size(1) == groups, op, ": scale must be [", n, ", ",
              groups, "], got ", scale.sizes());
  if (offset.has_value()) {
    check_on(*offset, x, op, "offset");
    check_same_dtype(*offset, x, op, "offset");
    check_contiguous(*offset, op, "offset");
    TORCH_CHECK(offset->sizes() == scale.sizes(), op, ": offset shape ", offset->sizes(), " differs from scale ",
                scale.sizes());
  }
  if (bias.has_value()) {
    check_on(*bias, x, op, "bias");
    check_bias_shape(*bias, x, n, op);
  }
  const c10::cuda::CUDAGuard guard(x.device());
  auto sizes = x.sizes().vec();
  sizes.back() = n;
  if (k == 0) {  // an empty sum, as F.linear defines it: zeros, plus the bias
    auto out = at::zeros(sizes, x.options());
    return bias.has_value() ? out.add_(*bias) : out;
  }
  TORCH_CHECK(x.numel() / k < 65535LL * 64, op, ": more than ", 65535LL * 64, " rows (the GEMM grid limit)");
  auto out = at::empty(sizes, x.options());
  cuda::QuantLinearArgs a{x.data_ptr(),
                          qweight.data_ptr(),
                          scale.data_ptr(),
                          offset.has_value() ? offset->data_ptr() : nullptr,
                          bias.has_value() ? bias->data_ptr() : nullptr,
                          out.data_ptr(),
                          x.numel() / k,
                          n,
                          k,
                          static_cast<int>(bits),
                          static_cast<int>(group_size)};
  const cudaError_t err = cuda::quant_prefers_gemm(dt, a) ? cuda::quant_gemm_mma(dt, a, stream_of(x))
                                                          : cuda::quant_gemv(dt, a, stream_of(x));
  check_launch(err, op);
  return out;
}

// ---- store_kv_ --------------------------------------------------------------------------------------------

void store_kv_(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& slots) {
  constexpr const char* op = "llama_fast::store_kv_ (CUDA)";
  TORCH_CHECK(k.is_cuda(), op, ": k must be a CUDA tensor, got ", k.device());
  const DType dt = float_dtype(k, op, "k");
  const std::pair<const at::Tensor*, const char*> all[] = {{&k_cache, "k_cache"}, {&v_cache, "v_cache"}, {&v, "v"}};
  for (const auto& [t, name] : all) {
    check_on(*t, k, op, name);
    check_same_dtype(*t, k, op, name);
  }
  check_contiguous(k_cache, op, "k_cache");
  check_contiguous(v_cache, op, "v_cache");
  check_contiguous(k, op, "k");
  check_contiguous(v, op, "v");
  TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes(), op, ": k and v must be equal [B, T, Hkv, D], got ", k.sizes(),
              " and ", v.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), op,
              ": k_cache and v_cache must be equal [B, S, Hkv, D], got ", k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK(k_cache.size(0) == k.size(0) && k_cache.size(2) == k.size(2) && k_cache.size(3) == k.size(3), op,
              ": cache ", k_cache.sizes(), " does not match k ", k.sizes(), " in B, Hkv or D");
  TORCH_CHECK(k.size(0) < 65536 && k.size(1) < (1LL << 31), op, ": k ", k.sizes(),
              " is too large (batch at most 65535, tokens at most 2^31 - 1)");
  check_index_tensor(slots, k, op, "slots");
  TORCH_CHECK(slots.dim() == 2 && slots.size(0) == k.size(0) && slots.size(1) == k.size(1), op, ": slots must be [",
              k.size(0), ", ", k.size(1), "], got ", slots.sizes());
  const c10::cuda::CUDAGuard guard(k.device());
  check_launch(cuda::store_kv(dt, k_cache.data_ptr(), v_cache.data_ptr(), k.data_ptr(), v.data_ptr(), slots.data_ptr(),
                              slots.scalar_type() == at::kLong, k.size(0), k.size(1), k_cache.size(1),
                              k.size(2) * k.size(3), stream_of(k)),
               op);
}

}  // namespace

TORCH_LIBRARY_IMPL(llama_fast, CUDA, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm);
  m.impl("rotary_", &rotary_);
  m.impl("attention", &attention);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("quant_linear", &quant_linear);
  m.impl("store_kv_", &store_kv_);
}

}  // namespace llama_fast
