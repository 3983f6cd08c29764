// The one place where llama_fast's custom-op schemas are declared. Each backend registers its kernels for
// these names in its own file (csrc/cpu/ops_cpu.cpp with TORCH_LIBRARY_IMPL(llama_fast, CPU, m),
// csrc/cuda/ops_cuda.cpp with TORCH_LIBRARY_IMPL(llama_fast, CUDA, m)); Python registers the fake (meta)
// implementations in llama_fast/ops/fake.py (contracts: docs/KERNELS.md). Backend-specific extra ops (the
// CPU decode step) are declared with TORCH_LIBRARY_FRAGMENT next to their kernels.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(llama_fast, m) {
  // y = x * rsqrt(mean(x^2) + eps) * weight, computed in fp32; x [..., H], weight [H].
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  // (rms_norm(x + residual), x + residual): the pre-norm residual stream of a decoder layer.
  m.def("fused_add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  // In place on q [B,T,Hq,D] and k [B,T,Hkv,D]; HF rotate_half convention; positions [B,T] int64 or int32;
  // cos/sin [max_pos, D/2] fp32.
  m.def("rotary_(Tensor(a!) q, Tensor(b!) k, Tensor positions, Tensor cos, Tensor sin) -> ()");
  // q [B,Tq,Hq,D], k/v [B,Tk,Hkv,D]; kv_lens [B] int32 (None = Tk): keys 0..kv_lens[b]-1 are valid and
  // query i sits at position kv_lens[b]-Tq+i (bottom-right causal). Rows with no valid key give zeros.
  m.def("attention(Tensor q, Tensor k, Tensor v, bool causal, Tensor? kv_lens, float scale) -> Tensor");
  // [..., 2I] = [gate | up] -> silu(gate) * up  [..., I]
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
  // x [..., K] @ W^T, W given in the serialized weight-only format of csrc/common/quant_format.h:
  // bits 8: qweight int8 [N, K], offset None; bits 4: qweight uint8 [N, K/2] (two per byte);
  // scale / offset [N, K/group_size]; w = q * scale + offset.
  m.def(
      "quant_linear(Tensor x, Tensor qweight, Tensor scale, Tensor? offset, int bits, int group_size, "
      "Tensor? bias) -> Tensor");
  // Writes k/v [B,T,Hkv,D] into the caches [B,S,Hkv,D] at slots [B,T] (int64 or int32); a negative slot
  // (a left-padding token) is skipped.
  m.def("store_kv_(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor slots) -> ()");
}

namespace llama_fast {
bool built_with_cuda() {
#ifdef LLAMA_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}
std::string cpu_features();  // csrc/cpu/cpu_features.cpp
}  // namespace llama_fast

PYBIND11_MODULE(_C, m) {
  m.doc() = "llama_fast native kernels; the ops live in torch.ops.llama_fast";
  m.def("built_with_cuda", &llama_fast::built_with_cuda, "True when the CUDA kernels were compiled in");
  m.def("cpu_features", &llama_fast::cpu_features, "The instruction sets the CPU kernels may use here");
}
