// Torch-free CPU kernels: raw pointers, fp32 accumulation. Activations are fp32 or bf16 (passed as uint16_t
// bit patterns, dtype told by `bf16`). Each entry point dispatches on cpu::isa() (AVX-512 / AVX2 / portable)
// and parallelizes with OpenMP over the threads torch uses (omp_get_max_threads()). Strides are in elements.
// Argument checking is the caller's job (csrc/cpu/ops_cpu.cpp does it with TORCH_CHECK).
#pragma once
#include <cstdint>

namespace llama_fast {
namespace cpu {

// Activation rows (batch x new tokens) the linear kernels take in one pass over the weights: the largest decode
// step (the CPU decode plan, incl. prefill tokens riding along, and the linear wrappers' GEMV / GEMM switch).
// Python reads it through the op llama_fast::cpu_max_gemv_rows() (csrc/cpu/ops_cpu.cpp), never a copy of the
// number.
constexpr int64_t kMaxGemvRows = 64;
// The most rows the register-blocked GEMV kernels take (all rows' accumulators of a few weight rows in
// registers: memory bound). linear.cpp and quant_linear.cpp pick them or the tiled multi-row kernel of
// cpu/row_tiles.h (compute bound) by the number of rows.
constexpr int64_t kGemvBlockRows = 8;
// The most rows the vdpbf16ps GEMV of linear.cpp takes (bf16 weights and activations, AVX512-BF16): its activation
// vectors are operands straight from L1, so 16 rows' accumulators still fit the registers.
constexpr int64_t kDpbf16GemvRows = 16;

// LF_CPU_DISPATCH_DTYPE(bf16, T, body...): runs `body` with T = uint16_t (bf16 bit patterns) when bf16 is true,
// else with T = float: the one place the kernels turn their `bool bf16` into an element type.
#define LF_CPU_DISPATCH_DTYPE(bf16, T, ...) \
  do {                                      \
    if (bf16) {                             \
      using T = uint16_t;                   \
      __VA_ARGS__;                          \
    } else {                                \
      using T = float;                      \
      __VA_ARGS__;                          \
    }                                       \
  } while (0)

// ---- normalization (rms_norm.cpp) ----------------------------------------------------------------------------
// y[r] = x[r] * rsqrt(mean(x[r]^2) + eps) * w; bf16 rounds the normalized row before the weight multiply,
// like transformers.
void rms_norm(bool bf16, const void* x, const void* w, void* y, int64_t rows, int64_t hidden, float eps);
// new_residual = x + residual (rounded to the dtype); y = rms_norm(new_residual). y may alias x and
// new_residual may alias residual (the in-place form of the residual stream).
void fused_add_rms_norm(bool bf16, const void* x, const void* residual, const void* w, void* y, void* new_residual,
                        int64_t rows, int64_t hidden, float eps);

// ---- rotary (rotary.cpp) -----------------------------------------------------------------------------------
struct Strided4 {  // a [B, T, H, D] tensor whose last dimension is contiguous
  void* data;
  int64_t sb, st, sh;  // strides of B, T, H
  int64_t heads;
};
// In place on q and k, HF rotate_half convention; positions [B, T] (int64 or int32, contiguous, in range);
// cos/sin [max_pos, D/2] fp32.
void rotary(bool bf16, Strided4 q, Strided4 k, const void* positions, bool positions_int64, const float* cos,
            const float* sin, int64_t batch, int64_t seq, int64_t head_dim);

// ---- attention (attention.cpp) -----------------------------------------------------------------------------
// How the KV cache stores keys and values: fp32, bf16 or fp16 (uint16_t bits), or symmetric int8 with one fp32
// scale per token per kv head (value = q * scale; llama_fast.cache.StaticCache with kv_cache_dtype="int8").
enum class KvType { kF32 = 0, kBF16 = 1, kF16 = 2, kI8 = 3 };
struct AttentionArgs {
  bool bf16;  // q and out: bf16, else fp32
  const void* q;
  int64_t q_sb, q_st, q_sh;  // [B, Tq, Hq, D]
  KvType kv;                 // k and v
  const void* k;
  int64_t k_sb, k_st, k_sh;  // [B, Tk, Hkv, D]
  const void* v;
  int64_t v_sb, v_st, v_sh;
  // kv == kI8: the scales, fp32 [B, Tk, Hkv] with a contiguous last dimension (strides sb, st); else nullptr.
  const float* k_scale;
  const float* v_scale;
  int64_t s_sb, s_st;
  void* out;               // [B, Tq, Hq, D] contiguous
  const int32_t* kv_lens;  // [B] or nullptr (= Tk); values in 0..Tk
  int64_t batch, tq, tk, hq, hkv, head_dim;
  bool causal;
  float scale;
};
void attention(const AttentionArgs& a);
// The one way to fill AttentionArgs: q / k / v as [B, T, H, D] views (Strided4: the head counts come from them),
// out contiguous [B, Tq, Hq, D]; k and v in the activations' dtype (see with_kv_cache for other cache types).
inline AttentionArgs attention_args(bool bf16, const Strided4& q, const Strided4& k, const Strided4& v, void* out,
                                    const int32_t* kv_lens, int64_t batch, int64_t tq, int64_t tk, int64_t head_dim,
                                    bool causal, float scale) {
  AttentionArgs a;
  a.bf16 = bf16;
  a.q = q.data, a.q_sb = q.sb, a.q_st = q.st, a.q_sh = q.sh;
  a.kv = bf16 ? KvType::kBF16 : KvType::kF32;
  a.k = k.data, a.k_sb = k.sb, a.k_st = k.st, a.k_sh = k.sh;
  a.v = v.data, a.v_sb = v.sb, a.v_st = v.st, a.v_sh = v.sh;
  a.k_scale = a.v_scale = nullptr;
  a.s_sb = a.s_st = 0;
  a.out = out;
  a.kv_lens = kv_lens;
  a.batch = batch, a.tq = tq, a.tk = tk, a.hq = q.heads, a.hkv = k.heads, a.head_dim = head_dim;
  a.causal = causal;
  a.scale = scale;
  return a;
}
// `a` reading a cache of type `kv` (int8: with its scales, strides s_sb / s_st in elements).
inline AttentionArgs with_kv_cache(AttentionArgs a, KvType kv, const float* k_scale, const float* v_scale, int64_t s_sb,
                                   int64_t s_st) {
  a.kv = kv;
  a.k_scale = k_scale, a.v_scale = v_scale;
  a.s_sb = s_sb, a.s_st = s_st;
  return a;
}

// ---- greedy choice (argmax.cpp) -----------------------------------------------------------------------------
// out[r] = the first index of the maximum of scores[r * ld .. r * ld + n - 1] (n >= 1), a NaN counting as the
// maximum: torch.argmax(scores, -1).
void argmax_rows(bool bf16, const void* scores, int64_t rows, int64_t n, int64_t ld, int64_t* out);

// ---- elementwise (silu_and_mul.cpp) --------------------------------------------------------------------------
// gate_up [rows, 2I] = [gate | up] -> out [rows, I] = silu(gate) * up.
void silu_and_mul(bool bf16, const void* gate_up, void* out, int64_t rows, int64_t inter);

// ---- dense linear (linear.cpp) ------------------------------------------------------------------------------
// out[M, N] = x[M, K] @ w[N, K]^T (+ bias[N]); x, w, bias, out share the dtype. Meant for small M (decode);
// any M works.
void dense_linear(bool bf16, const void* x, const void* w, const void* bias, void* out, int64_t m, int64_t n,
                  int64_t k);

// ---- weight-only quantized linear (quant_linear.cpp) ---------------------------------------------------------
enum class ScaleType { kF32 = 0, kF16 = 1, kBF16 = 2 };
struct QuantWeight {     // csrc/common/quant_format.h: w = q * scale + offset, per group of group_size along K
  const void* q;         // int8 [N, K] or uint8 [N, K/2]
  const void* scale;     // [N, K / group_size]
  const void* offset;    // same, or nullptr (zero)
  ScaleType scale_type;  // of scale and offset
  int bits;              // 4 or 8
  int64_t n, k, group_size;
};
// out[M, N] = x[M, K] @ dequant(w)^T (+ bias[N]), x / bias / out in the activation dtype, fp32 accumulation.
// Reads the packed weights directly (GEMV-style, all M rows per weight read). For large M the caller may
// instead dequantize tiles with dequantize_rows and use a GEMM.
void quant_linear(bool bf16, const void* x, const QuantWeight& w, const void* bias, void* out, int64_t m);
// quant_linear for any m where this CPU has a kernel that reads the weights once for all rows (the integer GEMVs:
// AVX512-VNNI, or their 256-bit form without it, cpu/vnni256.h);
// false (nothing written) where it does not, or when x holds values it cannot take (inf / NaN): then the caller
// uses quant_linear (m <= 8) or dequantize_rows and a GEMM.
bool quant_linear_any_rows(bool bf16, const void* x, const QuantWeight& w, const void* bias, void* out, int64_t m);
// rows n0..n1-1 of the dequantized weight as fp32 [n1 - n0, K], on the calling thread.
void dequantize_rows(const QuantWeight& w, int64_t n0, int64_t n1, float* out);

// ---- prefill GEMM (gemm.cpp) ---------------------------------------------------------------------------------
// out[M, N] = x[M, K] @ w[N, K]^T (+ bias[N]) for prompt-sized M (the linear wrappers use it above
// kMaxGemvRows rows): cache-blocked, each weight made fp32 once per call (bf16 widened, quantized ones
// dequantized exactly as dequantize_rows does) and multiplied with all M rows; fp32 products and sums, the
// output rounded once to the activation dtype. K >= 1.
void gemm_dense(bool bf16, const void* x, const void* w, const void* bias, void* out, int64_t m, int64_t n, int64_t k);
void gemm_quant(bool bf16, const void* x, const QuantWeight& w, const void* bias, void* out, int64_t m);
// Whether the instruction set in effect has a vector GEMM (AVX2 and above); without one the wrappers use ATen's.
bool prefill_gemm_available();

// ---- KV cache (store_kv.cpp) -----------------------------------------------------------------------------
// A layer's cache: k / v [B, S, Hkv, D] contiguous of type `type`; int8 caches also hold the fp32 scales
// k_scale / v_scale [B, S, Hkv] contiguous (nullptr otherwise).
struct KvCache {
  KvType type;
  void* k;
  void* v;
  float* k_scale;
  float* v_scale;
  int64_t len, heads, head_dim;  // S, Hkv, D
};
// cache[b, slots[b, t]] = src[b, t] for k and v; k/v [B, T, Hkv, D] (fp32, or bf16 when src_bf16) with contiguous
// rows of Hkv * D elements (strides sb, st); negative slots are skipped; slots are < S. Same type: a copy;
// bf16 / fp16: rounded to nearest even; int8: per (token, head) scale = max|x| / 127, q = round(x / scale)
// (all-zero rows: scale 0; a row holding inf / NaN: scale NaN, so attention over it is NaN as with a float cache).
void store_kv(bool src_bf16, const KvCache& cache, const void* k, int64_t k_sb, int64_t k_st, const void* v,
              int64_t v_sb, int64_t v_st, const void* slots, bool slots_int64, int64_t batch, int64_t seq);

}  // namespace cpu
}  // namespace llama_fast
