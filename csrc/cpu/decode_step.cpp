// The decoder stack of a decode step (a few tokens per sequence) in one C++ call: per layer
//   h = rmsnorm(x + residual); qkv = h W_qkv; rotary(q, k); store_kv; attention over the cache;
//   x = attn W_o; h = rmsnorm(x + residual); x = silu_and_mul(h W_gate_up) W_down
// straight on the torch-free kernels (csrc/cpu/kernels.h), into reused scratch buffers. This removes the
// ~12 Python op calls per layer (several microseconds each, ~3 ms per token for 30 layers) that would
// otherwise cost as much as the weights' memory traffic of a small model.
//
// Weights come as one flat list, per layer: [input_norm, post_attention_norm, then for qkv, o, gate_up, down:
// weight (dense [N, K], or int4/int8 qweight), scale, offset, bias] (None where absent), and linear_meta per
// layer: [bits, group_size] x 4 (bits 0 = dense).
//
// Two entry points share one DecodePlan:
//  - llama_fast.CpuDecodePlan (a torch custom class) is built once per model (llama_fast/ops/cpu_decode.py):
//    it validates the ~400 weight tensors once and keeps the scratch buffers, and cpu_decode_step(plan, ...)
//    runs a step with only the per-step arguments to check. Before each step the plan compares every weight's
//    data pointer, dtype and shape with what it validated (a few ns each) and re-validates on any change, so
//    a weight changed in place (param.data = ..., resize_) can never be read through stale pointers.
//  - cpu_decode_layers(hidden, weights, ...) builds a throwaway plan per call (tests, one-off use).
#include <torch/all.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cstring>
#include <mutex>

#include "cpu/decode_profile.h"
#include "cpu/kernels.h"

namespace llama_fast {
namespace {

constexpr int64_t kSlotsPerLayer = 2 + 4 * 4;
constexpr int64_t kMaxRows = 8;  // the GEMV kernels' batch: decode only
constexpr const char* kOp = "cpu_decode_layers";

using Profile = cpu::DecodeProfile;

struct LinearRef {
  const at::Tensor* w;
  const at::Tensor* scale;
  const at::Tensor* offset;
  const at::Tensor* bias;
  int bits;
  int64_t group_size;
  int64_t n, k;
  // The raw view the kernels take, filled in by validate(); valid while weights_unchanged().
  cpu::QuantWeight q;
  const void* dense;
  const void* bias_ptr;
};

cpu::ScaleType scale_type_of(const at::Tensor& s) {
  switch (s.scalar_type()) {
    case at::kFloat: return cpu::ScaleType::kF32;
    case at::kHalf: return cpu::ScaleType::kF16;
    case at::kBFloat16: return cpu::ScaleType::kBF16;
    default: TORCH_CHECK(false, kOp, ": scale must be float32, float16 or bfloat16, got ", s.scalar_type());
  }
}

// Smallest and largest of an int32/int64 tensor of a few elements (positions, slots, kv_lens), without a
// torch reduction (each costs microseconds).
std::pair<int64_t, int64_t> min_max(const at::Tensor& t) {
  const int64_t n = t.numel();
  int64_t lo = INT64_MAX, hi = INT64_MIN;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = t.scalar_type() == at::kLong ? t.const_data_ptr<int64_t>()[i] : t.const_data_ptr<int32_t>()[i];
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  return {lo, hi};
}

class DecodePlan : public torch::CustomClassHolder {
 public:
  DecodePlan(const c10::List<std::optional<at::Tensor>>& weights, std::vector<int64_t> linear_meta,
             at::Tensor final_norm, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps)
      : meta_(std::move(linear_meta)), final_norm_(std::move(final_norm)), heads_(num_heads),
        kv_heads_(num_kv_heads), head_dim_(head_dim), eps_(eps) {
    TORCH_CHECK(final_norm_.device().is_cpu() && final_norm_.dim() == 1 && final_norm_.is_contiguous() &&
                    (final_norm_.scalar_type() == at::kFloat || final_norm_.scalar_type() == at::kBFloat16),
                kOp, ": final_norm must be a contiguous 1-D float32 or bfloat16 CPU tensor");
    dtype_ = final_norm_.scalar_type();
    hs_ = final_norm_.size(0);
    layers_ = static_cast<int64_t>(weights.size()) / kSlotsPerLayer;
    TORCH_CHECK(static_cast<int64_t>(weights.size()) == layers_ * kSlotsPerLayer &&
                    static_cast<int64_t>(meta_.size()) == layers_ * 8,
                kOp, ": expected ", kSlotsPerLayer, " weight slots and 8 meta ints per layer");
    TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0 && head_dim % 2 == 0, kOp, ": bad head counts");
    weights_.reserve(weights.size() + 1);
    for (size_t i = 0; i < weights.size(); ++i) weights_.push_back(weights.get(i));
    weights_.push_back(final_norm_);
    validate();
  }

  int64_t num_layers() const { return layers_; }

  // One decode step; see the cpu_decode_layers schema for the arguments. Returns the final-normed hidden
  // states [B, T, H]; `hidden` (the embeddings) is left untouched.
  at::Tensor run(const at::Tensor& hidden, at::TensorList k_caches, at::TensorList v_caches,
                 const at::Tensor& positions, const at::Tensor& slots, const at::Tensor& kv_lens, int64_t kv_span,
                 const at::Tensor& cos, const at::Tensor& sin) {
    std::lock_guard<std::mutex> lock(mu_);  // the scratch buffers are the plan's: one step at a time
    Profile& prof = Profile::get();
    prof.begin();
    if (!weights_unchanged()) validate();
    check_step(hidden, k_caches, v_caches, positions, slots, kv_lens, kv_span, cos, sin);
    const bool bf16 = dtype_ == at::kBFloat16;
    const int64_t b = hidden.size(0), t = hidden.size(1), m = b * t, hs = hs_, head_dim = head_dim_;
    const int64_t q_size = heads_ * head_dim, kv_size = kv_heads_ * head_dim, row = q_size + 2 * kv_size;
    const int64_t es = bf16 ? 2 : 4;
    const float eps = static_cast<float>(eps_);
    ensure_scratch();
    char* residual = scratch_ptr(kResidual);
    char* x = scratch_ptr(kX);
    char* h = scratch_ptr(kH);
    char* qkv = scratch_ptr(kQkv);
    char* attn = scratch_ptr(kAttn);
    char* gate_up = scratch_ptr(kGateUp);
    char* act = scratch_ptr(kAct);
    std::memcpy(residual, hidden.const_data_ptr(), m * hs * es);
    const bool pos64 = positions.scalar_type() == at::kLong, slots64 = slots.scalar_type() == at::kLong;
    prof.mark(Profile::kChecks);

    for (int64_t l = 0; l < layers_; ++l) {
      const LinearRef* L = &lin_[l * 4];
      if (l == 0) cpu::rms_norm(bf16, residual, norms_[0], h, m, hs, eps);
      else cpu::fused_add_rms_norm(bf16, x, residual, norms_[l * 2], h, residual, m, hs, eps);
      prof.mark(Profile::kNorm);
      run_linear(L[0], bf16, h, qkv, m);
      prof.mark(Profile::kQkv);
      cpu::Strided4 q{qkv, t * row, row, head_dim, heads_};
      cpu::Strided4 k{qkv + q_size * es, t * row, row, head_dim, kv_heads_};
      cpu::rotary(bf16, q, k, positions.const_data_ptr(), pos64, cos.const_data_ptr<float>(),
                  sin.const_data_ptr<float>(), b, t, head_dim);
      prof.mark(Profile::kRotary);
      const at::Tensor& kc = k_caches[l];
      const at::Tensor& vc = v_caches[l];
      const int64_t cache_len = kc.size(1);
      cpu::store_kv(es, kc.data_ptr(), vc.data_ptr(), qkv + q_size * es, t * row, row, qkv + (q_size + kv_size) * es,
                    t * row, row, slots.const_data_ptr(), slots64, b, t, cache_len, kv_size);
      prof.mark(Profile::kStoreKv);
      cpu::AttentionArgs a;
      a.bf16 = bf16;
      a.q = qkv; a.q_sb = t * row; a.q_st = row; a.q_sh = head_dim;
      const int64_t cs = cache_len * kv_size;
      a.k = kc.const_data_ptr(); a.k_sb = cs; a.k_st = kv_size; a.k_sh = head_dim;
      a.v = vc.const_data_ptr(); a.v_sb = cs; a.v_st = kv_size; a.v_sh = head_dim;
      a.out = attn;
      a.kv_lens = kv_lens.const_data_ptr<int32_t>();
      a.batch = b; a.tq = t; a.tk = kv_span; a.hq = heads_; a.hkv = kv_heads_; a.head_dim = head_dim;
      a.causal = true;
      a.scale = 1.f / std::sqrt(static_cast<float>(head_dim));
      cpu::attention(a);
      prof.mark(Profile::kAttention);
      run_linear(L[1], bf16, attn, x, m);
      prof.mark(Profile::kO);
      cpu::fused_add_rms_norm(bf16, x, residual, norms_[l * 2 + 1], h, residual, m, hs, eps);
      prof.mark(Profile::kNorm);
      run_linear(L[2], bf16, h, gate_up, m);
      prof.mark(Profile::kGateUp);
      cpu::silu_and_mul(bf16, gate_up, act, m, inter_);
      prof.mark(Profile::kSilu);
      run_linear(L[3], bf16, act, x, m);
      prof.mark(Profile::kDown);
    }
    at::Tensor out = at::empty_like(hidden);
    if (layers_ == 0) cpu::rms_norm(bf16, residual, final_norm_.const_data_ptr(), out.data_ptr(), m, hs, eps);
    else cpu::fused_add_rms_norm(bf16, x, residual, final_norm_.const_data_ptr(), out.data_ptr(), residual, m, hs, eps);
    prof.mark(Profile::kNorm);
    return out;
  }

 private:
  // What validate() saw of a weight tensor; a step re-validates when any of it differs.
  struct Seen {
    const void* data;
    at::ScalarType dtype;
    bool contiguous;
    std::vector<int64_t> sizes;
  };

  const at::Tensor* slot(int64_t i) const { return weights_[i].has_value() ? &*weights_[i] : nullptr; }

  void validate() {
    const int64_t q_size = heads_ * head_dim_, kv_size = kv_heads_ * head_dim_, qkv_n = q_size + 2 * kv_size;
    TORCH_CHECK(final_norm_.scalar_type() == dtype_ && final_norm_.dim() == 1 && final_norm_.size(0) == hs_ &&
                    final_norm_.is_contiguous(),
                kOp, ": final_norm changed dtype or shape since the plan was built");
    lin_.assign(layers_ * 4, LinearRef{});
    norms_.assign(layers_ * 2, nullptr);
    for (int64_t l = 0; l < layers_; ++l) {
      const int64_t base = l * kSlotsPerLayer;
      for (int j = 0; j < 2; ++j) {
        const at::Tensor* norm = slot(base + j);
        TORCH_CHECK(norm && norm->device().is_cpu() && norm->scalar_type() == dtype_ && norm->dim() == 1 &&
                        norm->size(0) == hs_ && norm->is_contiguous(),
                    kOp, ": layer ", l, " norm weights must be [", hs_, "] in the activations' dtype");
        norms_[l * 2 + j] = norm->const_data_ptr();
      }
      const int64_t* meta = meta_.data() + l * 8;
      LinearRef* L = &lin_[l * 4];
      L[0] = linear_ref(base + 2, meta[0], meta[1], hs_, "qkv_proj", l);
      L[1] = linear_ref(base + 6, meta[2], meta[3], q_size, "o_proj", l);
      L[2] = linear_ref(base + 10, meta[4], meta[5], hs_, "gate_up_proj", l);
      TORCH_CHECK(L[0].n == qkv_n && L[1].n == hs_ && L[2].n % 2 == 0, kOp, ": layer ", l,
                  " projection shapes do not match the head counts / hidden size");
      TORCH_CHECK(l == 0 || L[2].n / 2 == inter_, kOp, ": layer ", l, " has a different intermediate size");
      inter_ = L[2].n / 2;
      L[3] = linear_ref(base + 14, meta[6], meta[7], inter_, "down_proj", l);
      TORCH_CHECK(L[3].n == hs_, kOp, ": layer ", l, " down_proj must have ", hs_, " rows");
    }
    seen_.clear();
    for (const auto& w : weights_) {
      if (!w.has_value()) continue;
      seen_.push_back({w->const_data_ptr(), w->scalar_type(), w->is_contiguous(), w->sizes().vec()});
    }
  }

  bool weights_unchanged() const {
    size_t i = 0;
    for (const auto& w : weights_) {
      if (!w.has_value()) continue;
      const Seen& s = seen_[i++];
      if (w->const_data_ptr() != s.data || w->scalar_type() != s.dtype || w->is_contiguous() != s.contiguous ||
          w->sizes() != at::IntArrayRef(s.sizes))
        return false;
    }
    return true;
  }

  LinearRef linear_ref(int64_t base, int64_t bits, int64_t group_size, int64_t k_expected, const char* name,
                       int64_t layer) const {
    LinearRef r{slot(base), slot(base + 1), slot(base + 2), slot(base + 3), static_cast<int>(bits), group_size, 0, 0,
                cpu::QuantWeight{}, nullptr, nullptr};
    TORCH_CHECK(r.w != nullptr, kOp, ": layer ", layer, " ", name, " has no weight");
    TORCH_CHECK(r.w->device().is_cpu() && r.w->dim() == 2 && r.w->is_contiguous(), kOp, ": layer ", layer, " ", name,
                " weight must be a contiguous 2-D CPU tensor");
    r.n = r.w->size(0);
    if (bits == 0) {
      TORCH_CHECK(r.w->scalar_type() == dtype_, kOp, ": layer ", layer, " ", name, " weight dtype ",
                  r.w->scalar_type(), " differs from the activations' ", dtype_);
      r.k = r.w->size(1);
    } else {
      TORCH_CHECK(bits == 4 || bits == 8, kOp, ": bits must be 0, 4 or 8, got ", bits);
      TORCH_CHECK(r.w->scalar_type() == (bits == 4 ? at::kByte : at::kChar), kOp, ": layer ", layer, " ", name,
                  " qweight has the wrong dtype for bits=", bits);
      r.k = r.w->size(1) * (bits == 4 ? 2 : 1);
      TORCH_CHECK(group_size > 0 && r.k % group_size == 0 && r.scale != nullptr && r.scale->device().is_cpu() &&
                      r.scale->is_contiguous() && r.scale->dim() == 2 && r.scale->size(0) == r.n &&
                      r.scale->size(1) == r.k / group_size,
                  kOp, ": layer ", layer, " ", name, " scale must be [N, K / group_size] and contiguous");
      scale_type_of(*r.scale);
      if (r.offset != nullptr)
        TORCH_CHECK(r.offset->sizes() == r.scale->sizes() && r.offset->scalar_type() == r.scale->scalar_type() &&
                        r.offset->device().is_cpu() && r.offset->is_contiguous(),
                    kOp, ": layer ", layer, " ", name, " offset must match scale");
    }
    TORCH_CHECK(r.k == k_expected, kOp, ": layer ", layer, " ", name, " has K=", r.k, ", expected ", k_expected);
    if (r.bias != nullptr)
      TORCH_CHECK(r.bias->device().is_cpu() && r.bias->scalar_type() == dtype_ && r.bias->dim() == 1 &&
                      r.bias->size(0) == r.n && r.bias->is_contiguous(),
                  kOp, ": layer ", layer, " ", name, " bias must be [", r.n, "] in the activations' dtype");
    r.bias_ptr = r.bias ? r.bias->const_data_ptr() : nullptr;
    r.dense = bits == 0 ? r.w->const_data_ptr() : nullptr;
    if (bits != 0)
      r.q = cpu::QuantWeight{r.w->const_data_ptr(), r.scale->const_data_ptr(),
                             r.offset ? r.offset->const_data_ptr() : nullptr, scale_type_of(*r.scale), r.bits, r.n,
                             r.k, r.group_size};
    return r;
  }

  static void run_linear(const LinearRef& r, bool bf16, const void* x, void* out, int64_t m) {
    if (r.bits == 0) cpu::dense_linear(bf16, x, r.dense, r.bias_ptr, out, m, r.n, r.k);
    else cpu::quant_linear(bf16, x, r.q, r.bias_ptr, out, m);
  }

  void check_step(const at::Tensor& hidden, at::TensorList k_caches, at::TensorList v_caches,
                  const at::Tensor& positions, const at::Tensor& slots, const at::Tensor& kv_lens, int64_t kv_span,
                  const at::Tensor& cos, const at::Tensor& sin) const {
    TORCH_CHECK(hidden.device().is_cpu() && hidden.dim() == 3 && hidden.is_contiguous(), kOp,
                ": hidden must be a contiguous [B, T, H] CPU tensor");
    TORCH_CHECK(hidden.scalar_type() == dtype_, kOp, ": hidden is ", hidden.scalar_type(),
                ", the weights' activations' dtype is ", dtype_);
    const int64_t b = hidden.size(0), t = hidden.size(1);
    TORCH_CHECK(hidden.size(2) == hs_, kOp, ": hidden size ", hidden.size(2), " differs from the weights' ", hs_);
    TORCH_CHECK(b * t >= 1 && b * t <= kMaxRows, kOp, ": B x T must be 1..", kMaxRows, " (a decode step), got ", b * t);
    TORCH_CHECK(static_cast<int64_t>(k_caches.size()) == layers_ && static_cast<int64_t>(v_caches.size()) == layers_,
                kOp, ": expected a k/v cache per layer (", layers_, ")");
    TORCH_CHECK(positions.device().is_cpu() && slots.device().is_cpu() && kv_lens.device().is_cpu() &&
                    cos.device().is_cpu() && sin.device().is_cpu(),
                kOp, ": positions, slots, kv_lens, cos and sin must be CPU tensors");
    TORCH_CHECK(positions.scalar_type() == at::kLong || positions.scalar_type() == at::kInt, kOp,
                ": positions must be int64 or int32");
    TORCH_CHECK(slots.scalar_type() == at::kLong || slots.scalar_type() == at::kInt, kOp,
                ": slots must be int64 or int32");
    TORCH_CHECK(positions.sizes() == at::IntArrayRef({b, t}) && slots.sizes() == at::IntArrayRef({b, t}) &&
                    positions.is_contiguous() && slots.is_contiguous(),
                kOp, ": positions and slots must be contiguous [B, T]");
    TORCH_CHECK(kv_lens.scalar_type() == at::kInt && kv_lens.dim() == 1 && kv_lens.size(0) == b &&
                    kv_lens.is_contiguous(),
                kOp, ": kv_lens must be contiguous int32 [B]");
    TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                    sin.is_contiguous() && cos.dim() == 2 && cos.size(1) == head_dim_ / 2 && sin.sizes() == cos.sizes(),
                kOp, ": cos/sin must be contiguous fp32 [max_pos, head_dim/2]");
    const auto [pmin, pmax] = min_max(positions);
    TORCH_CHECK(pmin >= 0 && pmax < cos.size(0), kOp, ": positions must lie in [0, ", cos.size(0), ")");
    const auto [lmin, lmax] = min_max(kv_lens);
    TORCH_CHECK(lmin >= 0 && lmax <= kv_span, kOp, ": kv_lens must lie in [0, kv_span=", kv_span, "]");
    const int64_t smax = min_max(slots).second;
    for (int64_t l = 0; l < layers_; ++l) {
      for (const at::Tensor& c : {k_caches[l], v_caches[l]}) {
        TORCH_CHECK(c.device().is_cpu() && c.scalar_type() == dtype_ && c.is_contiguous() && c.dim() == 4 &&
                        c.size(0) == b && c.size(2) == kv_heads_ && c.size(3) == head_dim_,
                    kOp, ": layer ", l, " caches must be contiguous [B, S, Hkv, D] in the activations' dtype");
        TORCH_CHECK(smax < c.size(1) && kv_span <= c.size(1), kOp, ": slot or kv_span past the end of the cache (",
                    c.size(1), ")");
      }
    }
  }

  // Scratch, reused across layers and steps: residual, normed h, o / down out, qkv, attention out, gate_up, act.
  enum Scratch { kResidual, kX, kH, kQkv, kAttn, kGateUp, kAct, kScratchCount };

  void ensure_scratch() {
    const int64_t widths[kScratchCount] = {hs_, hs_, hs_, (heads_ + 2 * kv_heads_) * head_dim_, heads_ * head_dim_,
                                           2 * inter_, inter_};
    int64_t total = 0;
    for (int i = 0; i < kScratchCount; ++i) {
      offsets_[i] = total;
      total += (widths[i] * kMaxRows * 4 + 63) / 64 * 64;  // fp32-sized rows, 64-byte aligned slices
    }
    if (scratch_.numel() < total) scratch_ = at::empty({total}, at::TensorOptions().dtype(at::kByte));
  }
  char* scratch_ptr(Scratch s) { return static_cast<char*>(scratch_.data_ptr()) + offsets_[s]; }

  std::vector<std::optional<at::Tensor>> weights_;  // the flat list, then final_norm
  std::vector<int64_t> meta_;
  at::Tensor final_norm_;
  int64_t heads_, kv_heads_, head_dim_;
  double eps_;
  at::ScalarType dtype_;
  int64_t hs_ = 0, layers_ = 0, inter_ = 0;
  std::vector<LinearRef> lin_;
  std::vector<const void*> norms_;  // validated like LinearRef
  std::vector<Seen> seen_;
  std::mutex mu_;
  at::Tensor scratch_;
  int64_t offsets_[kScratchCount] = {};
};

at::Tensor decode_step(const c10::intrusive_ptr<DecodePlan>& plan, const at::Tensor& hidden, at::TensorList k_caches,
                       at::TensorList v_caches, const at::Tensor& positions, const at::Tensor& slots,
                       const at::Tensor& kv_lens, int64_t kv_span, const at::Tensor& cos, const at::Tensor& sin) {
  return plan->run(hidden, k_caches, v_caches, positions, slots, kv_lens, kv_span, cos, sin);
}

at::Tensor decode_layers(const at::Tensor& hidden, const c10::List<std::optional<at::Tensor>>& weights,
                         at::IntArrayRef linear_meta, at::TensorList k_caches, at::TensorList v_caches,
                         const at::Tensor& positions, const at::Tensor& slots, const at::Tensor& kv_lens,
                         int64_t kv_span, const at::Tensor& cos, const at::Tensor& sin, int64_t num_heads,
                         int64_t num_kv_heads, int64_t head_dim, double eps, const at::Tensor& final_norm) {
  TORCH_CHECK(hidden.scalar_type() == at::kFloat || hidden.scalar_type() == at::kBFloat16, kOp,
              ": hidden must be float32 or bfloat16, got ", hidden.scalar_type());
  TORCH_CHECK(final_norm.scalar_type() == hidden.scalar_type() && final_norm.dim() == 1 &&
                  (hidden.dim() < 1 || final_norm.size(0) == hidden.size(-1)),
              kOp, ": final_norm must be [", hidden.dim() ? hidden.size(-1) : 0, "] in the activations' dtype");
  DecodePlan plan(weights, linear_meta.vec(), final_norm, num_heads, num_kv_heads, head_dim, eps);
  return plan.run(hidden, k_caches, v_caches, positions, slots, kv_lens, kv_span, cos, sin);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llama_fast, m) {
  m.class_<DecodePlan>("CpuDecodePlan")
      .def(torch::init<const c10::List<std::optional<at::Tensor>>&, std::vector<int64_t>, at::Tensor, int64_t,
                       int64_t, int64_t, double>())
      .def("num_layers", &DecodePlan::num_layers);
  m.def("cpu_decode_layers(Tensor hidden, Tensor?[] weights, int[] linear_meta, Tensor(a!)[] k_caches, "
        "Tensor(b!)[] v_caches, Tensor positions, Tensor slots, Tensor kv_lens, int kv_span, Tensor cos, "
        "Tensor sin, int num_heads, int num_kv_heads, int head_dim, float eps, Tensor final_norm) -> Tensor");
  // The same step on a plan built once per model (llama_fast/ops/cpu_decode.py).
  m.def("cpu_decode_step(__torch__.torch.classes.llama_fast.CpuDecodePlan plan, Tensor hidden, "
        "Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor positions, Tensor slots, Tensor kv_lens, int kv_span, "
        "Tensor cos, Tensor sin) -> Tensor");
}

TORCH_LIBRARY_IMPL(llama_fast, CPU, m) {
  m.impl("cpu_decode_layers", &decode_layers);
  m.impl("cpu_decode_step", &decode_step);
}

}  // namespace llama_fast
