// CPU registrations of the llama_fast ops: every argument is checked here (TORCH_CHECK: device, dtype,
// shape, layout) before the torch-free kernels of csrc/cpu/*.cpp run on raw pointers. Also declares the
// CPU-only extra ops (TORCH_LIBRARY_FRAGMENT); the fake of cpu_linear lives in llama_fast/ops/cpu.py (contracts:
// docs/KERNELS.md).
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <omp.h>
#include <torch/all.h>
#include <torch/library.h>

#include "cpu/cpu_features.h"
#include "cpu/gemm_amx.h"
#include "cpu/gemm_amx_quant.h"
#include "cpu/kernels.h"
#include "cpu/thread_pool.h"
#include "cpu/torch_args.h"
#include "cpu/tuning.h"
#include "op_checks.h"

namespace llama_fast {
namespace {

using cpu::is_bf16;

void check_activation(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op, ": ", name,
              " must be float32 or bfloat16, got ", t.scalar_type());
}

// ---- norms -------------------------------------------------------------------------------------------------
void check_norm(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  check_activation(x, op, "x");
  check_activation(weight, op, "weight");
  check_same_dtype(weight, x, op, "weight");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension");
  check_contiguous(x, op, "x");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), op, ": weight must be [", x.size(-1), "], got ",
              weight.sizes());
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm(x, weight, "rms_norm");
  const auto w = weight.contiguous();
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t hidden = x.size(-1);
  cpu::rms_norm(is_bf16(x), x.data_ptr(), w.data_ptr(), y.data_ptr(), hidden ? x.numel() / hidden : 0, hidden,
                static_cast<float>(eps));
  return y;
}

void check_residual(const at::Tensor& x, const at::Tensor& residual, const char* op) {
  check_activation(residual, op, "residual");
  check_same_dtype(residual, x, op, "residual");
  TORCH_CHECK(residual.sizes() == x.sizes(), op, ": residual shape ", residual.sizes(), " differs from x shape ",
              x.sizes());
  check_contiguous(residual, op, "residual");
}

std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                      const at::Tensor& weight, double eps) {
  check_norm(x, weight, "fused_add_rms_norm");
  check_residual(x, residual, "fused_add_rms_norm");
  const auto w = weight.contiguous();
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  auto new_residual = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t hidden = x.size(-1);
  cpu::fused_add_rms_norm(is_bf16(x), x.data_ptr(), residual.data_ptr(), w.data_ptr(), y.data_ptr(),
                          new_residual.data_ptr(), hidden ? x.numel() / hidden : 0, hidden, static_cast<float>(eps));
  return {y, new_residual};
}

// ---- rotary ------------------------------------------------------------------------------------------------
void rotary_(at::Tensor& q, at::Tensor& k, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin) {
  const char* op = "rotary_";
  check_activation(q, op, "q");
  check_activation(k, op, "k");
  check_same_dtype(k, q, op, "k");
  check_bthd(q, op, "q");
  check_bthd(k, op, "k");
  const int64_t b = q.size(0), t = q.size(1), d = q.size(3);
  TORCH_CHECK(k.size(0) == b && k.size(1) == t && k.size(3) == d, op, ": k shape ", k.sizes(),
              " does not match q shape ", q.sizes(), " in B, T or D");
  TORCH_CHECK(d % 2 == 0, op, ": head_dim must be even, got ", d);
  TORCH_CHECK(positions.device().is_cpu(), op, ": positions must be a CPU tensor, got ", positions.device());
  TORCH_CHECK(positions.scalar_type() == at::kLong || positions.scalar_type() == at::kInt, op,
              ": positions must be int64 or int32, got ", positions.scalar_type());
  TORCH_CHECK(positions.dim() == 2 && positions.size(0) == b && positions.size(1) == t, op,
              ": positions must be [B, T] = [", b, ", ", t, "], got ", positions.sizes());
  for (const at::Tensor* cs : {&cos, &sin}) {
    TORCH_CHECK(cs->device().is_cpu(), op, ": cos/sin must be CPU tensors, got ", cs->device());
    TORCH_CHECK(cs->scalar_type() == at::kFloat, op, ": cos/sin must be float32, got ", cs->scalar_type());
    TORCH_CHECK(cs->dim() == 2 && cs->size(1) == d / 2, op, ": cos/sin must be [max_pos, ", d / 2, "], got ",
                cs->sizes());
  }
  TORCH_CHECK(cos.sizes() == sin.sizes(), op, ": cos shape ", cos.sizes(), " differs from sin shape ", sin.sizes());
  // In place: heads sharing memory (an expand) would be rotated once per head. (q and k are usually disjoint
  // slices of one fused qkv tensor, interleaved in memory, so they are not compared with each other.)
  TORCH_CHECK(at::has_internal_overlap(q) != at::MemOverlap::Yes && at::has_internal_overlap(k) != at::MemOverlap::Yes,
              op, ": q and k must not have elements that share memory (e.g. an expand); pass .contiguous() ones");
  const auto pos = positions.contiguous();
  const auto c = cos.contiguous(), s = sin.contiguous();
  if (pos.numel() > 0) {
    const auto [lo, hi] = at::aminmax(pos);
    TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < cos.size(0), op, ": positions must lie in [0, ",
                cos.size(0), "), got [", lo.item<int64_t>(), ", ", hi.item<int64_t>(), "]");
  }
  cpu::rotary(is_bf16(q), cpu::strided4(q), cpu::strided4(k), pos.data_ptr(), pos.scalar_type() == at::kLong,
              c.data_ptr<float>(), s.data_ptr<float>(), b, t, d);
}

// ---- attention ---------------------------------------------------------------------------------------------
constexpr int64_t kDelegatePrefillFrom = 128;  // queries

// Makes ATen code on the calling thread run on that thread only, with no OpenMP team: at::parallel_for runs
// inline when at::get_num_threads() == 1, which with ATen's OpenMP backend is omp_get_max_threads(), a
// per-thread setting (ICV) in libgomp. at::get_num_threads() is called first because ATen applies
// torch.set_num_threads to a thread's ICV lazily, on that thread's first call there, which would undo ours.
class AtenOnThisThreadOnly {
 public:
  AtenOnThisThreadOnly() : previous_(at::get_num_threads()) { omp_set_num_threads(1); }
  ~AtenOnThisThreadOnly() { omp_set_num_threads(previous_); }
  AtenOnThisThreadOnly(const AtenOnThisThreadOnly&) = delete;
  AtenOnThisThreadOnly& operator=(const AtenOnThisThreadOnly&) = delete;

 private:
  int previous_;
};

// Causal attention of q [B, T, Hq, D] over k / v [B, T, Hkv, D] (bf16, every key valid) by ATen's
// flash-attention CPU kernel, one (batch, query head) slice at a time on our thread pool. Why not one call over
// the whole tensors: ATen would fork its OpenMP team, whose threads then spin for milliseconds after the call
// (libgomp's GOMP_SPINCOUNT) on the cores that our pool needs for the next linear; nothing outside the process
// can turn that off once torch is imported. Splitting by (batch, head) keeps the result bit-identical to the
// whole-tensor call: the kernel computes every (batch, head, query block) independently, with query / key
// block sizes that depend on T and D only (tests/ops/test_attention_long.py checks the equality).
at::Tensor aten_causal_prefill(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  if (at::get_num_threads() == 1)  // ATen runs inline anyway: one call, not B x Hq smaller ones (call overhead)
    return at::scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), {}, 0.0, true,
                                            scale, /*enable_gqa=*/true)
        .transpose(1, 2)
        .contiguous();
  const int64_t b = q.size(0), t = q.size(1), hq = q.size(2), d = q.size(3);
  const int64_t group = hq / k.size(2);  // query heads per kv head
  auto out = at::empty({b, t, hq, d}, q.options());
  // The pool's helper threads start with default thread-local state (grad mode, inference mode, dispatch
  // keys); they take the caller's, as ATen's own thread pool does, so that e.g. writing into `out` made under
  // torch.inference_mode is allowed there too.
  const at::ThreadLocalState caller_state;
  const auto head = [](const at::Tensor& x, int64_t batch, int64_t h) {  // [1, 1, T, D] view
    return x.narrow(0, batch, 1).narrow(2, h, 1).transpose(1, 2);
  };
  cpu::parallel_for(b * hq, 1, [&](int64_t s0, int64_t s1) {
    at::ThreadLocalStateGuard state(caller_state);
    AtenOnThisThreadOnly single;
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t batch = s / hq, h = s % hq, kv_head = h / group;
      const auto slice = at::scaled_dot_product_attention(head(q, batch, h), head(k, batch, kv_head),
                                                          head(v, batch, kv_head), {}, 0.0, true, scale);
      head(out, batch, h).copy_(slice);
    }
  });
  return out;
}

// Whether a cache of type `kv` (k / v [B, S, Hkv, D]) is int8, checking that its scales come with it and only then:
// fp32 [B, S, Hkv] each, with the same strides.
bool check_cache_scales(cpu::KvType kv, const std::optional<at::Tensor>& k_scale,
                        const std::optional<at::Tensor>& v_scale, const at::Tensor& k, const at::Tensor& v,
                        const char* op) {
  const bool int8 = kv == cpu::KvType::kI8;
  TORCH_CHECK(
      int8 == k_scale.has_value() && int8 == v_scale.has_value(), op,
      int8 ? ": an int8 KV cache needs k_scale and v_scale" : ": k_scale / v_scale go with an int8 KV cache only");
  if (int8) {
    cpu::check_kv_scale(*k_scale, k, op, "k_scale");
    cpu::check_kv_scale(*v_scale, v, op, "v_scale");
    TORCH_CHECK(k_scale->strides() == v_scale->strides(), op, ": k_scale and v_scale must have the same strides");
  }
  return int8;
}

// q / out in fp32 or bf16; k / v as the KV cache holds them (kv_cache_dtype): fp32, bf16, fp16 or int8 with
// k_scale / v_scale [B, Tk, Hkv]. The core op `attention` keeps the contract of docs/KERNELS.md (k, v in q's
// dtype); the CPU-only `cpu_attention` reads any cache type.
at::Tensor attention_any_cache(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                               const std::optional<at::Tensor>& kv_lens, double scale,
                               const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
                               const char* op) {
  check_activation(q, op, "q");
  TORCH_CHECK(k.device().is_cpu() && v.device().is_cpu(), op, ": k and v must be CPU tensors");
  const cpu::KvType kv = cpu::kv_type(k, op);
  TORCH_CHECK(v.scalar_type() == k.scalar_type(), op, ": v dtype ", v.scalar_type(), " differs from k dtype ",
              k.scalar_type());
  check_bthd(q, op, "q");
  check_bthd(k, op, "k");
  check_bthd(v, op, "v");
  const int64_t b = q.size(0), tq = q.size(1), hq = q.size(2), d = q.size(3);
  const int64_t tk = k.size(1), hkv = k.size(2);
  TORCH_CHECK(k.size(0) == b && k.size(3) == d, op, ": k shape ", k.sizes(), " does not match q shape ", q.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v shape ", v.sizes(), " differs from k shape ", k.sizes());
  TORCH_CHECK(hkv > 0 && hq % hkv == 0, op, ": the number of query heads (", hq,
              ") must be a multiple of the number of kv heads (", hkv, ")");
  const bool int8 = check_cache_scales(kv, k_scale, v_scale, k, v, op);
  at::Tensor lens;
  if (kv_lens.has_value()) {
    lens = *kv_lens;
    TORCH_CHECK(lens.device().is_cpu(), op, ": kv_lens must be a CPU tensor, got ", lens.device());
    TORCH_CHECK(lens.scalar_type() == at::kInt || lens.scalar_type() == at::kLong, op, ": kv_lens must be int32, got ",
                lens.scalar_type());
    TORCH_CHECK(lens.dim() == 1 && lens.size(0) == b, op, ": kv_lens must be [B] = [", b, "], got ", lens.sizes());
    if (b > 0) {  // checked in the given dtype: narrowing int64 first would turn 2^32 + 2 into 2
      const auto [lo, hi] = at::aminmax(lens);
      TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() <= tk, op, ": kv_lens must lie in [0, ", tk, "], got [",
                  lo.item<int64_t>(), ", ", hi.item<int64_t>(), "]");
    }
    lens = lens.to(at::kInt).contiguous();
  }
  if (is_bf16(q) && k.scalar_type() == q.scalar_type() && causal && tq == tk && tq >= kDelegatePrefillFrom && b > 0 &&
      q.numel() > 0) {
    // bf16 prefill over full-length sequences: ATen's flash-attention CPU kernel runs its blocks on bf16
    // GEMM micro-kernels (AMX / AVX512-BF16) and is ~5x faster than our fp32-widening kernel here; it has
    // the same contract in this case (causal, every key valid, fp32 softmax) and is tiled too (no Tq x Tk
    // buffer). Everything else is ours.
    bool full = true;
    if (lens.defined()) full = lens.min().item<int>() == tk;
    if (full) return aten_causal_prefill(q, k, v, scale);
  }
  auto out = at::empty({b, tq, hq, d}, q.options());
  if (out.numel() == 0) return out;
  auto args = cpu::attention_args(is_bf16(q), cpu::strided4(q), cpu::strided4(k), cpu::strided4(v), out.data_ptr(),
                                  lens.defined() ? lens.data_ptr<int32_t>() : nullptr, b, tq, tk, d, causal,
                                  static_cast<float>(scale));
  if (int8)
    args = cpu::with_kv_cache(args, kv, k_scale->const_data_ptr<float>(), v_scale->const_data_ptr<float>(),
                              k_scale->stride(0), k_scale->stride(1));
  else
    args = cpu::with_kv_cache(args, kv, nullptr, nullptr, 0, 0);
  cpu::attention(args);
  return out;
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                     const std::optional<at::Tensor>& kv_lens, double scale) {
  const char* op = "attention";
  check_activation(k, op, "k");
  check_activation(v, op, "v");
  check_same_dtype(k, q, op, "k");
  check_same_dtype(v, q, op, "v");
  return attention_any_cache(q, k, v, causal, kv_lens, scale, std::nullopt, std::nullopt, op);
}

at::Tensor cpu_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                         const std::optional<at::Tensor>& kv_lens, double scale,
                         const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale) {
  return attention_any_cache(q, k, v, causal, kv_lens, scale, k_scale, v_scale, "cpu_attention");
}

// ---- silu_and_mul ------------------------------------------------------------------------------------------
at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  const char* op = "silu_and_mul";
  check_activation(gate_up, op, "gate_up");
  check_contiguous(gate_up, op, "gate_up");
  TORCH_CHECK(gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0, op,
              ": the last dimension of gate_up must be even ([gate | up]), got shape ", gate_up.sizes());
  auto sizes = gate_up.sizes().vec();
  const int64_t inter = sizes.back() / 2;
  sizes.back() = inter;
  auto out = at::empty(sizes, gate_up.options());
  cpu::silu_and_mul(is_bf16(gate_up), gate_up.data_ptr(), out.data_ptr(), inter ? out.numel() / inter : 0, inter);
  return out;
}

// ---- store_kv_ ---------------------------------------------------------------------------------------------
// k / v (fp32 or bf16) into a cache of any kv_cache_dtype (see cpu::store_kv); the core op store_kv_ keeps the
// contract of docs/KERNELS.md (the cache in k's dtype), the CPU-only cpu_store_kv_ converts and quantizes.
void store_kv_any_cache(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& slots, const std::optional<at::Tensor>& k_scale,
                        const std::optional<at::Tensor>& v_scale, const char* op) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&k_cache, &v_cache, &k, &v})
    TORCH_CHECK(t->device().is_cpu(), op, ": all tensors must be on the CPU, got ", t->device());
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), op,
              ": caches must be [B, S, Hkv, D] with equal shapes, got ", k_cache.sizes(), " and ", v_cache.sizes());
  check_contiguous(k_cache, op, "k_cache");
  check_contiguous(v_cache, op, "v_cache");
  check_bthd(k, op, "k");
  check_bthd(v, op, "v");
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v shape ", v.sizes(), " differs from k shape ", k.sizes());
  TORCH_CHECK(k.size(0) == k_cache.size(0) && k.size(2) == k_cache.size(2) && k.size(3) == k_cache.size(3), op,
              ": k shape ", k.sizes(), " does not match the cache shape ", k_cache.sizes(), " in B, Hkv or D");
  check_activation(k, op, "k");
  check_same_dtype(v, k, op, "v");
  const cpu::KvType type = cpu::kv_type(k_cache, op);
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), op, ": v_cache dtype ", v_cache.scalar_type(),
              " differs from k_cache dtype ", k_cache.scalar_type());
  const bool int8 = check_cache_scales(type, k_scale, v_scale, k_cache, v_cache, op);
  if (int8) {
    check_contiguous(*k_scale, op, "k_scale");
    check_contiguous(*v_scale, op, "v_scale");
  }
  for (const at::Tensor* t : {&k, &v})
    TORCH_CHECK(t->size(2) <= 1 || t->stride(2) == t->size(3), op,
                ": k and v must have contiguous [Hkv, D] rows per token, got strides ", t->strides());
  TORCH_CHECK(slots.device().is_cpu(), op, ": slots must be a CPU tensor, got ", slots.device());
  TORCH_CHECK(slots.scalar_type() == at::kLong || slots.scalar_type() == at::kInt, op,
              ": slots must be int64 or int32, got ", slots.scalar_type());
  TORCH_CHECK(slots.dim() == 2 && slots.size(0) == k.size(0) && slots.size(1) == k.size(1), op,
              ": slots must be [B, T] = [", k.size(0), ", ", k.size(1), "], got ", slots.sizes());
  const auto s = slots.contiguous();
  if (s.numel() == 0) return;
  const int64_t hi = s.max().item<int64_t>();
  TORCH_CHECK(hi < k_cache.size(1), op, ": slot ", hi, " is past the end of the cache (length ", k_cache.size(1), ")");
  const cpu::KvCache cache{type,
                           k_cache.data_ptr(),
                           v_cache.data_ptr(),
                           int8 ? k_scale->data_ptr<float>() : nullptr,
                           int8 ? v_scale->data_ptr<float>() : nullptr,
                           k_cache.size(1),
                           k_cache.size(2),
                           k_cache.size(3)};
  cpu::store_kv(is_bf16(k), cache, k.data_ptr(), k.stride(0), k.stride(1), v.data_ptr(), v.stride(0), v.stride(1),
                s.data_ptr(), s.scalar_type() == at::kLong, k.size(0), k.size(1));
}

void store_kv_(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& slots) {
  const char* op = "store_kv_";
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&v_cache, &k, &v})
    TORCH_CHECK(t->scalar_type() == k_cache.scalar_type(), op, ": dtype ", t->scalar_type(),
                " differs from the cache dtype ", k_cache.scalar_type());
  store_kv_any_cache(k_cache, v_cache, k, v, slots, std::nullopt, std::nullopt, op);
}

void cpu_store_kv_(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& slots, const std::optional<at::Tensor>& k_scale,
                   const std::optional<at::Tensor>& v_scale) {
  store_kv_any_cache(k_cache, v_cache, k, v, slots, k_scale, v_scale, "cpu_store_kv_");
}

// ---- linear ------------------------------------------------------------------------------------------------
// Up to kMaxGemvRows rows (a decode step) a linear reads its weights once for all rows (cpu::dense_linear /
// quant_linear); above (prefill), the cache-blocked GEMM of gemm.cpp, which spends fewer instructions per
// multiply and makes each weight fp32 once for all rows (ATen's GEMM on an ISA without it: portable).
using cpu::kMaxGemvRows;

void check_bias(const std::optional<at::Tensor>& bias, const at::Tensor& x, int64_t n, const char* op) {
  if (!bias.has_value()) return;
  check_activation(*bias, op, "bias");
  check_bias_shape(*bias, x, n, op);
}

// scores [B, V] fp32 / bf16 -> int64 [B]: torch.argmax(scores, -1) (first maximal index, NaN the maximum).
at::Tensor argmax(const at::Tensor& scores) {
  const char* op = "cpu_argmax";
  check_activation(scores, op, "scores");
  TORCH_CHECK(scores.dim() == 2, op, ": scores must be 2-D [B, V], got shape ", scores.sizes());
  TORCH_CHECK(scores.size(1) > 0, op, ": scores has no columns (an argmax over nothing)");
  const auto s = scores.stride(1) == 1 ? scores : scores.contiguous();
  auto out = at::empty({s.size(0)}, s.options().dtype(at::kLong));
  cpu::argmax_rows(is_bf16(s), s.data_ptr(), s.size(0), s.size(1), s.stride(0), out.data_ptr<int64_t>());
  return out;
}

at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const char* op = "cpu_linear";
  check_activation(x, op, "x");
  check_activation(weight, op, "weight");
  check_same_dtype(weight, x, op, "weight");
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [N, K], got shape ", weight.sizes());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1), op, ": x's last dimension (", x.dim() ? x.size(-1) : 0,
              ") must equal weight's K (", weight.size(1), ")");
  check_contiguous(weight, op, "weight");
  check_bias(bias, x, weight.size(0), op);
  const int64_t k = weight.size(1), n = weight.size(0);
  const int64_t m = k ? x.numel() / k : 0;
  const bool gemm = m > kMaxGemvRows;
  if (k == 0 || (gemm && !cpu::prefill_gemm_available())) return at::linear(x, weight, bias);
  const auto xc = x.contiguous();
  auto sizes = x.sizes().vec();
  sizes.back() = n;
  auto out = at::empty(sizes, x.options());
  const void* b = bias ? bias->data_ptr() : nullptr;
  if (gemm)
    cpu::gemm_dense(is_bf16(x), xc.data_ptr(), weight.data_ptr(), b, out.data_ptr(), m, n, k);
  else
    cpu::dense_linear(is_bf16(x), xc.data_ptr(), weight.data_ptr(), b, out.data_ptr(), m, n, k);
  return out;
}

// quant_linear's arguments checked (a clear error for each mistake), as the kernels' QuantWeight.
cpu::QuantWeight checked_quant_weight(const char* op, const at::Tensor& x, const at::Tensor& qweight,
                                      const at::Tensor& scale, const std::optional<at::Tensor>& offset, int64_t bits,
                                      int64_t group_size, const std::optional<at::Tensor>& bias) {
  check_activation(x, op, "x");
  TORCH_CHECK(bits == 4 || bits == 8, op, ": bits must be 4 or 8, got ", bits);
  TORCH_CHECK(qweight.device().is_cpu() && scale.device().is_cpu(), op, ": qweight and scale must be CPU tensors");
  TORCH_CHECK(qweight.dim() == 2, op, ": qweight must be 2-D, got shape ", qweight.sizes());
  TORCH_CHECK(qweight.scalar_type() == (bits == 4 ? at::kByte : at::kChar), op, ": qweight must be ",
              bits == 4 ? "uint8 (two int4 codes per byte)" : "int8", " for bits=", bits, ", got ",
              qweight.scalar_type());
  check_contiguous(qweight, op, "qweight");
  const int64_t n = qweight.size(0), k = qweight.size(1) * (bits == 4 ? 2 : 1);
  TORCH_CHECK(group_size > 0 && k % group_size == 0, op, ": group_size ", group_size, " must divide K=", k);
  const int64_t groups = k / group_size;
  const auto st = cpu::scale_type(scale, op);
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == n && scale.size(1) == groups, op, ": scale must be [", n, ", ",
              groups, "], got ", scale.sizes());
  check_contiguous(scale, op, "scale");
  if (offset.has_value()) {
    TORCH_CHECK(offset->device().is_cpu(), op, ": offset must be a CPU tensor, got ", offset->device());
    TORCH_CHECK(offset->scalar_type() == scale.scalar_type(), op, ": offset dtype ", offset->scalar_type(),
                " differs from scale dtype ", scale.scalar_type());
    TORCH_CHECK(offset->sizes() == scale.sizes(), op, ": offset shape ", offset->sizes(), " differs from scale shape ",
                scale.sizes());
    check_contiguous(*offset, op, "offset");
  }
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == k, op, ": x's last dimension (", x.dim() ? x.size(-1) : 0,
              ") must equal the weight's K (", k, ")");
  check_bias(bias, x, n, op);
  return cpu::QuantWeight{
      qweight.data_ptr(), scale.data_ptr(), offset ? offset->data_ptr() : nullptr, st, static_cast<int>(bits), n, k,
      group_size};
}

at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                        const std::optional<at::Tensor>& offset, int64_t bits, int64_t group_size,
                        const std::optional<at::Tensor>& bias) {
  const cpu::QuantWeight w = checked_quant_weight("quant_linear", x, qweight, scale, offset, bits, group_size, bias);
  const int64_t n = w.n, k = w.k;
  auto sizes = x.sizes().vec();
  sizes.back() = n;
  if (k == 0) {  // an empty sum, as F.linear defines it: zeros, plus the bias (the kernels write nothing)
    auto out = at::zeros(sizes, x.options());
    return bias.has_value() ? out.add_(*bias) : out;
  }
  const int64_t m = x.numel() / k;
  const auto xc = x.contiguous();
  if (m <= kMaxGemvRows || cpu::prefill_gemm_available()) {
    auto out = at::empty(sizes, x.options());
    const void* b = bias ? bias->data_ptr() : nullptr;
    if (out.numel() == 0) return out;
    if (m <= kMaxGemvRows)
      cpu::quant_linear(is_bf16(x), xc.data_ptr(), w, b, out.data_ptr(), m);
    else
      cpu::gemm_quant(is_bf16(x), xc.data_ptr(), w, b, out.data_ptr(), m);
    return out;
  }
  // Prefill without a vector GEMM (portable): dequantize a band of rows at a time (fits L2) and multiply with a fp32
  // GEMM. Both run on ATen's (OpenMP) threads: alternating them with our pool's, whose helpers spin between loops,
  // starves whichever side's thread is descheduled (a 42-token prefill took 2 s that way).
  const auto x2 = xc.reshape({m, k}).to(at::kFloat);
  auto out = at::empty({m, n}, x.options().dtype(at::kFloat));
  const int64_t band = std::max<int64_t>(16, (int64_t{1} << 20) / std::max<int64_t>(k, 1));
  auto tile = at::empty({std::min(band, n), k}, x.options().dtype(at::kFloat));
  for (int64_t n0 = 0; n0 < n; n0 += band) {
    const int64_t n1 = std::min(n, n0 + band);
    auto t = tile.narrow(0, 0, n1 - n0);
    float* tp = t.data_ptr<float>();
    at::parallel_for(n0, n1, 16, [&](int64_t a, int64_t b) { cpu::dequantize_rows(w, a, b, tp + (a - n0) * k); });
    out.narrow(1, n0, n1 - n0).copy_(at::mm(x2, t.t()));
  }
  if (bias.has_value()) out.add_(bias->to(at::kFloat));
  return out.to(x.scalar_type()).reshape(sizes);
}

// Test hook: quant_linear on the AMX tile GEMM (gemm_amx_quant.cpp) whatever the row count and ISA level: [out], or
// [] where it does not run (no AMX, LLAMA_FAST_AMX=0, a format it does not take, or x holding inf / NaN), so that
// tests reach the kernel itself rather than through the dispatch's thresholds.
std::vector<at::Tensor> cpu_quant_linear_amx(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                                             const std::optional<at::Tensor>& offset, int64_t bits, int64_t group_size,
                                             const std::optional<at::Tensor>& bias) {
  const cpu::QuantWeight w =
      checked_quant_weight("cpu_quant_linear_amx", x, qweight, scale, offset, bits, group_size, bias);
  if (!cpu::amx_bf16_available() || !cpu::amx_quant_supports(w) || w.k == 0) return {};
  auto sizes = x.sizes().vec();
  sizes.back() = w.n;
  auto out = at::empty(sizes, x.options());
  const auto xc = x.contiguous();
  if (!cpu::gemm_amx_quant(is_bf16(x), xc.data_ptr(), w, bias ? bias->data_ptr() : nullptr, out.data_ptr(),
                           x.numel() / w.k))
    return {};
  return {out};
}

// Test hook: lowers (never raises above the hardware) the instruction set the kernels use; returns the one in
// effect. Equivalent to LLAMA_FAST_CPU_ISA, but switchable within one process.
std::string set_isa(const std::string& name) {
  if (!name.empty()) cpu::set_isa(name.c_str());
  return cpu::isa_name(cpu::isa());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llama_fast, m) {
  // Dense x @ weight^T (+ bias): the decode kernels up to cpu_max_gemv_rows() rows, the prefill GEMM beyond.
  m.def("cpu_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // Greedy decoding's choice: torch.argmax(scores, -1) for scores [B, V] fp32 / bf16, without ATen's OpenMP team.
  m.def("cpu_argmax(Tensor scores) -> Tensor");
  // The most activation rows the GEMV kernels (and so a CPU decode step) take: cpu::kMaxGemvRows.
  m.def("cpu_max_gemv_rows() -> int", []() -> int64_t { return cpu::kMaxGemvRows; });
  // attention / store_kv_ over a KV cache of any kv_cache_dtype: k/v caches fp32, bf16, fp16, or int8 with
  // fp32 scales [B, S, Hkv] (llama_fast.cache.StaticCache; the reference: llama_fast/ops/reference.py).
  m.def(
      "cpu_attention(Tensor q, Tensor k, Tensor v, bool causal, Tensor? kv_lens, float scale, Tensor? k_scale, "
      "Tensor? v_scale) -> Tensor");
  m.def(
      "cpu_store_kv_(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor slots, Tensor(c!)? k_scale, "
      "Tensor(d!)? v_scale) -> ()");
  // cpu_isa("avx2") forces a lower instruction set for the CPU kernels (tests); cpu_isa("") reports it.
  m.def("cpu_isa(str name) -> str", &set_isa);
  // quant_linear forced onto the AMX tile GEMM (tests): [out], or [] where that kernel does not run.
  m.def(
      "cpu_quant_linear_amx(Tensor x, Tensor qweight, Tensor scale, Tensor? offset, int bits, int group_size, "
      "Tensor? bias) -> Tensor[]");
  // [L1d, L2, L3 bytes, prefetch distance, GEMM-from rows of int4, int8, ggml super-blocks, ggml blocks of 32 at
  // the ISA in effect, prefetch on huge pages (0 / 1)] of cpu::tuning() and cpu::quant_gemm_from_rows: the
  // machine-dependent choices, for the benchmarks' records next to the CPU model.
  m.def("cpu_tuning() -> int[]", []() -> std::vector<int64_t> {
    const auto& t = cpu::tuning();
    return {t.l1d_bytes,
            t.l2_bytes,
            t.l3_bytes,
            t.prefetch_bytes,
            cpu::quant_gemm_from_rows(cpu::QuantGemm::kInt4),
            cpu::quant_gemm_from_rows(cpu::QuantGemm::kInt8),
            cpu::quant_gemm_from_rows(cpu::QuantGemm::kGgmlSuper),
            cpu::quant_gemm_from_rows(cpu::QuantGemm::kGgmlBlock32),
            t.prefetch_on_huge_pages ? 1 : 0,
            t.int4_prefetch_into_l2 ? 1 : 0};
  });
  // From how many activation rows a bf16 dense linear runs the AMX GEMM (cpu::amx_bf16_from_rows), 0 where it never
  // does (no AMX, or a lower ISA level in effect).
  m.def("cpu_amx_bf16_rows() -> int", []() -> int64_t { return cpu::amx_in_effect() ? cpu::amx_bf16_from_rows() : 0; });
  // The same for the quantized AMX GEMM (gemm_amx_quant.cpp): [int4 / int8 with fp32 activations, with bf16
  // activations (cpu::amx_quant_from_rows), ggml blocks of 32, ggml super-blocks (cpu::amx_kquant_from_rows)], all 0
  // where it never runs.
  m.def("cpu_amx_quant_rows() -> int[]", []() -> std::vector<int64_t> {
    if (!cpu::amx_in_effect()) return {0, 0, 0, 0};
    return {cpu::amx_quant_from_rows(false), cpu::amx_quant_from_rows(true), cpu::amx_kquant_from_rows(false),
            cpu::amx_kquant_from_rows(true)};
  });
  // A weight buffer on transparent huge pages (llama_fast/weight_arena.py), for the dense GEMVs' prefetch choice
  // (cpu/tuning.h); add=False forgets it.
  m.def("cpu_huge_page_range(int address, int bytes, bool add) -> ()", [](int64_t address, int64_t bytes, bool add) {
    cpu::set_huge_page_range(reinterpret_cast<const void*>(static_cast<uintptr_t>(address)), bytes, add);
  });
  // The software prefetch distance the dense GEMVs use for weights at `address` (tests).
  m.def("cpu_dense_prefetch_bytes(int address) -> int", [](int64_t address) -> int64_t {
    return cpu::dense_prefetch_bytes(reinterpret_cast<const void*>(static_cast<uintptr_t>(address)));
  });
  // [helper threads started, helpers blocked] of the CPU kernels' thread pool (tests: idle helpers block).
  m.def("cpu_pool_state() -> int[]", []() -> std::vector<int64_t> {
    const auto s = cpu::pool_state();
    return {s.helpers, s.sleeping};
  });
}

TORCH_LIBRARY_IMPL(llama_fast, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm);
  m.impl("rotary_", &rotary_);
  m.impl("attention", &attention);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("quant_linear", &quant_linear);
  m.impl("store_kv_", &store_kv_);
  m.impl("cpu_linear", &dense_linear);
  m.impl("cpu_argmax", &argmax);
  m.impl("cpu_attention", &cpu_attention);
  m.impl("cpu_store_kv_", &cpu_store_kv_);
  m.impl("cpu_quant_linear_amx", &cpu_quant_linear_amx);
}

}  // namespace llama_fast
