// The CUDA implementation of llama_fast::kquant_linear (declared in csrc/cpu/kquant_linear.cpp): checks
// the arguments and launches the ggml block GEMV of kquant_linear.cu once per row segment.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/ggml_blocks.h"
#include "cuda/kquant_linear.h"

namespace llama_fast {
namespace {

at::Tensor kquant_linear_cuda(const at::Tensor& x, at::TensorList blocks, at::IntArrayRef types,
                              const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "llama_fast::kquant_linear (CUDA)";
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(!blocks.empty() && blocks.size() == types.size(), op, ": need one type per block tensor");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, op, ": x must have a non-empty last dimension");
  const int64_t k = x.size(-1);
  int64_t n = 0;
  for (size_t i = 0; i < blocks.size(); ++i) {
    TORCH_CHECK(ggml::valid_type(static_cast<int>(types[i])), op, ": unknown block type id ", types[i]);
    const auto t = static_cast<ggml::BlockType>(types[i]);
    const auto& b = blocks[i];
    TORCH_CHECK(b.device() == x.device() && b.scalar_type() == at::kByte && b.dim() == 2 && b.is_contiguous(), op,
                ": blocks must be contiguous 2-D uint8 tensors on x's device");
    TORCH_CHECK(k % ggml::block_weights(t) == 0 && b.size(1) == k / ggml::block_weights(t) * ggml::block_bytes(t), op,
                ": blocks ", b.sizes(), " of type id ", types[i], " do not hold rows of K=", k);
    n += b.size(0);
  }
  if (bias.has_value())
    TORCH_CHECK(bias->device() == x.device() && bias->scalar_type() == x.scalar_type() && bias->dim() == 1 &&
                    bias->size(0) == n && bias->is_contiguous(),
                op, ": bias must be a contiguous [", n, "] tensor of x's dtype and device");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto xc = x.contiguous();
  const int64_t m = x.numel() / k;
  auto out = at::empty({m, n}, x.options());
  const auto dt = x.scalar_type() == at::kFloat  ? cuda::DType::kF32
                  : x.scalar_type() == at::kHalf ? cuda::DType::kF16
                                                 : cuda::DType::kBF16;
  const auto stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  int64_t col = 0;
  for (size_t i = 0; i < blocks.size(); ++i) {
    const int64_t rows = blocks[i].size(0);
    const cuda::KQuantLinearArgs a{xc.data_ptr(),
                                   blocks[i].data_ptr<uint8_t>(),
                                   bias ? static_cast<const char*>(bias->data_ptr()) + col * x.element_size() : nullptr,
                                   static_cast<char*>(out.data_ptr()) + col * x.element_size(),
                                   static_cast<int>(types[i]),
                                   m,
                                   rows,
                                   k,
                                   n};
    const cudaError_t err = cuda::kquant_linear(dt, a, stream);
    TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
    col += rows;
  }
  auto sizes = x.sizes().vec();
  sizes.back() = n;
  return out.reshape(sizes);
}

}  // namespace

TORCH_LIBRARY_IMPL(llama_fast, CUDA, m) { m.impl("kquant_linear", &kquant_linear_cuda); }

}  // namespace llama_fast
