// CPU registrations of the llama_fast ops: argument checks (TORCH_CHECK) and the hand-off to the torch-free
// kernels in csrc/cpu/*.cpp.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/all.h>

#include "cpu/kernels.h"

namespace llama_fast {
namespace {

void check_cpu_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "llama_fast CPU kernel: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16,
              "llama_fast CPU kernel: ", name, " must be float32 or bfloat16, got ", t.scalar_type());
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_cpu_float(x, "x");
  check_cpu_float(weight, "weight");
  TORCH_CHECK(x.dim() >= 1, "rms_norm: x must have at least one dimension");
  TORCH_CHECK(x.is_contiguous(), "rms_norm: x must be contiguous");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), "rms_norm: weight must be [", x.size(-1),
              "], got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "rms_norm: weight dtype ", weight.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  auto w = weight.contiguous();
  auto y = at::empty_like(x);
  const int64_t hidden = x.size(-1);
  const int64_t rows = hidden == 0 ? 0 : x.numel() / hidden;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    if (x.scalar_type() == at::kFloat) {
      cpu::rms_norm_f32(x.data_ptr<float>() + begin * hidden, w.data_ptr<float>(),
                        y.data_ptr<float>() + begin * hidden, end - begin, hidden, static_cast<float>(eps));
    } else {
      cpu::rms_norm_bf16(reinterpret_cast<const uint16_t*>(x.data_ptr()) + begin * hidden,
                         reinterpret_cast<const uint16_t*>(w.data_ptr()),
                         reinterpret_cast<uint16_t*>(y.data_ptr()) + begin * hidden, end - begin, hidden,
                         static_cast<float>(eps));
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(llama_fast, CPU, m) { m.impl("rms_norm", &rms_norm); }

}  // namespace llama_fast
