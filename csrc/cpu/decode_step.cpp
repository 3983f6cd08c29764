// The decoder stack of a decode step (a few tokens per sequence) in one C++ call: per layer
//   h = rmsnorm(x + residual); qkv = h W_qkv; rotary(q, k); store_kv; attention over the cache;
//   x = attn W_o; h = rmsnorm(x + residual); x = silu_and_mul(h W_gate_up) W_down
// straight on the torch-free kernels (csrc/cpu/kernels.h), into reused scratch buffers. This removes the
// ~12 Python op calls per layer (several microseconds each, ~3 ms per token for 30 layers) that would
// otherwise cost as much as the weights' memory traffic of a small model.
//
// The weights come per layer as named fields (LlamaDecoderLayer.decode_fields in llama_fast/modeling.py builds
// them; the names are the modules' attribute paths): tensors "input_layernorm", "post_attention_layernorm" and,
// for each projection P in qkv_proj, o_proj, gate_up_proj, down_proj, one weight form:
//   dense:        "P.weight" [N, K] in the activations' dtype, int "P.bits" = 0;
//   affine int:   "P.qweight", "P.scales", "P.offsets" (csrc/common/quant_format.h), ints "P.bits" (4 / 8) and
//                 "P.group_size";
//   ggml blocks:  "P.blocks.<i>" (uint8 [rows_i, row bytes]) with int "P.block_type.<i>" (llama_fast.kquants
//                 TYPE_IDS), i = 0, 1, ... the row segments stacked along N (llama_fast/kquants.py);
// optionally "P.bias" and "P.input_perm" (int64 [K], GPTQ act-order: the linear multiplies x[:, input_perm],
// gathered here once per linear, as the op-by-op path's index_select does; q/k/v and gate/up are fused
// linears, so each input is gathered once). An unknown or missing name is an error, so Python and C++ cannot
// silently disagree.
//
// Padding: a [B, T] step whose rows start with pad tokens (slot -1, left padding: LlamaModel._prepare) runs on
// its real tokens only, packed: the linears and norms see sum_b n_b rows instead of B x T (so a serving step can
// carry one row's prompt chunk of T tokens next to B - 1 rows of one token each, in one pass over the weights),
// rotary / store_kv / attention run per group of consecutive rows with the same n_b, and the pads' outputs are
// zeros. Without pads the packed layout is the [B, T] one and nothing is copied.
//
// llama_fast.CpuDecodePlan (a torch custom class) is built once per model (llama_fast/ops/cpu_decode.py) with
// add_layer() per layer: it validates the ~400 weight tensors once and keeps the scratch buffers, and
// cpu_decode_step(plan, ...) runs a step with only the per-step arguments to check. Before each step the plan
// compares every weight's data pointer, dtype and shape with what it validated (a few ns each) and re-validates
// on any change, so a weight changed in place (param.data = ..., resize_) can never be read through stale
// pointers.
#include <torch/all.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <vector>

#include "common/half_float.h"

#include "cpu/decode_profile.h"
#include "cpu/kernels.h"
#include "cpu/kquant_linear.h"
#include "cpu/torch_args.h"

namespace llama_fast {
namespace {

constexpr int64_t kMaxRows = cpu::kMaxGemvRows;  // decode steps only: the GEMV kernels' batch
constexpr const char* kOp = "cpu_decode_step";
constexpr const char* kLinearNames[4] = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"};

// One projection's named fields, as add_layer received them.
struct LinearFields {
  std::optional<at::Tensor> weight, qweight, scales, offsets, bias, input_perm;
  int64_t bits = 0, group_size = 0;
  std::map<int64_t, at::Tensor> blocks;    // "blocks.<i>": ggml row segments, in i order
  std::map<int64_t, int64_t> block_types;  // "block_type.<i>"
};

struct LayerFields {
  std::optional<at::Tensor> input_norm, post_norm;
  LinearFields linear[4];  // in kLinearNames order
};

using Profile = cpu::DecodeProfile;

struct LinearRef {
  const at::Tensor* w = nullptr;  // weight (dense) or qweight; nullptr for ggml blocks
  const at::Tensor* scale = nullptr;
  const at::Tensor* offset = nullptr;
  const at::Tensor* bias = nullptr;
  int bits = 0;
  int64_t group_size = 0;
  int64_t n = 0, k = 0;
  // The raw view the kernels take, filled in by validate(); valid while weights_unchanged().
  cpu::QuantWeight q{};
  const void* dense = nullptr;
  const void* bias_ptr = nullptr;
  std::vector<cpu::kquant::Segment> segs;  // non-empty: the weight is ggml blocks (kquant::linear)
  const int64_t* perm = nullptr;           // act-order: multiply x[:, perm]
  int64_t weight_bytes = 0;                // what one call reads of the weights (the decode profile's GB/s)
};

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
  DecodePlan(at::Tensor final_norm, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps)
      : final_norm_(std::move(final_norm)), heads_(num_heads), kv_heads_(num_kv_heads), head_dim_(head_dim), eps_(eps) {
    TORCH_CHECK(final_norm_.device().is_cpu() && final_norm_.dim() == 1 && final_norm_.is_contiguous() &&
                    (final_norm_.scalar_type() == at::kFloat || final_norm_.scalar_type() == at::kBFloat16),
                kOp, ": final_norm must be a contiguous 1-D float32 or bfloat16 CPU tensor");
    dtype_ = final_norm_.scalar_type();
    hs_ = final_norm_.size(0);
    TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0 && head_dim % 2 == 0, kOp, ": bad head counts");
  }

  // Appends a decoder layer given by its named fields (see the top of this file); checked on the next step.
  void add_layer(const c10::Dict<std::string, at::Tensor>& tensors, const c10::Dict<std::string, int64_t>& ints) {
    const int64_t l = static_cast<int64_t>(fields_.size());
    LayerFields f;
    for (const auto& item : tensors) {
      const std::string& name = item.key();
      if (name == "input_layernorm")
        f.input_norm = item.value();
      else if (name == "post_attention_layernorm")
        f.post_norm = item.value();
      else
        set_tensor_field(f, name, item.value(), l);
    }
    for (const auto& item : ints) {
      const std::string& name = item.key();
      const auto dot = name.find('.');
      LinearFields& lf = linear_fields(f, name.substr(0, dot), name, l);
      const std::string field = dot == std::string::npos ? "" : name.substr(dot + 1);
      if (field == "bits")
        lf.bits = item.value();
      else if (field == "group_size")
        lf.group_size = item.value();
      else if (field.rfind("block_type.", 0) == 0)
        lf.block_types[segment_index(field, name, l)] = item.value();
      else
        TORCH_CHECK(false, kOp, ": layer ", l, ": unknown int field '", name, "'");
    }
    fields_.push_back(std::move(f));
    validated_ = false;
  }

  int64_t num_layers() const { return static_cast<int64_t>(fields_.size()); }

  // One decode step; see the cpu_decode_step schema for the arguments. Returns the final-normed hidden
  // states [B, T, H]; `hidden` (the embeddings) is left untouched.
  at::Tensor run(const at::Tensor& hidden, at::TensorList k_caches, at::TensorList v_caches,
                 const at::Tensor& positions, const at::Tensor& slots, const at::Tensor& kv_lens, int64_t kv_span,
                 const at::Tensor& cos, const at::Tensor& sin, at::TensorList k_scales, at::TensorList v_scales) {
    std::lock_guard<std::mutex> lock(mu_);  // the scratch buffers are the plan's: one step at a time
    Profile& prof = Profile::get();
    prof.begin();
    if (!validated_ || !weights_unchanged()) validate();
    check_step(hidden, k_caches, v_caches, positions, slots, kv_lens, kv_span, cos, sin, k_scales, v_scales);
    const bool bf16 = dtype_ == at::kBFloat16;
    const int64_t b = hidden.size(0), t = hidden.size(1), hs = hs_, head_dim = head_dim_;
    const bool packed = pack(slots, positions, b, t);
    const int64_t m = packed ? static_cast<int64_t>(token_index_.size()) : b * t;  // rows of the linears
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
    if (packed) {
      for (int64_t i = 0; i < m; ++i)
        std::memcpy(residual + i * hs * es,
                    static_cast<const char*>(hidden.const_data_ptr()) + token_index_[i] * hs * es, hs * es);
    } else {
      std::memcpy(residual, hidden.const_data_ptr(), m * hs * es);
    }
    // the real tokens' positions and slots, in the linears' row order
    const void* pos_ptr = packed ? static_cast<const void*>(packed_positions_.data()) : positions.const_data_ptr();
    const void* slot_ptr = packed ? static_cast<const void*>(packed_slots_.data()) : slots.const_data_ptr();
    const bool pos64 = packed || positions.scalar_type() == at::kLong;
    const bool slots64 = packed || slots.scalar_type() == at::kLong;
    if (!packed) groups_.assign(1, RowGroup{0, b, t, 0});
    // check_step: every layer's cache alike
    const cpu::KvType kv_type = layers_ ? cpu::kv_type(k_caches[0], kOp) : cpu::KvType::kF32;
    const bool int8 = kv_type == cpu::KvType::kI8;
    prof.mark(Profile::kChecks);

    for (int64_t l = 0; l < layers_; ++l) {
      const LinearRef* L = &lin_[l * 4];
      if (l == 0)
        cpu::rms_norm(bf16, residual, norms_[0], h, m, hs, eps);
      else
        cpu::fused_add_rms_norm(bf16, x, residual, norms_[l * 2], h, residual, m, hs, eps);
      prof.mark(Profile::kNorm);
      run_linear(L[0], bf16, h, qkv, m);
      prof.mark(Profile::kQkv, L[0].weight_bytes);
      // the m rows as one sequence: rotary takes per-token positions
      cpu::rotary(bf16, cpu::Strided4{qkv, m * row, row, head_dim, heads_},
                  cpu::Strided4{qkv + q_size * es, m * row, row, head_dim, kv_heads_}, pos_ptr, pos64,
                  cos.const_data_ptr<float>(), sin.const_data_ptr<float>(), 1, m, head_dim);
      prof.mark(Profile::kRotary);
      const at::Tensor& kc = k_caches[l];
      const at::Tensor& vc = v_caches[l];
      // cs: a cache row's elements, ss: its int8 scales [S, Hkv]; each group of rows works on its own cache rows
      const int64_t cache_len = kc.size(1), cs = cache_len * kv_size, ss = cache_len * kv_heads_;
      const int64_t ces = kc.element_size();
      float* ks = int8 ? k_scales[l].data_ptr<float>() : nullptr;
      float* vs = int8 ? v_scales[l].data_ptr<float>() : nullptr;
      auto k_rows = [&](const RowGroup& g) { return static_cast<char*>(kc.data_ptr()) + g.row * cs * ces; };
      auto v_rows = [&](const RowGroup& g) { return static_cast<char*>(vc.data_ptr()) + g.row * cs * ces; };
      auto scales = [&](float* p, const RowGroup& g) { return p ? p + g.row * ss : nullptr; };
      for (const RowGroup& g : groups_) {  // rows [g.row, g.row + g.rows) with g.tokens real tokens each
        char* gq = qkv + g.first_token * row * es;
        const cpu::KvCache cache{kv_type,       k_rows(g), v_rows(g), scales(ks, g),
                                 scales(vs, g), cache_len, kv_heads_, head_dim};
        const void* g_slots = static_cast<const char*>(slot_ptr) + g.first_token * (slots64 ? 8 : 4);
        cpu::store_kv(bf16, cache, gq + q_size * es, g.tokens * row, row, gq + (q_size + kv_size) * es, g.tokens * row,
                      row, g_slots, slots64, g.rows, g.tokens);
      }
      prof.mark(Profile::kStoreKv);
      for (const RowGroup& g : groups_) {
        // The cache as attention reads it: k / v rows of kv_size elements, scales [B, S, Hkv] (int8)
        cpu::Strided4 q{qkv + g.first_token * row * es, g.tokens * row, row, head_dim, heads_};
        cpu::Strided4 kcs{k_rows(g), cs, kv_size, head_dim, kv_heads_};
        cpu::Strided4 vcs{v_rows(g), cs, kv_size, head_dim, kv_heads_};
        cpu::attention(
            cpu::with_kv_cache(cpu::attention_args(bf16, q, kcs, vcs, attn + g.first_token * q_size * es,
                                                   kv_lens.const_data_ptr<int32_t>() + g.row, g.rows, g.tokens, kv_span,
                                                   head_dim, true, 1.f / std::sqrt(static_cast<float>(head_dim))),
                               kv_type, scales(ks, g), scales(vs, g), ss, kv_heads_));
      }
      prof.mark(Profile::kAttention);
      run_linear(L[1], bf16, attn, x, m);
      prof.mark(Profile::kO, L[1].weight_bytes);
      cpu::fused_add_rms_norm(bf16, x, residual, norms_[l * 2 + 1], h, residual, m, hs, eps);
      prof.mark(Profile::kNorm);
      run_linear(L[2], bf16, h, gate_up, m);
      prof.mark(Profile::kGateUp, L[2].weight_bytes);
      cpu::silu_and_mul(bf16, gate_up, act, m, inter_);
      prof.mark(Profile::kSilu);
      run_linear(L[3], bf16, act, x, m);
      prof.mark(Profile::kDown, L[3].weight_bytes);
    }
    at::Tensor out = packed ? at::zeros_like(hidden) : at::empty_like(hidden);
    char* normed = packed ? h : static_cast<char*>(out.data_ptr());
    if (layers_ == 0)
      cpu::rms_norm(bf16, residual, final_norm_.const_data_ptr(), normed, m, hs, eps);
    else
      cpu::fused_add_rms_norm(bf16, x, residual, final_norm_.const_data_ptr(), normed, residual, m, hs, eps);
    if (packed)
      for (int64_t i = 0; i < m; ++i)
        std::memcpy(static_cast<char*>(out.data_ptr()) + token_index_[i] * hs * es, normed + i * hs * es, hs * es);
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

  static LinearFields& linear_fields(LayerFields& f, const std::string& linear, const std::string& name, int64_t l) {
    for (int i = 0; i < 4; ++i)
      if (linear == kLinearNames[i]) return f.linear[i];
    TORCH_CHECK(false, kOp, ": layer ", l, ": unknown field '", name,
                "' (expected input_layernorm, "
                "post_attention_layernorm or qkv_proj / o_proj / gate_up_proj / down_proj .weight / .qweight / "
                ".scales / .offsets / .bias / .input_perm / .blocks.<i> / .bits / .group_size / .block_type.<i>)");
  }

  static void set_tensor_field(LayerFields& f, const std::string& name, const at::Tensor& t, int64_t l) {
    const auto dot = name.find('.');
    LinearFields& lf = linear_fields(f, name.substr(0, dot), name, l);
    const std::string field = dot == std::string::npos ? "" : name.substr(dot + 1);
    std::optional<at::Tensor>* slot = field == "weight"       ? &lf.weight
                                      : field == "qweight"    ? &lf.qweight
                                      : field == "scales"     ? &lf.scales
                                      : field == "offsets"    ? &lf.offsets
                                      : field == "bias"       ? &lf.bias
                                      : field == "input_perm" ? &lf.input_perm
                                                              : nullptr;
    if (slot != nullptr)
      *slot = t;
    else if (field.rfind("blocks.", 0) == 0)
      lf.blocks[segment_index(field, name, l)] = t;
    else
      TORCH_CHECK(false, kOp, ": layer ", l, ": unknown tensor field '", name, "'");
  }

  // i of "blocks.<i>" / "block_type.<i>": a small non-negative decimal.
  static int64_t segment_index(const std::string& field, const std::string& name, int64_t l) {
    const std::string digits = field.substr(field.find('.') + 1);
    TORCH_CHECK(!digits.empty() && digits.size() <= 3 && digits.find_first_not_of("0123456789") == std::string::npos,
                kOp, ": layer ", l, ": bad segment index in '", name, "'");
    return std::stoll(digits);
  }

  static const at::Tensor* ptr(const std::optional<at::Tensor>& t) { return t.has_value() ? &*t : nullptr; }

  void validate() {
    const int64_t q_size = heads_ * head_dim_, kv_size = kv_heads_ * head_dim_, qkv_n = q_size + 2 * kv_size;
    TORCH_CHECK(final_norm_.scalar_type() == dtype_ && final_norm_.dim() == 1 && final_norm_.size(0) == hs_ &&
                    final_norm_.is_contiguous(),
                kOp, ": final_norm changed dtype or shape since the plan was built");
    layers_ = static_cast<int64_t>(fields_.size());
    lin_.assign(layers_ * 4, LinearRef{});
    norms_.assign(layers_ * 2, nullptr);
    held_.clear();
    for (int64_t l = 0; l < layers_; ++l) {
      const LayerFields& f = fields_[l];
      const std::optional<at::Tensor>* layer_norms[2] = {&f.input_norm, &f.post_norm};
      for (int j = 0; j < 2; ++j) {
        const at::Tensor* norm = ptr(*layer_norms[j]);
        TORCH_CHECK(norm && norm->device().is_cpu() && norm->scalar_type() == dtype_ && norm->dim() == 1 &&
                        norm->size(0) == hs_ && norm->is_contiguous(),
                    kOp, ": layer ", l, " ", j == 0 ? "input_layernorm" : "post_attention_layernorm", " must be [", hs_,
                    "] in the activations' dtype");
        norms_[l * 2 + j] = norm->const_data_ptr();
        held_.push_back(norm);
      }
      LinearRef* L = &lin_[l * 4];
      L[0] = linear_ref(f.linear[0], hs_, 0, l);
      L[1] = linear_ref(f.linear[1], q_size, 1, l);
      L[2] = linear_ref(f.linear[2], hs_, 2, l);
      TORCH_CHECK(L[0].n == qkv_n && L[1].n == hs_ && L[2].n % 2 == 0, kOp, ": layer ", l,
                  " projection shapes do not match the head counts / hidden size");
      TORCH_CHECK(l == 0 || L[2].n / 2 == inter_, kOp, ": layer ", l, " has a different intermediate size");
      inter_ = L[2].n / 2;
      L[3] = linear_ref(f.linear[3], inter_, 3, l);
      TORCH_CHECK(L[3].n == hs_, kOp, ": layer ", l, " down_proj must have ", hs_, " rows");
      for (int j = 0; j < 4; ++j) {
        const LinearFields& lf = f.linear[j];
        for (const auto* t : {&lf.weight, &lf.qweight, &lf.scales, &lf.offsets, &lf.bias, &lf.input_perm})
          if (t->has_value()) {
            held_.push_back(&**t);
            L[j].weight_bytes += static_cast<int64_t>((*t)->nbytes());
          }
        for (const auto& seg : lf.blocks) {
          held_.push_back(&seg.second);
          L[j].weight_bytes += static_cast<int64_t>(seg.second.nbytes());
        }
      }
    }
    held_.push_back(&final_norm_);
    seen_.clear();
    for (const at::Tensor* w : held_)
      seen_.push_back({w->const_data_ptr(), w->scalar_type(), w->is_contiguous(), w->sizes().vec()});
    validated_ = true;
  }

  bool weights_unchanged() const {
    for (size_t i = 0; i < held_.size(); ++i) {
      const at::Tensor* w = held_[i];
      const Seen& s = seen_[i];
      if (w->const_data_ptr() != s.data || w->scalar_type() != s.dtype || w->is_contiguous() != s.contiguous ||
          w->sizes() != at::IntArrayRef(s.sizes))
        return false;
    }
    return true;
  }

  LinearRef linear_ref(const LinearFields& f, int64_t k_expected, int which, int64_t layer) const {
    const char* name = kLinearNames[which];
    LinearRef r = f.blocks.empty() && f.block_types.empty() ? affine_or_dense_ref(f, k_expected, which, layer)
                                                            : block_ref(f, k_expected, which, layer);
    if (r.bias != nullptr)
      TORCH_CHECK(r.bias->device().is_cpu() && r.bias->scalar_type() == dtype_ && r.bias->dim() == 1 &&
                      r.bias->size(0) == r.n && r.bias->is_contiguous(),
                  kOp, ": layer ", layer, " ", name, " bias must be [", r.n, "] in the activations' dtype");
    r.bias_ptr = r.bias ? r.bias->const_data_ptr() : nullptr;
    if (f.input_perm.has_value()) {
      const at::Tensor& p = *f.input_perm;
      TORCH_CHECK(
          p.device().is_cpu() && p.scalar_type() == at::kLong && p.dim() == 1 && p.size(0) == r.k && p.is_contiguous(),
          kOp, ": layer ", layer, " ", name, ".input_perm must be a contiguous int64 CPU tensor [", r.k, "]");
      r.perm = p.const_data_ptr<int64_t>();  // each index is range-checked where it is read (gather_inputs)
    }
    return r;
  }

  // A linear held as ggml blocks: "blocks.<i>" with "block_type.<i>" for i = 0, 1, ..., stacked along N.
  LinearRef block_ref(const LinearFields& f, int64_t k, int which, int64_t layer) const {
    const char* name = kLinearNames[which];
    TORCH_CHECK(!f.weight && !f.qweight && !f.scales && !f.offsets && f.bits == 0 && f.group_size == 0, kOp, ": layer ",
                layer, " ", name, " has ggml blocks and another weight form");
    TORCH_CHECK(f.blocks.size() == f.block_types.size(), kOp, ": layer ", layer, " ", name,
                " needs one block_type per blocks tensor");
    LinearRef r;
    r.bias = ptr(f.bias);
    r.k = k;
    int64_t expect = 0;
    for (const auto& [i, t] : f.blocks) {
      TORCH_CHECK(i == expect++ && f.block_types.count(i), kOp, ": layer ", layer, " ", name,
                  " block segments must be numbered 0, 1, ... with a block_type each");
      const int64_t type = f.block_types.at(i);
      TORCH_CHECK(ggml::valid_type(static_cast<int>(type)), kOp, ": layer ", layer, " ", name,
                  ": unknown block type id ", type);
      const auto bt = static_cast<ggml::BlockType>(type);
      TORCH_CHECK(k % ggml::block_weights(bt) == 0, kOp, ": layer ", layer, " ", name, ": K=", k,
                  " is not a multiple of the block size ", ggml::block_weights(bt));
      TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kByte && t.dim() == 2 && t.is_contiguous() &&
                      t.size(1) == cpu::kquant::row_bytes(bt, k),
                  kOp, ": layer ", layer, " ", name, ".blocks.", i, " must be contiguous uint8 [rows, ",
                  cpu::kquant::row_bytes(bt, k), "] on the CPU, got ", t.scalar_type(), " ", t.sizes());
      r.segs.push_back({bt, t.const_data_ptr<uint8_t>(), t.size(0)});
      r.n += t.size(0);
    }
    return r;
  }

  LinearRef affine_or_dense_ref(const LinearFields& f, int64_t k_expected, int which, int64_t layer) const {
    const char* name = kLinearNames[which];
    const int64_t bits = f.bits, group_size = f.group_size;
    TORCH_CHECK(bits == 0 || bits == 4 || bits == 8, kOp, ": layer ", layer, " ", name,
                ".bits must be 0 (dense), 4 or 8, got ", bits);
    const auto& weight = bits == 0 ? f.weight : f.qweight;
    TORCH_CHECK(!(bits == 0 ? f.qweight : f.weight).has_value() && (bits != 0 || (!f.scales && !f.offsets)), kOp,
                ": layer ", layer, " ", name,
                bits == 0 ? " is dense (bits 0) but has quantized fields" : " is quantized but has a dense weight");
    LinearRef r;
    r.w = ptr(weight), r.scale = ptr(f.scales), r.offset = ptr(f.offsets), r.bias = ptr(f.bias);
    r.bits = static_cast<int>(bits), r.group_size = group_size;
    TORCH_CHECK(r.w != nullptr, kOp, ": layer ", layer, " ", name, " has no ", bits == 0 ? "weight" : "qweight");
    TORCH_CHECK(r.w->device().is_cpu() && r.w->dim() == 2 && r.w->is_contiguous(), kOp, ": layer ", layer, " ", name,
                " weight must be a contiguous 2-D CPU tensor");
    r.n = r.w->size(0);
    if (bits == 0) {
      TORCH_CHECK(r.w->scalar_type() == dtype_, kOp, ": layer ", layer, " ", name, " weight dtype ", r.w->scalar_type(),
                  " differs from the activations' ", dtype_);
      r.k = r.w->size(1);
    } else {
      TORCH_CHECK(r.w->scalar_type() == (bits == 4 ? at::kByte : at::kChar), kOp, ": layer ", layer, " ", name,
                  " qweight has the wrong dtype for bits=", bits);
      r.k = r.w->size(1) * (bits == 4 ? 2 : 1);
      TORCH_CHECK(group_size > 0 && r.k % group_size == 0 && r.scale != nullptr && r.scale->device().is_cpu() &&
                      r.scale->is_contiguous() && r.scale->dim() == 2 && r.scale->size(0) == r.n &&
                      r.scale->size(1) == r.k / group_size,
                  kOp, ": layer ", layer, " ", name, " scales must be [N, K / group_size] and contiguous");
      cpu::scale_type(*r.scale, kOp);
      if (r.offset != nullptr)
        TORCH_CHECK(r.offset->sizes() == r.scale->sizes() && r.offset->scalar_type() == r.scale->scalar_type() &&
                        r.offset->device().is_cpu() && r.offset->is_contiguous(),
                    kOp, ": layer ", layer, " ", name, " offsets must match scales");
    }
    TORCH_CHECK(r.k == k_expected, kOp, ": layer ", layer, " ", name, " has K=", r.k, ", expected ", k_expected);
    r.dense = bits == 0 ? r.w->const_data_ptr() : nullptr;
    if (bits != 0)
      r.q = cpu::QuantWeight{r.w->const_data_ptr(),
                             r.scale->const_data_ptr(),
                             r.offset ? r.offset->const_data_ptr() : nullptr,
                             cpu::scale_type(*r.scale, kOp),
                             r.bits,
                             r.n,
                             r.k,
                             r.group_size};
    return r;
  }

  // out[m, N] = x[m, K] @ W^T (+ bias) with the kernel the op-by-op path runs for this weight form (ops/cpu.py:
  // linear, quant_linear, kquant_linear), on the same inputs: the same numbers.
  void run_linear(const LinearRef& r, bool bf16, const void* x, void* out, int64_t m) {
    if (r.perm != nullptr) x = gather_inputs(r, bf16, x, m);
    if (!r.segs.empty()) {
      // kquant_linear's op: fp32 out, + bias in fp32, then rounded to the activations' dtype
      float* acc = bf16 ? reinterpret_cast<float*>(scratch_ptr(kBlockOut)) : static_cast<float*>(out);
      cpu::kquant::linear(bf16, x, m, r.segs, r.k, acc);
      if (r.bias_ptr != nullptr)
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j = 0; j < r.n; ++j)
            acc[i * r.n + j] += bf16 ? bf16_bits_to_float(static_cast<const uint16_t*>(r.bias_ptr)[j])
                                     : static_cast<const float*>(r.bias_ptr)[j];
      if (bf16)
        for (int64_t i = 0; i < m * r.n; ++i) static_cast<uint16_t*>(out)[i] = float_to_bf16_bits(acc[i]);
    } else if (r.bits == 0) {
      cpu::dense_linear(bf16, x, r.dense, r.bias_ptr, out, m, r.n, r.k);
    } else {
      cpu::quant_linear(bf16, x, r.q, r.bias_ptr, out, m);
    }
  }

  // x[:, perm] into the plan's scratch (x.index_select(-1, perm) of the op-by-op path: copies, exact).
  const void* gather_inputs(const LinearRef& r, bool bf16, const void* x, int64_t m) {
    void* dst = scratch_ptr(kGathered);
    const int64_t k = r.k;
    LF_CPU_DISPATCH_DTYPE(bf16, T, {
      const T* src = static_cast<const T*>(x);
      T* out = static_cast<T*>(dst);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t p = r.perm[j];
        // validate() saw a permutation; an in-place change since then must not read out of bounds
        TORCH_CHECK(static_cast<uint64_t>(p) < static_cast<uint64_t>(k), kOp, ": input_perm holds ", p,
                    ", outside [0, ", k, ")");
        for (int64_t i = 0; i < m; ++i) out[i * k + j] = src[i * k + p];
      }
    });
    return dst;
  }

  void check_step(const at::Tensor& hidden, at::TensorList k_caches, at::TensorList v_caches,
                  const at::Tensor& positions, const at::Tensor& slots, const at::Tensor& kv_lens, int64_t kv_span,
                  const at::Tensor& cos, const at::Tensor& sin, at::TensorList k_scales,
                  at::TensorList v_scales) const {
    TORCH_CHECK(hidden.device().is_cpu() && hidden.dim() == 3 && hidden.is_contiguous(), kOp,
                ": hidden must be a contiguous [B, T, H] CPU tensor");
    TORCH_CHECK(hidden.scalar_type() == dtype_, kOp, ": hidden is ", hidden.scalar_type(),
                ", the weights' activations' dtype is ", dtype_);
    const int64_t b = hidden.size(0), t = hidden.size(1);
    TORCH_CHECK(hidden.size(2) == hs_, kOp, ": hidden size ", hidden.size(2), " differs from the weights' ", hs_);
    TORCH_CHECK(b * t >= 1, kOp, ": the step has no tokens");  // at most kMaxRows real ones: pack()
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
    TORCH_CHECK(
        kv_lens.scalar_type() == at::kInt && kv_lens.dim() == 1 && kv_lens.size(0) == b && kv_lens.is_contiguous(), kOp,
        ": kv_lens must be contiguous int32 [B]");
    TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                    sin.is_contiguous() && cos.dim() == 2 && cos.size(1) == head_dim_ / 2 && sin.sizes() == cos.sizes(),
                kOp, ": cos/sin must be contiguous fp32 [max_pos, head_dim/2]");
    const auto [pmin, pmax] = min_max(positions);
    TORCH_CHECK(pmin >= 0 && pmax < cos.size(0), kOp, ": positions must lie in [0, ", cos.size(0), ")");
    const auto [lmin, lmax] = min_max(kv_lens);
    TORCH_CHECK(lmin >= 0 && lmax <= kv_span, kOp, ": kv_lens must lie in [0, kv_span=", kv_span, "]");
    const int64_t smax = min_max(slots).second;
    // Every layer's cache: one kv_cache_dtype (fp32, bf16, fp16, or int8 with fp32 scales [B, S, Hkv] per layer)
    if (layers_ == 0) return;
    const at::ScalarType cache_dtype = k_caches[0].scalar_type();
    cpu::kv_type(k_caches[0], kOp);  // an error naming the dtypes a cache may have
    const bool int8 = cache_dtype == at::kChar;
    TORCH_CHECK(
        int8 ? static_cast<int64_t>(k_scales.size()) == layers_ && static_cast<int64_t>(v_scales.size()) == layers_
             : k_scales.empty() && v_scales.empty(),
        kOp,
        int8 ? ": an int8 KV cache needs k_scales and v_scales, one per layer"
             : ": k_scales / v_scales go with an int8 KV cache only");
    for (int64_t l = 0; l < layers_; ++l) {
      for (const at::Tensor& c : {k_caches[l], v_caches[l]}) {
        TORCH_CHECK(c.device().is_cpu() && c.scalar_type() == cache_dtype && c.is_contiguous() && c.dim() == 4 &&
                        c.size(0) == b && c.size(2) == kv_heads_ && c.size(3) == head_dim_,
                    kOp, ": layer ", l, " caches must be contiguous [B, S, Hkv, D], all layers of one dtype");
        TORCH_CHECK(smax < c.size(1) && kv_span <= c.size(1), kOp, ": slot or kv_span past the end of the cache (",
                    c.size(1), ")");
      }
      TORCH_CHECK(v_caches[l].sizes() == k_caches[l].sizes(), kOp, ": layer ", l, " k and v caches differ in shape");
      if (int8) {
        for (const at::Tensor& s : {k_scales[l], v_scales[l]}) {
          cpu::check_kv_scale(s, k_caches[l], kOp, "k/v scale");
          TORCH_CHECK(s.is_contiguous(), kOp, ": layer ", l, " scales must be contiguous");
        }
      }
    }
  }

  // Consecutive batch rows with the same number of real tokens: one store_kv / attention call each.
  struct RowGroup {
    int64_t row, rows, tokens, first_token;  // first_token: of the group's first row, in the packed order
  };

  // Whether the step has pads (slot -1); if so fills token_index_ (the real tokens' b * T + i, row-major),
  // packed_positions_, packed_slots_ and groups_. Pads must come first in their row (left padding), and at most
  // kMaxRows tokens may be real (check_step bounded B x T only for an unpadded step).
  bool pack(const at::Tensor& slots, const at::Tensor& positions, int64_t b, int64_t t) {
    const bool s64 = slots.scalar_type() == at::kLong, p64 = positions.scalar_type() == at::kLong;
    auto at64 = [](const at::Tensor& x, bool is64, int64_t i) -> int64_t {
      return is64 ? x.const_data_ptr<int64_t>()[i] : x.const_data_ptr<int32_t>()[i];
    };
    bool any_pad = false;
    for (int64_t i = 0; i < b * t && !any_pad; ++i) any_pad = at64(slots, s64, i) < 0;
    if (!any_pad) {
      TORCH_CHECK(b * t <= kMaxRows, kOp, ": B x T must be 1..", kMaxRows, " (a decode step), got ", b * t);
      return false;
    }
    token_index_.clear(), packed_positions_.clear(), packed_slots_.clear(), groups_.clear();
    for (int64_t r = 0; r < b; ++r) {
      int64_t pads = 0;
      while (pads < t && at64(slots, s64, r * t + pads) < 0) ++pads;
      for (int64_t i = pads; i < t; ++i) {
        TORCH_CHECK(at64(slots, s64, r * t + i) >= 0, kOp, ": row ", r,
                    " has a pad (slot -1) after a real token: "
                    "only left padding is supported");
        token_index_.push_back(r * t + i);
        packed_positions_.push_back(at64(positions, p64, r * t + i));
        packed_slots_.push_back(at64(slots, s64, r * t + i));
      }
      const int64_t tokens = t - pads;
      if (tokens == 0) continue;  // nothing to store or attend: the row's output stays zero
      if (!groups_.empty() && groups_.back().tokens == tokens && groups_.back().row + groups_.back().rows == r)
        ++groups_.back().rows;
      else
        groups_.push_back(RowGroup{r, 1, tokens, static_cast<int64_t>(token_index_.size()) - tokens});
    }
    TORCH_CHECK(!token_index_.empty() && static_cast<int64_t>(token_index_.size()) <= kMaxRows, kOp,
                ": a padded step must have 1..", kMaxRows, " real tokens, got ", token_index_.size());
    return true;
  }

  std::vector<int64_t> token_index_, packed_positions_, packed_slots_;  // pack()'s, reused across steps
  std::vector<RowGroup> groups_;

  // Scratch, reused across layers and steps: residual, normed h, o / down out, qkv, attention out, gate_up, act,
  // a linear's gathered input (act-order) and a block linear's fp32 output (bf16 models).
  enum Scratch { kResidual, kX, kH, kQkv, kAttn, kGateUp, kAct, kGathered, kBlockOut, kScratchCount };

  void ensure_scratch() {
    const int64_t qkv_n = (heads_ + 2 * kv_heads_) * head_dim_, q_size = heads_ * head_dim_;
    const int64_t widths[kScratchCount] = {hs_,
                                           hs_,
                                           hs_,
                                           qkv_n,
                                           q_size,
                                           2 * inter_,
                                           inter_,
                                           std::max({hs_, q_size, inter_}),
                                           std::max({qkv_n, hs_, 2 * inter_})};
    int64_t total = 0;
    for (int i = 0; i < kScratchCount; ++i) {
      offsets_[i] = total;
      total += (widths[i] * kMaxRows * 4 + 63) / 64 * 64;  // fp32-sized rows, 64-byte aligned slices
    }
    if (scratch_.numel() < total) scratch_ = at::empty({total}, at::TensorOptions().dtype(at::kByte));
  }
  char* scratch_ptr(Scratch s) { return static_cast<char*>(scratch_.data_ptr()) + offsets_[s]; }

  std::vector<LayerFields> fields_;      // as add_layer received them
  std::vector<const at::Tensor*> held_;  // every tensor validate() read, final_norm last
  bool validated_ = false;
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
                       const at::Tensor& kv_lens, int64_t kv_span, const at::Tensor& cos, const at::Tensor& sin,
                       at::TensorList k_scales, at::TensorList v_scales) {
  return plan->run(hidden, k_caches, v_caches, positions, slots, kv_lens, kv_span, cos, sin, k_scales, v_scales);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llama_fast, m) {
  m.class_<DecodePlan>("CpuDecodePlan")
      .def(torch::init<at::Tensor, int64_t, int64_t, int64_t, double>())
      .def("add_layer", &DecodePlan::add_layer)
      .def("num_layers", &DecodePlan::num_layers);
  // One decode step of the whole decoder stack on a plan built once per model (llama_fast/ops/cpu_decode.py).
  m.def(
      "cpu_decode_step(__torch__.torch.classes.llama_fast.CpuDecodePlan plan, Tensor hidden, "
      "Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor positions, Tensor slots, Tensor kv_lens, int kv_span, "
      "Tensor cos, Tensor sin, Tensor(c!)[] k_scales, Tensor(d!)[] v_scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(llama_fast, CPU, m) { m.impl("cpu_decode_step", &decode_step); }

}  // namespace llama_fast
