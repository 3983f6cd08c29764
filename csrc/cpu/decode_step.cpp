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
#include <torch/all.h>
#include <torch/library.h>

#include "cpu/kernels.h"

namespace llama_fast {
namespace {

constexpr int64_t kSlotsPerLayer = 2 + 4 * 4;
constexpr int64_t kMaxRows = 8;  // the GEMV kernels' batch: decode only

struct LinearRef {
  const at::Tensor* w;
  const at::Tensor* scale;
  const at::Tensor* offset;
  const at::Tensor* bias;
  int bits;
  int64_t group_size;
  int64_t n, k;
};

const at::Tensor* opt(const c10::List<std::optional<at::Tensor>>& list, std::vector<at::Tensor>& keep, int64_t i) {
  const std::optional<at::Tensor> t = list.get(i);
  if (!t.has_value()) return nullptr;
  keep[i] = *t;
  return &keep[i];
}

cpu::ScaleType scale_type_of(const at::Tensor& s) {
  switch (s.scalar_type()) {
    case at::kFloat: return cpu::ScaleType::kF32;
    case at::kHalf: return cpu::ScaleType::kF16;
    case at::kBFloat16: return cpu::ScaleType::kBF16;
    default: TORCH_CHECK(false, "cpu_decode_layers: scale must be float32, float16 or bfloat16, got ", s.scalar_type());
  }
}

LinearRef linear_ref(const c10::List<std::optional<at::Tensor>>& list, std::vector<at::Tensor>& keep, int64_t base,
                     int64_t bits, int64_t group_size, int64_t k_expected, at::ScalarType dtype, const char* name,
                     int64_t layer) {
  LinearRef r{opt(list, keep, base), opt(list, keep, base + 1), opt(list, keep, base + 2), opt(list, keep, base + 3),
              static_cast<int>(bits), group_size, 0, 0};
  TORCH_CHECK(r.w != nullptr, "cpu_decode_layers: layer ", layer, " ", name, " has no weight");
  TORCH_CHECK(r.w->device().is_cpu() && r.w->dim() == 2 && r.w->is_contiguous(), "cpu_decode_layers: layer ", layer,
              " ", name, " weight must be a contiguous 2-D CPU tensor");
  r.n = r.w->size(0);
  if (bits == 0) {
    TORCH_CHECK(r.w->scalar_type() == dtype, "cpu_decode_layers: layer ", layer, " ", name, " weight dtype ",
                r.w->scalar_type(), " differs from the activations' ", dtype);
    r.k = r.w->size(1);
  } else {
    TORCH_CHECK(bits == 4 || bits == 8, "cpu_decode_layers: bits must be 0, 4 or 8, got ", bits);
    TORCH_CHECK(r.w->scalar_type() == (bits == 4 ? at::kByte : at::kChar), "cpu_decode_layers: layer ", layer, " ",
                name, " qweight has the wrong dtype for bits=", bits);
    r.k = r.w->size(1) * (bits == 4 ? 2 : 1);
    TORCH_CHECK(group_size > 0 && r.k % group_size == 0 && r.scale != nullptr && r.scale->is_contiguous() &&
                    r.scale->dim() == 2 && r.scale->size(0) == r.n && r.scale->size(1) == r.k / group_size,
                "cpu_decode_layers: layer ", layer, " ", name, " scale must be [N, K / group_size] and contiguous");
    scale_type_of(*r.scale);
    if (r.offset != nullptr)
      TORCH_CHECK(r.offset->sizes() == r.scale->sizes() && r.offset->scalar_type() == r.scale->scalar_type() &&
                      r.offset->is_contiguous(),
                  "cpu_decode_layers: layer ", layer, " ", name, " offset must match scale");
  }
  TORCH_CHECK(r.k == k_expected, "cpu_decode_layers: layer ", layer, " ", name, " has K=", r.k, ", expected ",
              k_expected);
  if (r.bias != nullptr)
    TORCH_CHECK(r.bias->scalar_type() == dtype && r.bias->dim() == 1 && r.bias->size(0) == r.n &&
                    r.bias->is_contiguous(),
                "cpu_decode_layers: layer ", layer, " ", name, " bias must be [", r.n, "] in the activations' dtype");
  return r;
}

void run_linear(const LinearRef& r, bool bf16, const void* x, void* out, int64_t m) {
  const void* bias = r.bias ? r.bias->data_ptr() : nullptr;
  if (r.bits == 0) {
    cpu::dense_linear(bf16, x, r.w->data_ptr(), bias, out, m, r.n, r.k);
  } else {
    const cpu::QuantWeight w{r.w->data_ptr(), r.scale->data_ptr(), r.offset ? r.offset->data_ptr() : nullptr,
                             scale_type_of(*r.scale), r.bits, r.n, r.k, r.group_size};
    cpu::quant_linear(bf16, x, w, bias, out, m);
  }
}

// Returns the final-normed hidden states [B, T, H]; `hidden` (the embeddings) is left untouched.
at::Tensor decode_layers(const at::Tensor& hidden, const c10::List<std::optional<at::Tensor>>& weights,
                         at::IntArrayRef linear_meta, at::TensorList k_caches, at::TensorList v_caches,
                         const at::Tensor& positions, const at::Tensor& slots, const at::Tensor& kv_lens,
                         int64_t kv_span, const at::Tensor& cos, const at::Tensor& sin, int64_t num_heads,
                         int64_t num_kv_heads, int64_t head_dim, double eps, const at::Tensor& final_norm) {
  const char* op = "cpu_decode_layers";
  TORCH_CHECK(hidden.device().is_cpu() && hidden.dim() == 3 && hidden.is_contiguous(), op,
              ": hidden must be a contiguous [B, T, H] CPU tensor");
  TORCH_CHECK(hidden.scalar_type() == at::kFloat || hidden.scalar_type() == at::kBFloat16, op,
              ": hidden must be float32 or bfloat16, got ", hidden.scalar_type());
  const bool bf16 = hidden.scalar_type() == at::kBFloat16;
  const auto dtype = hidden.scalar_type();
  const int64_t b = hidden.size(0), t = hidden.size(1), hs = hidden.size(2), m = b * t;
  TORCH_CHECK(m >= 1 && m <= kMaxRows, op, ": B x T must be 1..", kMaxRows, " (a decode step), got ", m);
  const int64_t layers = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == layers * kSlotsPerLayer &&
                  static_cast<int64_t>(linear_meta.size()) == layers * 8 &&
                  static_cast<int64_t>(v_caches.size()) == layers,
              op, ": expected ", kSlotsPerLayer, " weight slots, 8 meta ints and a k/v cache per layer");
  TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0 && head_dim % 2 == 0, op, ": bad head counts");
  const int64_t q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim, qkv_n = q_size + 2 * kv_size;
  TORCH_CHECK(positions.scalar_type() == at::kLong || positions.scalar_type() == at::kInt, op,
              ": positions must be int64 or int32");
  TORCH_CHECK(slots.scalar_type() == at::kLong || slots.scalar_type() == at::kInt, op, ": slots must be int64 or int32");
  TORCH_CHECK(positions.sizes() == at::IntArrayRef({b, t}) && slots.sizes() == at::IntArrayRef({b, t}) &&
                  positions.is_contiguous() && slots.is_contiguous(),
              op, ": positions and slots must be contiguous [B, T]");
  TORCH_CHECK(kv_lens.scalar_type() == at::kInt && kv_lens.dim() == 1 && kv_lens.size(0) == b &&
                  kv_lens.is_contiguous(),
              op, ": kv_lens must be contiguous int32 [B]");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.dim() == 2 && cos.size(1) == head_dim / 2 && sin.sizes() == cos.sizes(),
              op, ": cos/sin must be contiguous fp32 [max_pos, head_dim/2]");
  TORCH_CHECK(final_norm.scalar_type() == dtype && final_norm.dim() == 1 && final_norm.size(0) == hs &&
                  final_norm.is_contiguous(),
              op, ": final_norm must be [", hs, "] in the activations' dtype");
  {
    const int64_t pmin = positions.min().item<int64_t>(), pmax = positions.max().item<int64_t>();
    TORCH_CHECK(pmin >= 0 && pmax < cos.size(0), op, ": positions must lie in [0, ", cos.size(0), ")");
    const int64_t lmin = kv_lens.min().item<int64_t>(), lmax = kv_lens.max().item<int64_t>();
    TORCH_CHECK(lmin >= 0 && lmax <= kv_span, op, ": kv_lens must lie in [0, kv_span=", kv_span, "]");
  }
  const int64_t smax = slots.max().item<int64_t>();

  std::vector<at::Tensor> keep(weights.size());
  std::vector<LinearRef> lin(layers * 4);
  std::vector<const at::Tensor*> norms(layers * 2);
  int64_t inter = 0;
  for (int64_t l = 0; l < layers; ++l) {
    const int64_t base = l * kSlotsPerLayer;
    for (int j = 0; j < 2; ++j) {
      norms[l * 2 + j] = opt(weights, keep, base + j);
      TORCH_CHECK(norms[l * 2 + j] && norms[l * 2 + j]->scalar_type() == dtype && norms[l * 2 + j]->dim() == 1 &&
                      norms[l * 2 + j]->size(0) == hs && norms[l * 2 + j]->is_contiguous(),
                  op, ": layer ", l, " norm weights must be [", hs, "] in the activations' dtype");
    }
    const int64_t* meta = linear_meta.data() + l * 8;
    lin[l * 4 + 0] = linear_ref(weights, keep, base + 2, meta[0], meta[1], hs, dtype, "qkv_proj", l);
    lin[l * 4 + 1] = linear_ref(weights, keep, base + 6, meta[2], meta[3], q_size, dtype, "o_proj", l);
    lin[l * 4 + 2] = linear_ref(weights, keep, base + 10, meta[4], meta[5], hs, dtype, "gate_up_proj", l);
    TORCH_CHECK(lin[l * 4 + 0].n == qkv_n && lin[l * 4 + 1].n == hs && lin[l * 4 + 2].n % 2 == 0, op, ": layer ", l,
                " projection shapes do not match the head counts / hidden size");
    inter = lin[l * 4 + 2].n / 2;
    lin[l * 4 + 3] = linear_ref(weights, keep, base + 14, meta[6], meta[7], inter, dtype, "down_proj", l);
    TORCH_CHECK(lin[l * 4 + 3].n == hs, op, ": layer ", l, " down_proj must have ", hs, " rows");
    for (const at::Tensor& c : {k_caches[l], v_caches[l]}) {
      TORCH_CHECK(c.device().is_cpu() && c.scalar_type() == dtype && c.is_contiguous() && c.dim() == 4 &&
                      c.size(0) == b && c.size(2) == num_kv_heads && c.size(3) == head_dim,
                  op, ": layer ", l, " caches must be contiguous [B, S, Hkv, D] in the activations' dtype");
      TORCH_CHECK(smax < c.size(1) && kv_span <= c.size(1), op, ": slot or kv_span past the end of the cache (",
                  c.size(1), ")");
    }
  }

  // Scratch, reused across layers: residual, normed h, qkv, attention out, o / down out, gate_up, act.
  const int64_t es = bf16 ? 2 : 4;
  auto opts = hidden.options();
  at::Tensor residual = hidden.clone();
  at::Tensor x = at::empty({m, hs}, opts), h = at::empty({m, hs}, opts);
  at::Tensor qkv = at::empty({m, qkv_n}, opts), attn = at::empty({b, t, num_heads, head_dim}, opts);
  at::Tensor gate_up = at::empty({m, 2 * inter}, opts), act = at::empty({m, inter}, opts);
  char* qkv_p = static_cast<char*>(qkv.data_ptr());
  const int64_t row = qkv_n;  // qkv row stride per token, in elements

  for (int64_t l = 0; l < layers; ++l) {
    const LinearRef* L = &lin[l * 4];
    if (l == 0) cpu::rms_norm(bf16, residual.data_ptr(), norms[0]->data_ptr(), h.data_ptr(), m, hs, eps);
    else cpu::fused_add_rms_norm(bf16, x.data_ptr(), residual.data_ptr(), norms[l * 2]->data_ptr(), h.data_ptr(),
                                 residual.data_ptr(), m, hs, eps);
    run_linear(L[0], bf16, h.data_ptr(), qkv.data_ptr(), m);
    cpu::Strided4 q{qkv_p, t * row, row, head_dim, num_heads};
    cpu::Strided4 k{qkv_p + q_size * es, t * row, row, head_dim, num_kv_heads};
    cpu::rotary(bf16, q, k, positions.data_ptr(), positions.scalar_type() == at::kLong, cos.data_ptr<float>(),
                sin.data_ptr<float>(), b, t, head_dim);
    const at::Tensor& kc = k_caches[l];
    const at::Tensor& vc = v_caches[l];
    cpu::store_kv(es, kc.data_ptr(), vc.data_ptr(), qkv_p + q_size * es, t * row, row,
                  qkv_p + (q_size + kv_size) * es, t * row, row, slots.data_ptr(), slots.scalar_type() == at::kLong,
                  b, t, kc.size(1), kv_size);
    cpu::AttentionArgs a;
    a.bf16 = bf16;
    a.q = qkv_p; a.q_sb = t * row; a.q_st = row; a.q_sh = head_dim;
    const int64_t cs = kc.size(1) * kv_size;
    a.k = kc.data_ptr(); a.k_sb = cs; a.k_st = kv_size; a.k_sh = head_dim;
    a.v = vc.data_ptr(); a.v_sb = cs; a.v_st = kv_size; a.v_sh = head_dim;
    a.out = attn.data_ptr();
    a.kv_lens = kv_lens.data_ptr<int32_t>();
    a.batch = b; a.tq = t; a.tk = kv_span; a.hq = num_heads; a.hkv = num_kv_heads; a.head_dim = head_dim;
    a.causal = true;
    a.scale = 1.f / std::sqrt(static_cast<float>(head_dim));
    cpu::attention(a);
    run_linear(L[1], bf16, attn.data_ptr(), x.data_ptr(), m);
    cpu::fused_add_rms_norm(bf16, x.data_ptr(), residual.data_ptr(), norms[l * 2 + 1]->data_ptr(), h.data_ptr(),
                            residual.data_ptr(), m, hs, eps);
    run_linear(L[2], bf16, h.data_ptr(), gate_up.data_ptr(), m);
    cpu::silu_and_mul(bf16, gate_up.data_ptr(), act.data_ptr(), m, inter);
    run_linear(L[3], bf16, act.data_ptr(), x.data_ptr(), m);
  }
  at::Tensor out = at::empty_like(hidden);
  if (layers == 0) cpu::rms_norm(bf16, hidden.data_ptr(), final_norm.data_ptr(), out.data_ptr(), m, hs, eps);
  else cpu::fused_add_rms_norm(bf16, x.data_ptr(), residual.data_ptr(), final_norm.data_ptr(), out.data_ptr(),
                               residual.data_ptr(), m, hs, eps);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llama_fast, m) {
  m.def("cpu_decode_layers(Tensor hidden, Tensor?[] weights, int[] linear_meta, Tensor(a!)[] k_caches, "
        "Tensor(b!)[] v_caches, Tensor positions, Tensor slots, Tensor kv_lens, int kv_span, Tensor cos, "
        "Tensor sin, int num_heads, int num_kv_heads, int head_dim, float eps, Tensor final_norm) -> Tensor");
}

TORCH_LIBRARY_IMPL(llama_fast, CPU, m) { m.impl("cpu_decode_layers", &decode_layers); }

}  // namespace llama_fast
