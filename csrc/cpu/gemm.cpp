// The prefill GEMM: out[M, N] = x[M, K] @ w[N, K]^T (+ bias) for prompt-sized M (and batched decode steps from
// the row counts where it beats the GEMV kernels, cpu::tuning()), with the weights dense fp32 / bf16, quantized
// (QuantWeight) or ggml blocks (kquant::Segment: the K-quants, Q5_0 / Q5_1 / Q8_0).
//
// Cache-blocked, in the usual three levels, with the sizes derived from this CPU's caches (cpu::cache_sizes()):
// - the activations are packed once per call into panels of kMr rows, [K][kMr] fp32 each (bf16 widened, exactly);
// - the weights are split over the threads in chunks of nc rows (a multiple of kNr, each thread a contiguous
//   range of chunks); a thread makes its chunk's weights fp32 once (copied, bf16 widened, or dequantized as
//   dequantize_rows does: code * scale + offset; ggml blocks a row at a time as kquant::dequantize_rows does,
//   cpu/ggml_dequant.h), reading each row from start to end, into a tile of nc x K floats
//   in half of L2 cut into K blocks of kc, while its next chunk's weights are prefetched into L2;
// - panel by panel of activations, per K block (kc x kMr floats, half of L1: the rest holds the weights streaming
//   through and the output tile), the panel's block is multiplied with the chunk's block of the tile; the panel's
//   outputs for the chunk, complete after its last K block, are then written out;
// - the micro-kernel keeps a kMr x kNr tile of the output in registers (AVX-512: 32 x 12 in 24 zmm accumulators,
//   AVX2: 16 x 6 in 12 ymm; for at most one vector of rows, a batched decode step: 16 x 24 / 8 x 12), vectors
//   along the activation rows, each weight broadcast.
// So each weight is read from memory and converted once per call whatever M, the FMAs dominate, and the products
// and sums are fp32 (each output element a sequential fp32 sum over K, blocks of kc added in order), like the
// fp32 GEMM on widened / dequantized weights that this replaces. The output is accumulated transposed ([n][m],
// contiguous vectors) and written to out[m][n] panel by panel after the last K block, with the bias, rounded once
// to the output dtype.
#ifndef LF_ISA
#include <memory>

#include "common/ggml_blocks.h"
#include "cpu/gemm_amx.h"
#include "cpu/gemm_amx_quant.h"
#include "cpu/kernels.h"
#include "cpu/kquant_linear.h"
#include "cpu/quant_scales.h"
#include "cpu/thread_pool.h"
#define LF_ISA_SELF "cpu/gemm.cpp"
#include "cpu/foreach_isa.h"

namespace llama_fast {
namespace cpu {

bool prefill_gemm_available() { return isa() >= Isa::kAvx2; }

void gemm_dense(bool bf16, const void* x, const void* w, const void* bias, void* out, int64_t m, int64_t n, int64_t k) {
  // bf16 on a CPU with AMX: the tile unit (gemm_amx.cpp), at the top ISA level only, so that tests and benchmarks
  // reach the fp32 GEMM below by lowering the level
  if (bf16 && amx_in_effect())
    return gemm_amx_bf16(static_cast<const uint16_t*>(x), static_cast<const uint16_t*>(w),
                         static_cast<const uint16_t*>(bias), static_cast<uint16_t*>(out), m, n, k);
  LF_CPU_DISPATCH_DTYPE(bf16, T, {
    LF_DISPATCH(gemm_dense_weights<T>, static_cast<const T*>(x), static_cast<const T*>(w), static_cast<const T*>(bias),
                static_cast<T*>(out), m, n, k);
  });
}

void gemm_quant(bool bf16, const void* x, const QuantWeight& w, const void* bias, void* out, int64_t m) {
  // int4 / int8 on AMX (exact in the activations: gemm_amx_quant.cpp), at the top ISA level; activations holding
  // inf / NaN, which it declines, take the fp32 GEMM below
  if (amx_quant_available(w) && gemm_amx_quant(bf16, x, w, bias, out, m)) return;
  LF_CPU_DISPATCH_DTYPE(bf16, T, {
    LF_DISPATCH(gemm_quant_weights<T>, static_cast<const T*>(x), w, static_cast<const T*>(bias), static_cast<T*>(out),
                m);
  });
}

namespace kquant {

bool gemm_supports(ggml::BlockType t) {
  using ggml::BlockType;
  switch (t) {
    case BlockType::kQ4K:
    case BlockType::kQ5K:
    case BlockType::kQ6K:
    case BlockType::kQ2K:
    case BlockType::kQ3K:
    case BlockType::kQ5_0:
    case BlockType::kQ5_1:
    case BlockType::kQ8_0: return true;
    default: return false;
  }
}

void gemm(bool bf16, const void* x, int64_t m, const std::vector<Segment>& segs, int64_t k, float* out) {
  // Q8_0 / Q4_K / Q5_K / Q5_0 / Q5_1 on AMX (gemm_amx_quant.cpp), at the top ISA level; inf / NaN activations, which
  // it declines, and the other types take the fp32 GEMM on dequantized tiles below
  if (amx_kquant_available(segs, k) && gemm_amx_kquant(bf16, x, m, segs, k, out)) return;
  LF_CPU_DISPATCH_DTYPE(bf16, T, { LF_DISPATCH(gemm_kquant_weights<T>, static_cast<const T*>(x), m, segs, k, out); });
}

}  // namespace kquant

}  // namespace cpu
}  // namespace llama_fast

#else  // one ISA pass

#include "cpu/ggml_dequant.h"

namespace llama_fast {
namespace cpu {
namespace LF_ISA {

constexpr int W = VecF::W;
// The register tile: kMv vectors of activation rows (kMr rows per panel) x kNr weight rows. Two vectors of rows
// for prompts; one for at most W rows (batched decode steps), whose second vector would multiply zeros: twice
// the weight rows instead, so that each activation load still meets as many FMAs.
template <int kMv>
constexpr int weight_rows_per_tile() {
#if LF_ISA_LEVEL == 2
  return kMv == 2 ? 12 : 24;  // 24 accumulators + 2 (1) activations + 1 broadcast of the 32 zmm registers
#elif LF_ISA_LEVEL == 1
  return kMv == 2 ? 6 : 12;  // 12 accumulators + 2 (1) + 1 of the 16 ymm registers
#else
  return 4;
#endif
}
// kMr and kNr of the tile with kMv vectors of rows, as local constants
#define LF_GEMM_TILE(kMv)                         \
  [[maybe_unused]] constexpr int kMr = (kMv) * W; \
  [[maybe_unused]] constexpr int kNr = weight_rows_per_tile<(kMv)>()

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Weights per row that the tile fill makes fp32 at a time (gemm_tiles): a multiple of every ggml block size (256)
// and of W, so that each piece is whole blocks; 24 rows of it (the AVX-512 one-vector tile) take 48 KiB. The rows
// lie kSegmentStride floats apart: one cache line more, or the same W floats of all rows (read together) would
// fall into two sets of L1 (a 2 KiB stride).
constexpr int64_t kSegment = 512, kSegmentStride = kSegment + 16;

// Scratch floats for one call: the thread's `reuse` buffer up to kKeepFloats (short prompts: no fresh pages, so no
// page faults, per call), a fresh allocation above, freed on return (a long prompt's scratch is not kept for the
// life of the thread; its page faults are small next to its arithmetic).
class Scratch {
 public:
  static constexpr int64_t kKeepFloats = int64_t{4} << 20;  // 16 MiB
  Scratch(std::vector<float>& reuse, int64_t count) {
    if (count <= kKeepFloats) {
      if (static_cast<int64_t>(reuse.size()) < count) reuse.resize(count);
      data_ = reuse.data();
    } else {
      own_.reset(new float[count]);  // uninitialized: the callers write before they read
      data_ = own_.get();
    }
  }
  float* get() const { return data_; }

 private:
  std::unique_ptr<float[]> own_;
  float* data_;
};

// c[j * ldc + i] (+)= sum_{kk < kcp} a[kk * kMr + i] * b[kk / W][j][kk % W] for j < kNr, i < kMr.
// a: a packed activation panel [kcp][kMr]; b: a packed weight strip [kcp / W][kNr][W]. `c_next`: the tile of the
// next call, fetched into L1 meanwhile (when the whole chunk's output tiles were kept across the K blocks they
// outgrew L2 on long prompts, and waiting for them from L3 cost ~15% of the time; a panel's are now kept, which fit
// L2, but the next tile still has to come into L1).
template <int kMv>
inline void micro_tile(const float* a, const float* b, int64_t kcp, float* c, int64_t ldc, bool accumulate,
                       const float* c_next) {
  LF_GEMM_TILE(kMv);
#ifdef LF_HAVE_X86
  for (int j = 0; j < kNr; ++j)
    for (int line = 0; line < kMr * int{sizeof(float)}; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(c_next + j * ldc) + line, _MM_HINT_T0);
#else
  (void)c_next;
#endif
  // The accumulators live in registers only if the loops over j and v are unrolled completely: GCC's own
  // heuristics stopped short of the 24 x 1 tile and kept it on the stack (a store after every FMA, 3x slower).
  VecF acc[kNr][kMv];
#pragma GCC unroll 32
  for (int j = 0; j < kNr; ++j)
#pragma GCC unroll 2
    for (int v = 0; v < kMv; ++v) acc[j][v] = VecF::zero();
  for (int64_t kb = 0; kb < kcp; kb += W) {
    const float* bb = b + kb * kNr;
    const float* ab = a + kb * kMr;
    for (int t = 0; t < W; ++t) {
      VecF av[kMv];
#pragma GCC unroll 2
      for (int v = 0; v < kMv; ++v) av[v] = VecF::load(ab + t * kMr + v * W);
#pragma GCC unroll 32
      for (int j = 0; j < kNr; ++j) {
        const VecF bj = VecF::set1(bb[j * W + t]);
#pragma GCC unroll 2
        for (int v = 0; v < kMv; ++v) acc[j][v] = VecF::fma(av[v], bj, acc[j][v]);
      }
    }
  }
#pragma GCC unroll 32
  for (int j = 0; j < kNr; ++j) {
#pragma GCC unroll 2
    for (int v = 0; v < kMv; ++v) {
      float* p = c + j * ldc + v * W;
      (accumulate ? acc[j][v] + VecF::load(p) : acc[j][v]).store(p);
    }
  }
}

// W elements p[0], p[ld], p[2 ld], ... as one fp32 vector (a column of a row-major matrix). bf16: each lane loads
// the 32-bit word at its element, whose low half the element is; so p[(W - 1) ld + 1] must be readable too.
inline VecF gather_column(const float* p, int64_t ld) {
#if LF_ISA_LEVEL == 2
  const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(static_cast<int>(ld)));
  return _mm512_i32gather_ps(idx, p, 4);
#elif LF_ISA_LEVEL == 1
  const __m256i idx =
      _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(static_cast<int>(ld)));
  return _mm256_i32gather_ps(p, idx, 4);
#else
  (void)ld;
  return *p;
#endif
}
inline VecF gather_column(const uint16_t* p, int64_t ld) {
#if LF_ISA_LEVEL == 2
  const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(static_cast<int>(ld)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_i32gather_epi32(idx, p, 2), 16));
#elif LF_ISA_LEVEL == 1
  const __m256i idx =
      _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(static_cast<int>(ld)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_i32gather_epi32(reinterpret_cast<const int*>(p), idx, 2), 16));
#else
  (void)ld;
  return to_f32(*p);
#endif
}

// Panels p0..p1-1 of x[m, k] as [kp][kMr] fp32 each (kp = k rounded up to W; rows past m and columns past k: 0).
template <int kMv, typename T>
void pack_activations(const T* x, int64_t m, int64_t k, int64_t kp, int64_t p0, int64_t p1, float* ap) {
  LF_GEMM_TILE(kMv);
  for (int64_t p = p0; p < p1; ++p) {
    float* dst = ap + p * kp * kMr;
    const T* src = x + p * kMr * k;
    if ((p + 1) * kMr <= m) {  // a whole panel: W rows' elements kk at a time
      // (bf16: the last element of x is read one element past by the gather, so it is done below)
      const int64_t vector_end = std::is_same<T, float>::value || (p + 1) * kMr < m ? k : k - 1;
      int64_t kk = 0;
      for (; kk + W <= k; kk += W) {  // W x W blocks transposed in registers
        for (int v = 0; v < kMv; ++v) {
          VecF block[W];
          for (int j = 0; j < W; ++j) block[j] = VecF::load(src + (v * W + j) * k + kk);
          transpose_square(block);
          for (int t = 0; t < W; ++t) block[t].store(dst + (kk + t) * kMr + v * W);
        }
      }
      for (; kk < vector_end; ++kk)
        for (int v = 0; v < kMv; ++v) gather_column(src + v * W * k + kk, k).store(dst + kk * kMr + v * W);
      for (; kk < kp; ++kk)
        for (int i = 0; i < kMr; ++i) dst[kk * kMr + i] = kk < k ? to_f32(src[i * k + kk]) : 0.f;
      continue;
    }
    for (int i = 0; i < kMr; ++i) {
      const int64_t row = p * kMr + i;
      for (int64_t kk = 0; kk < kp; ++kk) dst[kk * kMr + i] = row < m && kk < k ? to_f32(src[i * k + kk]) : 0.f;
    }
  }
}

// The weights as fp32, W elements at a time: fill(row, k0, kc, dst, stride) writes elements k0..k0+kc-1 of weight
// row `row` to dst[(kk / W) * stride + kk % W] (kk = 0..kc-1), zeros up to kc rounded up to W.
template <typename T>
struct DenseRows {
  const T* w;
  int64_t k;
  // the bytes fill(row, k0, kc, ...) reads
  const void* segment(int64_t row, int64_t k0, int64_t kc, int64_t& bytes) const {
    bytes = kc * int64_t{sizeof(T)};
    return w + row * k + k0;
  }
  void fill(int64_t row, int64_t k0, int64_t kc, float* dst, int64_t stride) const {
    const T* src = w + row * k + k0;
    int64_t kk = 0;
    for (; kk + W <= kc; kk += W) VecF::load(src + kk).store(dst + kk / W * stride);
    if (kk < kc) {
      float* d = dst + kk / W * stride;
      for (int t = 0; t < W; ++t) d[t] = kk + t < kc ? to_f32(src[kk + t]) : 0.f;
    }
  }
};

#if LF_ISA_LEVEL >= 1
// The W int8 codes at p, or the W int4 codes of the W / 2 bytes at p in element order (low nibble first), as fp32.
inline VecF int8_codes_fp32(const int8_t* p) {
#if LF_ISA_LEVEL == 2
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#endif
}
inline VecF int4_codes_fp32(const uint8_t* p) {
#if LF_ISA_LEVEL == 2
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
#else
  int32_t four;
  std::memcpy(&four, p, sizeof four);
  const __m128i b = _mm_cvtsi32_si128(four);
#endif
  const __m128i nibble = _mm_set1_epi8(15);
  const __m128i codes = _mm_unpacklo_epi8(_mm_and_si128(b, nibble), _mm_and_si128(_mm_srli_epi16(b, 4), nibble));
#if LF_ISA_LEVEL == 2
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(codes));
#else
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes));
#endif
}
#endif

struct QuantRows {
  const QuantWeight& w;
  const void* segment(int64_t row, int64_t k0, int64_t kc, int64_t& bytes) const {  // the codes fill reads
    if (w.bits == 4) {
      bytes = kc / 2 + 1;
      return static_cast<const uint8_t*>(w.q) + row * (w.k / 2) + k0 / 2;
    }
    bytes = kc;
    return static_cast<const int8_t*>(w.q) + row * w.k + k0;
  }
  void fill(int64_t row, int64_t k0, int64_t kc, float* dst, int64_t stride) const {
    const int64_t k = w.k, gs = w.group_size, groups = k / gs;
    const uint8_t* q4 = static_cast<const uint8_t*>(w.q) + row * (k / 2);
    const int8_t* q8 = static_cast<const int8_t*>(w.q) + row * k;
    for (int64_t kk = 0; kk < kc; kk += W) {
      float* d = dst + kk / W * stride;
      const int64_t e = k0 + kk;  // k0 and kk are multiples of W: with gs % W == 0 the W elements share a group
#if LF_ISA_LEVEL >= 1
      if (gs % W == 0 && kk + W <= kc) {
        const int64_t gi = row * groups + e / gs;
        const VecF s = VecF::set1(scale_at(w.scale, w.scale_type, gi));
        const VecF off = VecF::set1(w.offset ? scale_at(w.offset, w.scale_type, gi) : 0.f);
        const VecF codes = w.bits == 4 ? int4_codes_fp32(q4 + e / 2) : int8_codes_fp32(q8 + e);
        (codes * s + off).store(d);  // dequant_value: one multiply then one add, as dequantize_rows
        continue;
      }
#endif
      for (int t = 0; t < W; ++t) {
        if (kk + t >= kc) {
          d[t] = 0.f;
          continue;
        }
        const int64_t gi = row * groups + (e + t) / gs;
        const int code = w.bits == 4 ? quant::int4_code(q4, e + t) : q8[e + t];
        d[t] = quant::dequant_value(code, scale_at(w.scale, w.scale_type, gi),
                                    w.offset ? scale_at(w.offset, w.scale_type, gi) : 0.f);
      }
    }
  }
};

// ggml block rows, the segments stacked along N (kquant::Segment). fill() takes whole blocks: gemm_tiles asks for
// pieces of kSegment weights (a multiple of every block size) from a multiple of kSegment, and K is a multiple of
// the block size.
class KQuantRows {
 public:
  KQuantRows(const std::vector<kquant::Segment>& segs, int64_t k) : segs_(segs), k_(k) {
    int64_t bytes = 0;
    for (const kquant::Segment& s : segs_) n_ += s.rows, bytes += s.rows * kquant::row_bytes(s.type, k);
    bytes_per_weight_ = n_ > 0 ? static_cast<double>(bytes) / static_cast<double>(n_ * k) : 1.0;
  }
  int64_t n() const { return n_; }
  double bytes_per_weight() const { return bytes_per_weight_; }

  const void* segment(int64_t row, int64_t k0, int64_t kc, int64_t& bytes) const {
    const kquant::Segment* s = find(row);  // row: now the segment's own
    const int64_t bw = ggml::block_weights(s->type), bb = ggml::block_bytes(s->type);
    const int64_t first = k0 / bw, last = (k0 + kc + bw - 1) / bw;
    bytes = (last - first) * bb;
    return s->blocks + row * kquant::row_bytes(s->type, k_) + first * bb;
  }
  // elements k0..k0+kc-1 of row `row` to dst[0..kc) (stride == W: contiguous, all gemm_tiles asks for)
  void fill(int64_t row, int64_t k0, int64_t kc, float* dst, int64_t stride) const {
    (void)stride;
    const kquant::Segment* s = find(row);
    const int64_t bw = ggml::block_weights(s->type), bb = ggml::block_bytes(s->type);
    const uint8_t* blocks = s->blocks + row * kquant::row_bytes(s->type, k_) + k0 / bw * bb;
    dequantize_blocks(s->type, blocks, kc / bw, dst);
  }

 private:
  // the segment holding stacked row `row`, which becomes that segment's own row index
  const kquant::Segment* find(int64_t& row) const {
    for (const kquant::Segment& s : segs_) {
      if (row < s.rows) return &s;
      row -= s.rows;
    }
    return &segs_.back();  // not reached: row < n
  }
  const std::vector<kquant::Segment>& segs_;
  int64_t k_, n_ = 0;
  double bytes_per_weight_;
};

// Fetches the weights of a thread's next chunk into L2 a few lines at a time while the current chunk computes, so
// that making them fp32 does not wait on memory (with 4-byte fp32 weights that wait was ~25% of a 128-token
// prefill).
template <typename Rows>
class NextBlockPrefetch {
 public:
  NextBlockPrefetch(const Rows& rows, int64_t r0, int64_t r1, int64_t k0, int64_t kc)
      : rows_(rows), row_(r0), r1_(r1), k0_(k0), kc_(kc) {
    if (kc_ > 0) start_row();
  }
  void step(int lines) {
    for (; lines > 0 && row_ < r1_ && kc_ > 0; --lines) {
#ifdef LF_HAVE_X86
      _mm_prefetch(begin_ + offset_, _MM_HINT_T1);
#endif
      offset_ += 64;
      if (offset_ >= end_) {
        if (++row_ < r1_) start_row();
      }
    }
  }

 private:
  void start_row() {
    int64_t bytes;
    const char* p = static_cast<const char*>(rows_.segment(row_, k0_, kc_, bytes));
    begin_ = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) & ~uintptr_t{63});  // line aligned
    offset_ = 0;
    end_ = (p + bytes) - begin_;
  }
  const Rows& rows_;
  int64_t row_, r1_, k0_, kc_;
  const char* begin_ = nullptr;
  int64_t offset_ = 0, end_ = 0;
};

// The blocking of one call, from the cache sizes (see the top of the file).
struct Blocking {
  int64_t kc;      // K per block, a multiple of W
  int64_t nc;      // weight rows per chunk (one thread's unit of work), a multiple of kNr
  int64_t chunks;  // ceil(n / nc)
};

template <int kMv>
Blocking blocking(int64_t n, int64_t k) {
  LF_GEMM_TILE(kMv);
  const CacheSizes caches = cache_sizes();
  Blocking b;
  // an activation panel (kc x kMr floats) in half of L1: 192 on a 48 KiB L1, 128 on 32 KiB (AVX-512). A quarter (96
  // on the Ice Lake guest) left the micro-kernel's per-call work (the output tile loaded, added, stored) and the
  // strip switches a larger share: 1 thread, ours / torch.mm at 512 x 1536 x 576 0.67-0.69 -> 0.68-0.75, 2048 x 576
  // x 1536 0.69-0.75 -> 0.80 (alternating runs of the two builds, each against torch.mm in the same process)
  b.kc = std::max<int64_t>(W, caches.l1d / 2 / (kMr * int64_t{sizeof(float)}) / W * W);
  b.kc = std::min(b.kc, round_up(k, W));
  // a chunk's weight tile (nc x K floats, all of its K blocks) in half of L2
  const int64_t nc_cache =
      std::max<int64_t>(kNr, caches.l2 / 2 / (round_up(k, W) * int64_t{sizeof(float)}) / kNr * kNr);
  // at least one chunk per thread, and a multiple of the thread count so that they finish together
  const int64_t threads = num_threads();
  int64_t chunks = std::max((n + nc_cache - 1) / nc_cache, threads);
  chunks = round_up(chunks, threads);
  b.nc = round_up((n + chunks - 1) / chunks, kNr);
  b.chunks = (n + b.nc - 1) / b.nc;
  return b;
}

// out[i][r] = ct[r - r0][i - i0] (+ bias[r]) for i0 <= i < i1, r0 <= r < r1, rounded once to T: W outputs of a row of
// out gathered from W rows of ct at a time (ldct is no multiple of 4 KiB, so those rows do not share a cache set).
// n: the row stride of out.
template <typename T>
void write_transposed(const float* ct, int64_t ldct, int64_t i0, int64_t i1, int64_t r0, int64_t r1, const T* bias,
                      T* out, int64_t n) {
  int64_t r = r0;
  for (; r + W <= r1; r += W) {
    const float* col = ct + (r - r0) * ldct;
    const VecF b = bias != nullptr ? VecF::load(bias + r) : VecF::zero();
    int64_t i = i0;
    for (; i + W <= i1; i += W) {  // W x W blocks transposed in registers
      VecF block[W];
      for (int j = 0; j < W; ++j) block[j] = VecF::load(col + j * ldct + (i - i0));
      transpose_square(block);
      for (int t = 0; t < W; ++t) (block[t] + b).store(out + (i + t) * n + r);
    }
    for (; i < i1; ++i) (gather_column(col + (i - i0), ldct) + b).store(out + i * n + r);
  }
  for (; r < r1; ++r) {
    const float* col = ct + (r - r0) * ldct;
    const float b = bias != nullptr ? to_f32(bias[r]) : 0.f;
    for (int64_t i = i0; i < i1; ++i) out[i * n + r] = from_f32<T>(col[i - i0] + b);
  }
}

// x: the activations (T); bias and out: To (the activations' type, or fp32 for the ggml blocks' fp32 output).
template <int kMv, typename T, typename To, typename Rows>
void gemm_tiles(const T* x, int64_t m, int64_t n, int64_t k, const Rows& rows, double bytes_per_weight, const To* bias,
                To* out) {
  LF_GEMM_TILE(kMv);
  const Blocking blk = blocking<kMv>(n, k);
  const int64_t kp = round_up(k, W), panels = (m + kMr - 1) / kMr;
  // the activations packed: as large as x in fp32
  thread_local std::vector<float> apack_reuse;
  const Scratch apack(apack_reuse, panels * kp * kMr);
  float* ap = apack.get();
  parallel_for(panels, 1, [&](int64_t p0, int64_t p1) { pack_activations<kMv>(x, m, k, kp, p0, p1, ap); });
  // each thread one contiguous range of chunks, so that it knows which weights it reads next
  const int64_t per_thread = (blk.chunks + num_threads() - 1) / num_threads();
  parallel_for(blk.chunks, per_thread, [&](int64_t c0, int64_t c1) {
    // this thread's weight tile, bounded by half of L2; on a cache line boundary, so that each W floats of a row
    // (one 64-byte store on AVX-512) fill one line instead of straddling two: making the tile cost ~1.5x as much
    // time misaligned (the stores of a row are kNr * W floats apart, each one a line to fetch from L2)
    thread_local std::vector<float> tile_storage;
    tile_storage.resize(blk.nc * kp + 64 / sizeof(float));
    float* const tile =
        reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(tile_storage.data()) + 63) & ~uintptr_t{63});
    // one panel's output for this chunk, transposed [nc][ldct], complete after the panel's last K block and then
    // written out: small enough to stay in L1 / L2 across the K blocks (the whole chunk's output, kept until the last
    // K block, outgrew L2 on long prompts and came back from L3 once per K block). One cache line more than the
    // panel's rows, so that the rows of ct do not share a cache set (see write_transposed).
    const int64_t ldct = kMr + 64 / sizeof(float);
    thread_local std::vector<float> ct_storage;
    ct_storage.resize(blk.nc * ldct);
    float* const ct = ct_storage.data();
    thread_local std::vector<float> rows_fp32_storage;  // a strip's rows, kSegment elements of each
    rows_fp32_storage.resize(kNr * kSegmentStride + 64 / sizeof(float));
    float* const rows_fp32 =
        reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(rows_fp32_storage.data()) + 63) & ~uintptr_t{63});
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = c * blk.nc, r1 = std::min(n, r0 + blk.nc);
      const int64_t strips = (r1 - r0 + kNr - 1) / kNr;
      // the chunk's weights as fp32 into K blocks [block][strip][kcp / W][kNr][W]: block pc starts at
      // strips * pc * kNr (the blocks before it are full). A strip's kNr rows at a time, kSegment elements of each
      // (sequential reads; whole ggml blocks), into `rows_fp32` [kNr][kSegment], then interleaved into the tile
      // W floats of each row in turn, so that the tile's stores go to consecutive lines: each row's W floats
      // straight into the tile lie kNr * W floats apart, and those scattered stores took 5-10x as long on Zen 4.
      for (int64_t s = 0; s < strips; ++s) {
        for (int64_t seg = 0; seg < k; seg += kSegment) {
          const int64_t len = std::min(kSegment, k - seg), lenp = round_up(len, W);
          for (int j = 0; j < kNr; ++j) {
            const int64_t row = r0 + s * kNr + j;
            float* dst = rows_fp32 + j * kSegmentStride;
            if (row < r1) {
              rows.fill(row, seg, len, dst, W);
            } else {  // past the chunk: zero weights, their outputs are not written
              for (int64_t kk = 0; kk < lenp; kk += W) VecF::zero().store(dst + kk);
            }
          }
          for (int64_t kk = 0; kk < lenp; kk += W) {
            const int64_t e = seg + kk, pc = e / blk.kc * blk.kc, kcp = round_up(std::min(blk.kc, k - pc), W);
            float* dst = tile + strips * pc * kNr + s * kcp * kNr + (e - pc) * kNr;
            for (int j = 0; j < kNr; ++j) VecF::load(rows_fp32 + j * kSegmentStride + kk).store(dst + j * W);
          }
        }
      }
      // the next chunk's weights into L2 meanwhile, spread over this chunk's micro-tiles
      const int64_t next_r1 = c + 1 < c1 ? std::min(n, r1 + blk.nc) : r1;
      NextBlockPrefetch<Rows> ahead(rows, r1, next_r1, 0, k);
      const int64_t row_lines = static_cast<int64_t>(k * bytes_per_weight) / 64 + 2;
      const int64_t tiles = (k + blk.kc - 1) / blk.kc * panels * strips;
      const int lines_per_tile = static_cast<int>((next_r1 - r1) * row_lines / tiles + 1);
      for (int64_t p = 0; p < panels; ++p) {
        for (int64_t pc = 0; pc < k; pc += blk.kc) {
          const int64_t kc = std::min(blk.kc, k - pc), kcp = round_up(kc, W);
          const float* block = tile + strips * pc * kNr;
          const float* a = ap + (p * kp + pc) * kMr;
          for (int64_t s = 0; s < strips; ++s) {
            ahead.step(lines_per_tile);
            float* o = ct + s * kNr * ldct;
            micro_tile<kMv>(a, block + s * kcp * kNr, kcp, o, ldct, pc > 0, s + 1 < strips ? o + kNr * ldct : ct);
          }
        }
        write_transposed(ct, ldct, p * kMr, std::min(m, (p + 1) * kMr), r0, r1, bias, out, n);
      }
    }
  });
}

template <typename T, typename To, typename Rows>
void gemm_blocked(const T* x, int64_t m, int64_t n, int64_t k, const Rows& rows, double bytes_per_weight,
                  const To* bias, To* out) {
  if (m == 0 || n == 0) return;
  if (m <= W && W > 1)
    gemm_tiles<1>(x, m, n, k, rows, bytes_per_weight, bias, out);
  else
    gemm_tiles<2>(x, m, n, k, rows, bytes_per_weight, bias, out);
}

template <typename T>
void gemm_dense_weights(const T* x, const T* w, const T* bias, T* out, int64_t m, int64_t n, int64_t k) {
  gemm_blocked(x, m, n, k, DenseRows<T>{w, k}, sizeof(T), bias, out);
}

template <typename T>
void gemm_quant_weights(const T* x, const QuantWeight& w, const T* bias, T* out, int64_t m) {
  gemm_blocked(x, m, w.n, w.k, QuantRows{w}, w.bits / 8.0, bias, out);
}

template <typename T>
void gemm_kquant_weights(const T* x, int64_t m, const std::vector<kquant::Segment>& segs, int64_t k, float* out) {
  const KQuantRows rows(segs, k);
  gemm_blocked(x, m, rows.n(), k, rows, rows.bytes_per_weight(), static_cast<const float*>(nullptr), out);
}

#undef LF_GEMM_TILE

}  // namespace LF_ISA
}  // namespace cpu
}  // namespace llama_fast
#endif
