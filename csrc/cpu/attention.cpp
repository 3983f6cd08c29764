// Flash-style attention over [B, T, H, D] tensors (prefill and decode against the KV cache), fp32 softmax.
//
// Work is split into tasks (batch b, kv head h, block of queries, block of keys). A task stacks the queries
// of the block for all G = Hq / Hkv heads sharing kv head h into R = queries x G rows, so each K/V row is
// read once for its whole query group, and streams the keys W at a time (W = SIMD width): the key block is
// transposed once into Kt[D][W] so the scores of a row are D broadcast-FMAs (no horizontal sums), then an
// online softmax (running max m, sum l, unnormalized acc) folds the block in. No T x T matrix exists.
// When there are fewer tasks than threads (decode: B x Hkv small), the keys are split into chunks (split-K)
// whose partial (m, l, acc) are merged at the end; the chunk count makes the work a multiple of the threads.
//
// Keys and values are read as the cache stores them (AttentionArgs::kv): fp32, bf16, fp16 or int8 with a
// per-(token, head) scale. The int8 scales are applied per key, not per element: a key's score is
// scale_k * (q . k_int8) and a value enters as (p * scale_v) * v_int8, so the inner loops only widen the bytes.
#ifndef LF_ISA
#include "common/fp16_bits.h"
#include "cpu/kernels.h"
#include "cpu/thread_pool.h"
#define LF_ISA_SELF "cpu/attention.cpp"
#include "cpu/foreach_isa.h"

namespace llama_fast {
namespace cpu {
namespace {

constexpr int64_t kRowsPerTask = 32;  // query rows (queries x group) per task: fits L1 with D = 128
constexpr int64_t kFewRows = 8;       // tasks of at most this many rows (decode) take attention_task_few_rows
// Split-K chunks have at least this many keys. A decode step reads its cache from memory (the layers' weights
// streamed since its last visit evict it), so even a few hundred keys are worth both threads: SmolLM2 (3 kv heads)
// at ~150 keys, fp32 cache, 2 threads on the Intel Xeon, took 570-585 us of attention per step on the calling
// thread alone (chunks of 128 keys and 2^18 products before splitting) and 420-445 us split (Q4_1 decode profile).
constexpr int64_t kMinSplitKeys = 64;

int64_t key_chunk_alignment() { return 16; }

// The kernels' template parameter: bit 2 = q / out in bf16, bits 0-1 = the cache's KvType.
int task_mode(const AttentionArgs& a) { return (a.bf16 ? 4 : 0) | static_cast<int>(a.kv); }

// One work item: the state (m, l, acc) of rows [i0, i1) x group of kv head h over keys [k0, k1) into p.
template <int Mode>
void run_task(const AttentionArgs& a, int64_t R, int64_t b, int64_t h, int64_t i0, int64_t i1, int64_t k0, int64_t k1,
              float* p) {
  if (R <= kFewRows)
    LF_DISPATCH(attention_task_few_rows<Mode>, a, b, h, i0, i1, k0, k1, p, p + R, p + 2 * R);
  else
    LF_DISPATCH(attention_task<Mode>, a, b, h, i0, i1, k0, k1, p, p + R, p + 2 * R);
}

template <typename T>
void finalize(const AttentionArgs& a, int64_t b, int64_t h, int64_t i0, int64_t i1, int64_t nsplit, const float* part,
              int64_t part_stride) {
  const int64_t G = a.hq / a.hkv, D = a.head_dim, R = (i1 - i0) * G;
  T* out = static_cast<T*>(a.out);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t i = i0 + r / G, head = h * G + r % G;
    T* dst = out + ((b * a.tq + i) * a.hq + head) * D;
    // part layout per split: m[R], l[R], acc[R][D]
    float mmax = -std::numeric_limits<float>::infinity();
    bool nan = false;  // a NaN score or value anywhere makes the row NaN, as the reference's softmax does
    bool only_neg_inf = false;
    for (int64_t s = 0; s < nsplit; ++s) {
      const float* p = part + s * part_stride;
      mmax = std::max(mmax, p[r]);  // std::max drops a NaN operand: NaNs are caught by `nan` instead
      nan = nan || std::isnan(p[r]) || std::isnan(p[R + r]);
      only_neg_inf = only_neg_inf || (p[R + r] == 0.f && std::signbit(p[R + r]));
    }
    // Valid keys whose scores are all -inf: the reference's softmax gives NaN (-inf - -inf); a row with no
    // valid key at all (left padding) keeps its zeros.
    if (nan || (only_neg_inf && mmax == -std::numeric_limits<float>::infinity())) {
      for (int64_t d = 0; d < D; ++d) {
        if constexpr (std::is_same<T, float>::value)
          dst[d] = std::numeric_limits<float>::quiet_NaN();
        else
          dst[d] = float_to_bf16_bits(std::numeric_limits<float>::quiet_NaN());
      }
      continue;
    }
    float l = 0.f;
    float acc[1024];
    float* accp = D <= 1024 ? acc : nullptr;
    std::vector<float> big;
    if (accp == nullptr) {
      big.assign(D, 0.f);
      accp = big.data();
    }
    for (int64_t d = 0; d < D; ++d) accp[d] = 0.f;
    if (mmax != -std::numeric_limits<float>::infinity()) {
      for (int64_t s = 0; s < nsplit; ++s) {
        const float* p = part + s * part_stride;
        if (p[R + r] == 0.f) continue;
        const float w = std::exp(p[r] - mmax);
        l += p[R + r] * w;
        const float* pa = p + 2 * R + r * D;
        for (int64_t d = 0; d < D; ++d) accp[d] += pa[d] * w;
      }
    }
    // A row with no valid key gives zeros (l == 0); otherwise 1/l, which keeps a NaN or inf in l visible.
    const float inv = l == 0.f ? 0.f : 1.f / l;
    for (int64_t d = 0; d < D; ++d) {
      if constexpr (std::is_same<T, float>::value)
        dst[d] = accp[d] * inv;
      else
        dst[d] = float_to_bf16_bits(accp[d] * inv);
    }
  }
}

}  // namespace

void attention(const AttentionArgs& a) {
  const int64_t G = a.hq / a.hkv, D = a.head_dim;
  const int64_t qb = std::max<int64_t>(1, kRowsPerTask / G);  // queries per task
  const int64_t nqb = (a.tq + qb - 1) / qb;
  const int64_t tasks = a.batch * a.hkv * nqb;
  int64_t kmax = a.tk;
  if (a.kv_lens != nullptr) {
    kmax = 0;
    for (int64_t b = 0; b < a.batch; ++b) kmax = std::max<int64_t>(kmax, a.kv_lens[b]);
  }
  const int64_t threads = num_threads();
  int64_t nsplit = 1;
  if (tasks < 4 * threads && kmax >= 2 * kMinSplitKeys) {
    // At least 4 work items per thread, and a multiple of the threads (9 equal items on 2 threads leave one
    // thread idle for the last ninth), with chunks of at least kMinSplitKeys keys.
    const int64_t max_split = std::max<int64_t>(1, kmax / kMinSplitKeys);
    nsplit = std::min<int64_t>((4 * threads + tasks - 1) / tasks, max_split);
    while (nsplit < max_split && (tasks * nsplit) % threads != 0) ++nsplit;
    nsplit = std::max<int64_t>(nsplit, 1);
  }
  int64_t chunk = (kmax + nsplit - 1) / nsplit;
  chunk = (chunk + key_chunk_alignment() - 1) / key_chunk_alignment() * key_chunk_alignment();
  const int64_t rows = qb * G;
  const int64_t part_stride = rows * (D + 2);
  thread_local std::vector<float> parts;
  parts.resize(static_cast<size_t>(tasks * nsplit * part_stride));
  float* base = parts.data();

  const int64_t work = tasks * nsplit;
  // Work below ~2^16 query-key-dim products (a decode step over a few dozen keys: a few microseconds) stays on
  // the calling thread: a fork/join would cost as much. Over all rows of the batch: counted per row, a batch-8
  // decode step's attention (SmolLM2, ~50 cached keys, 24 tasks of ~3 us, most of it waiting on cache lines) ran on
  // one thread, 2.6 ms of a 24 ms fp32 step.
  const bool small = a.batch * a.tq * kmax * a.hq * D < (1 << 16);
  const int mode = task_mode(a);
  parallel_for(work, small ? work : 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t split = w % nsplit, task = w / nsplit;
      const int64_t q_block = task % nqb, bh = task / nqb, h = bh % a.hkv, b = bh / a.hkv;
      const int64_t i0 = q_block * qb, i1 = std::min(a.tq, i0 + qb);
      const int64_t k0 = split * chunk, k1 = std::min(kmax, k0 + chunk);
      const int64_t R = (i1 - i0) * G;
      float* p = base + w * part_stride;
      switch (mode) {
        case 0: run_task<0>(a, R, b, h, i0, i1, k0, k1, p); break;
        case 1: run_task<1>(a, R, b, h, i0, i1, k0, k1, p); break;
        case 2: run_task<2>(a, R, b, h, i0, i1, k0, k1, p); break;
        case 3: run_task<3>(a, R, b, h, i0, i1, k0, k1, p); break;
        case 4: run_task<4>(a, R, b, h, i0, i1, k0, k1, p); break;
        case 5: run_task<5>(a, R, b, h, i0, i1, k0, k1, p); break;
        case 6: run_task<6>(a, R, b, h, i0, i1, k0, k1, p); break;
        default: run_task<7>(a, R, b, h, i0, i1, k0, k1, p); break;
      }
    }
  });
  // Each task's splits have the same row count R, stored with stride part_stride (m, l, acc at R-offsets).
  parallel_for(tasks, a.tq * a.hq * D >= 65536 ? 1 : tasks, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t q_block = task % nqb, bh = task / nqb, h = bh % a.hkv, b = bh / a.hkv;
      const int64_t i0 = q_block * qb, i1 = std::min(a.tq, i0 + qb);
      const float* p = base + task * nsplit * part_stride;
      if (a.bf16)
        finalize<uint16_t>(a, b, h, i0, i1, nsplit, p, part_stride);
      else
        finalize<float>(a, b, h, i0, i1, nsplit, p, part_stride);
    }
  });
}

}  // namespace cpu
}  // namespace llama_fast

#else  // one ISA pass

namespace llama_fast {
namespace cpu {
namespace LF_ISA {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
// The l of a row that had valid keys in a task but only -inf scores: -0, which sums like 0 but lets finalize
// tell it from a row without valid keys (+0).
constexpr float kSawOnlyNegInf = -0.f;

// ---- reading the cache's element types (Mode bits 0-1: KvType) ---------------------------------------------
constexpr int kKvF32 = static_cast<int>(KvType::kF32), kKvBF16 = static_cast<int>(KvType::kBF16),
              kKvF16 = static_cast<int>(KvType::kF16), kKvI8 = static_cast<int>(KvType::kI8);

template <int KV>
constexpr int64_t kv_bytes() {
  return KV == kKvF32 ? 4 : KV == kKvI8 ? 1 : 2;
}

// Element i of a cache row as fp32 (an int8 element unscaled).
template <int KV>
inline float kv_at(const char* row, int64_t i) {
  if constexpr (KV == kKvF32) return reinterpret_cast<const float*>(row)[i];
  if constexpr (KV == kKvBF16) return bf16_bits_to_float(reinterpret_cast<const uint16_t*>(row)[i]);
  if constexpr (KV == kKvF16) return half_bits_to_float(reinterpret_cast<const uint16_t*>(row)[i]);
  return static_cast<float>(reinterpret_cast<const int8_t*>(row)[i]);
}

// W elements of a cache row from element i as fp32 (int8 unscaled).
template <int KV>
inline VecF kv_load(const char* row, int64_t i) {
  if constexpr (KV == kKvF32) return VecF::load(reinterpret_cast<const float*>(row) + i);
  if constexpr (KV == kKvBF16) return VecF::load(reinterpret_cast<const uint16_t*>(row) + i);
#if LF_ISA_LEVEL == 2
  if constexpr (KV == kKvF16)
    return VecF(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2 * i))));
  return VecF(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + i)))));
#elif LF_ISA_LEVEL == 1
  if constexpr (KV == kKvF16)
    return VecF(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * i))));
  return VecF(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + i)))));
#else
  return VecF(kv_at<KV>(row, i));
#endif
}

#if LF_ISA_LEVEL == 2
// [pair sums of a's lanes | pair sums of b's lanes]: AVX-512 has no hadd_ps.
inline __m512 hadd(__m512 a, __m512 b) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  return _mm512_add_ps(_mm512_permutex2var_ps(a, even, b), _mm512_permutex2var_ps(a, odd, b));
}
#endif

// Keys ahead of the one being read that the few-rows kernels prefetch. A kv head's rows are Hkv x D elements
// apart, so a task walks memory with a stride the hardware prefetchers follow poorly (at 8 kv heads x 64 fp32 a
// row of 256 bytes every 2 KiB); asking for each row's lines a fixed number of keys ahead keeps enough misses
// in flight whatever the stride and core.
constexpr int64_t kPrefetchKeys = 16;

// The cache lines of one cache row of `bytes` bytes (prefetch for reading, into all levels).
inline void prefetch_row(const char* row, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(row + off, 0, 3);
}

// v[0..W) -> one vector whose lane j is the sum of v[j]'s lanes (W dot products finished at once, instead of
// W horizontal sums).
inline VecF lane_sums(const VecF* v) {
#if LF_ISA_LEVEL == 2
  // hadd(a, b) = [pair sums of a | pair sums of b]; four rounds pair up 16 vectors into one, lanes in order.
  __m512 x[8], y[4], z[2];
  for (int i = 0; i < 8; ++i) x[i] = hadd(v[2 * i].v, v[2 * i + 1].v);
  for (int i = 0; i < 4; ++i) y[i] = hadd(x[2 * i], x[2 * i + 1]);
  for (int i = 0; i < 2; ++i) z[i] = hadd(y[2 * i], y[2 * i + 1]);
  return VecF(hadd(z[0], z[1]));
#elif LF_ISA_LEVEL == 1
  // _mm256_hadd_ps works within 128-bit halves; after two rounds each half holds 4 partial sums of 4 vectors.
  const __m256 q0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0].v, v[1].v), _mm256_hadd_ps(v[2].v, v[3].v));
  const __m256 q1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4].v, v[5].v), _mm256_hadd_ps(v[6].v, v[7].v));
  return VecF(_mm256_add_ps(_mm256_permute2f128_ps(q0, q1, 0x20), _mm256_permute2f128_ps(q0, q1, 0x31)));
#else
  return v[0];
#endif
}

// Whether scores[0..n) hold a NaN or a +inf. The reference's softmax makes such a row NaN (+inf - max(+inf) is
// NaN); the vector exp here clamps its input, which would turn both into a finite weight, so the row's l is
// set to NaN instead and finalize writes NaN. A whole vector of scores is tested with one compare (the scalar pass
// over a prefill block's 16 scores was ~7% of the prefill attention's time on the Ice Lake guest).
inline bool any_nan_or_pos_inf(const float* scores, int64_t n) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
#if LF_ISA_LEVEL == 2
  if (n == 16) return _mm512_cmp_ps_mask(_mm512_loadu_ps(scores), _mm512_set1_ps(kInf), _CMP_NLT_UQ) != 0;
#elif LF_ISA_LEVEL == 1
  if (n == 8) return _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(scores), _mm256_set1_ps(kInf), _CMP_NLT_UQ)) != 0;
#endif
  bool bad = false;
  for (int64_t j = 0; j < n; ++j) bad |= !(scores[j] < kInf);  // NaN or +inf: not below +inf
  return bad;
}

// Scores of RB rows (queries pre-scaled, fp32 [RB][D]) against one transposed key block Kt[D][W]: two
// accumulators per row so the FMA chains overlap.
template <int RB>
inline void block_scores(const float* qf, int64_t D, const float* kt, VecF* out) {
  constexpr int W = VecF::W;
  VecF a0[RB], a1[RB];
  for (int r = 0; r < RB; ++r) a0[r] = a1[r] = VecF::zero();
  int64_t d = 0;
  for (; d + 2 <= D; d += 2) {
    const VecF k0 = VecF::load(kt + d * W), k1 = VecF::load(kt + (d + 1) * W);
    for (int r = 0; r < RB; ++r) {
      a0[r] = VecF::fma(VecF::set1(qf[r * D + d]), k0, a0[r]);
      a1[r] = VecF::fma(VecF::set1(qf[r * D + d + 1]), k1, a1[r]);
    }
  }
  if (d < D) {
    const VecF k0 = VecF::load(kt + d * W);
    for (int r = 0; r < RB; ++r) a0[r] = VecF::fma(VecF::set1(qf[r * D + d]), k0, a0[r]);
  }
  for (int r = 0; r < RB; ++r) out[r] = a0[r] + a1[r];
}

// The queries of rows r = (i - i0) * G + g (query i, head h*G+g) as fp32 times the softmax scale, and each
// row's key limit (bottom-right causal: query i sits at position kv_len - tq + i), capped at k1.
template <typename TQ>
void load_queries(const AttentionArgs& a, int64_t b, int64_t h, int64_t i0, int64_t R, int64_t k1, float* qf,
                  int64_t* lim) {
  const int64_t G = a.hq / a.hkv, D = a.head_dim;
  const int64_t kv_len = a.kv_lens ? a.kv_lens[b] : a.tk;
  const TQ* q = static_cast<const TQ*>(a.q);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t i = i0 + r / G, head = h * G + r % G;
    const TQ* src = q + b * a.q_sb + i * a.q_st + head * a.q_sh;
    for (int64_t d = 0; d < D; ++d) qf[r * D + d] = to_f32(src[d]) * a.scale;
    lim[r] = std::min(k1, a.causal ? std::min(kv_len, kv_len - a.tq + i + 1) : kv_len);
  }
}

// One task: rows r = (i - i0) * G + g for queries i0..i1-1 and heads h*G+g, keys k0..k1-1. Writes the
// unnormalized online-softmax state m[R], l[R], acc[R][D]. Mode: see task_mode.
template <int Mode>
void attention_task(const AttentionArgs& a, int64_t b, int64_t h, int64_t i0, int64_t i1, int64_t k0, int64_t k1,
                    float* m, float* l, float* acc) {
  using TQ = std::conditional_t<(Mode & 4) != 0, uint16_t, float>;
  constexpr int KV = Mode & 3;
  constexpr int W = VecF::W;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t G = a.hq / a.hkv, D = a.head_dim, R = (i1 - i0) * G;
  thread_local std::vector<float> qf, kt, vb;
  thread_local std::vector<int64_t> lim;
  qf.resize(R * D);
  kt.resize(D * W);
  vb.resize(W * D);
  lim.resize(R);
  const char* k = static_cast<const char*>(a.k) + (b * a.k_sb + h * a.k_sh) * kv_bytes<KV>();
  const char* v = static_cast<const char*>(a.v) + (b * a.v_sb + h * a.v_sh) * kv_bytes<KV>();
  const int64_t scale_base = b * a.s_sb + h;
  load_queries<TQ>(a, b, h, i0, R, a.tk, qf.data(), lim.data());
  int64_t kend = 0;
  for (int64_t r = 0; r < R; ++r) {
    kend = std::max(kend, lim[r]);
    m[r] = kNegInf;
    l[r] = 0.f;
  }
  std::fill(acc, acc + R * D, 0.f);
  kend = std::min(kend, k1);
  alignas(64) float sbuf[W];
  VecF S[4];
  for (int64_t j0 = k0; j0 < kend; j0 += W) {
    const int64_t jn = std::min<int64_t>(W, kend - j0);
    const bool whole_block = jn == W && D % W == 0;
    if (whole_block) {  // W keys x W dimensions at a time, transposed in registers
      for (int64_t d0 = 0; d0 < D; d0 += W) {
        VecF block[W];
        for (int64_t j = 0; j < W; ++j) {
          const char* kr = k + (j0 + j) * a.k_st * kv_bytes<KV>();
          const char* vr = v + (j0 + j) * a.v_st * kv_bytes<KV>();
          // int8: the key's scale is applied to each element here (the same single product as below)
          const float ks = KV == kKvI8 ? a.k_scale[scale_base + (j0 + j) * a.s_st] : 1.f;
          const float vs = KV == kKvI8 ? a.v_scale[scale_base + (j0 + j) * a.s_st] : 1.f;
          block[j] = KV == kKvI8 ? kv_load<KV>(kr, d0) * VecF::set1(ks) : kv_load<KV>(kr, d0);
          (KV == kKvI8 ? kv_load<KV>(vr, d0) * VecF::set1(vs) : kv_load<KV>(vr, d0)).store(vb.data() + j * D + d0);
        }
        transpose_square(block);
        for (int64_t d = 0; d < W; ++d) block[d].store(kt.data() + (d0 + d) * W);
      }
    }
    for (int64_t j = 0; j < W && !whole_block; ++j) {  // element by element
      if (j < jn) {
        const char* kr = k + (j0 + j) * a.k_st * kv_bytes<KV>();
        const char* vr = v + (j0 + j) * a.v_st * kv_bytes<KV>();
        // int8: the key's scale is applied to each element here (the prefill kernel transposes the block anyway)
        const float ks = KV == kKvI8 ? a.k_scale[scale_base + (j0 + j) * a.s_st] : 1.f;
        const float vs = KV == kKvI8 ? a.v_scale[scale_base + (j0 + j) * a.s_st] : 1.f;
        for (int64_t d = 0; d < D; ++d) kt[d * W + j] = kv_at<KV>(kr, d) * ks;
        for (int64_t d = 0; d < D; ++d) vb[j * D + d] = kv_at<KV>(vr, d) * vs;
      } else {
        for (int64_t d = 0; d < D; ++d) kt[d * W + j] = 0.f;
        for (int64_t d = 0; d < D; ++d) vb[j * D + d] = 0.f;
      }
    }
    for (int64_t r0 = 0; r0 < R; r0 += 4) {
      const int rb = static_cast<int>(std::min<int64_t>(4, R - r0));
      if (lim[r0 + rb - 1] <= j0 && lim[r0] <= j0) continue;  // rows are in query order: none valid here
      switch (rb) {
        case 4: block_scores<4>(qf.data() + r0 * D, D, kt.data(), S); break;
        case 3: block_scores<3>(qf.data() + r0 * D, D, kt.data(), S); break;
        case 2: block_scores<2>(qf.data() + r0 * D, D, kt.data(), S); break;
        default: block_scores<1>(qf.data() + r0 * D, D, kt.data(), S); break;
      }
      // the online softmax of each row; then p @ V for the rows
      alignas(64) float p_rows[4][W];
      float alpha_rows[4];
      int64_t n_rows[4];
      bool joint = rb == 4;  // four rows, each with all W keys of the block valid: their p @ V together
      for (int rr = 0; rr < rb; ++rr) {
        const int64_t r = r0 + rr;
        const int64_t n = std::min(jn, lim[r] - j0);
        n_rows[rr] = 0;
        if (n <= 0) {
          joint = false;
          continue;
        }
        S[rr].store(sbuf);
        for (int64_t j = n; j < W; ++j) sbuf[j] = kNegInf;
        const bool poisoned = any_nan_or_pos_inf(sbuf, n);
        const VecF s = VecF::load(sbuf);
        const float m_new = std::max(m[r], s.hmax());
        if (m_new == kNegInf) {  // every valid score so far is -inf: nothing to add; see kSawOnlyNegInf
          l[r] = poisoned ? kNaN : kSawOnlyNegInf;
          joint = false;
          continue;
        }
        const float alpha = m[r] == kNegInf ? 0.f : std::exp(m[r] - m_new);
        const VecF p = exp(s - VecF::set1(m_new));
        p.store(p_rows[rr]);
        l[r] = poisoned ? kNaN : l[r] * alpha + p.sum();
        m[r] = m_new;
        alpha_rows[rr] = alpha;
        n_rows[rr] = n;
        joint = joint && n == W;
      }
      // Each row's sums in the same order either way (acc * alpha, then the keys in order), so the joint pass only
      // saves loads: each value vector is read once for the four rows instead of once per row (the per-row loop
      // loads a value vector and a broadcast per FMA, which held it to about one FMA per cycle).
      int64_t d_end = 0;
      if (joint) {
        for (; d_end + W <= D; d_end += W) {
          VecF av[4];
          for (int rr = 0; rr < 4; ++rr) av[rr] = VecF::load(acc + (r0 + rr) * D + d_end) * VecF::set1(alpha_rows[rr]);
          for (int64_t j = 0; j < W; ++j) {
            const VecF vj = VecF::load(vb.data() + j * D + d_end);
            for (int rr = 0; rr < 4; ++rr) av[rr] = VecF::fma(VecF::set1(p_rows[rr][j]), vj, av[rr]);
          }
          for (int rr = 0; rr < 4; ++rr) av[rr].store(acc + (r0 + rr) * D + d_end);
        }
      }
      for (int rr = 0; rr < rb; ++rr) {
        const int64_t n = n_rows[rr];
        if (n <= 0) continue;
        float* ar = acc + (r0 + rr) * D;
        const float alpha = alpha_rows[rr];
        const float* pr = p_rows[rr];
        const VecF va = VecF::set1(alpha);
        int64_t d = d_end;
        for (; d + W <= D; d += W) {
          VecF av = VecF::load(ar + d) * va;
          for (int64_t j = 0; j < n; ++j) av = VecF::fma(VecF::set1(pr[j]), VecF::load(vb.data() + j * D + d), av);
          av.store(ar + d);
        }
        for (; d < D; ++d) {
          float av = ar[d] * alpha;
          for (int64_t j = 0; j < n; ++j) av += pr[j] * vb[j * D + d];
          ar[d] = av;
        }
      }
    }
  }
}

// Scores sc[r][j] = q_r . k_(k0+j) (times the key's int8 scale) for j < n, W keys at a time: each key's dot
// products are D/W FMAs per row into one vector, and lane_sums finishes W keys' sums together. The tail of a
// D that is not a multiple of W is added per key afterwards.
template <int KV, int R>
void few_rows_scores(const AttentionArgs& a, const char* k, const float* kscale, const float* qf, int64_t k0, int64_t n,
                     int64_t stride, float* sc) {
  constexpr int W = VecF::W;
  const int64_t D = a.head_dim, DV = D / W * W, row_bytes = a.k_st * kv_bytes<KV>();
  const int64_t d_bytes = D * kv_bytes<KV>();
  alignas(64) float tmp[W];
  VecF part[R][W];
  for (int64_t j0 = 0; j0 < n; j0 += W) {
    const int64_t jn = std::min<int64_t>(W, n - j0);
    for (int64_t jj = 0; jj < W; ++jj) {
      VecF s[R];
      for (int r = 0; r < R; ++r) s[r] = VecF::zero();
      if (jj < jn) {
        const char* kr = k + (k0 + j0 + jj) * row_bytes;
        if (j0 + jj + kPrefetchKeys < n) prefetch_row(kr + kPrefetchKeys * row_bytes, d_bytes);
        for (int64_t d = 0; d < DV; d += W) {
          const VecF kv = kv_load<KV>(kr, d);
          for (int r = 0; r < R; ++r) s[r] = VecF::fma(VecF::load(qf + r * D + d), kv, s[r]);
        }
      }
      for (int r = 0; r < R; ++r) part[r][jj] = s[r];
    }
    for (int r = 0; r < R; ++r) {
      lane_sums(part[r]).store(tmp);
      for (int64_t jj = 0; jj < jn; ++jj) sc[r * stride + j0 + jj] = tmp[jj];
    }
  }
  if (DV < D) {
    for (int64_t j = 0; j < n; ++j) {
      const char* kr = k + (k0 + j) * row_bytes;
      for (int r = 0; r < R; ++r) {
        float t = 0.f;
        for (int64_t d = DV; d < D; ++d) t += qf[r * D + d] * kv_at<KV>(kr, d);
        sc[r * stride + j] += t;
      }
    }
  }
  if constexpr (KV == kKvI8)
    for (int64_t j = 0; j < n; ++j) {
      const float ks = kscale[(k0 + j) * a.s_st];
      for (int r = 0; r < R; ++r) sc[r * stride + j] *= ks;
    }
}

// acc[r] = sum_j p[r][j] v_(k0+j) for j < n, with p already times the value's int8 scale. Keys outer, a block of
// up to NV vectors of each row's accumulator in registers, so each value row is read once per block.
template <int KV, int R>
void few_rows_values(const AttentionArgs& a, const char* v, const float* p, int64_t k0, int64_t n, int64_t stride,
                     float* acc) {
  constexpr int W = VecF::W;
  constexpr int kRegs = W == 16 ? 32 : 16;
  constexpr int NV = std::max(1, std::min(4, (kRegs - 4) / R));
  const int64_t D = a.head_dim, DV = D / W * W, row_bytes = a.v_st * kv_bytes<KV>();
  const int64_t d_bytes = D * kv_bytes<KV>();
  for (int64_t d0 = 0; d0 < DV; d0 += NV * W) {
    const int nv = static_cast<int>(std::min<int64_t>(NV, (DV - d0) / W));
    VecF o[R][NV];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < NV; ++c) o[r][c] = VecF::zero();
    for (int64_t j = 0; j < n; ++j) {
      const char* vr = v + (k0 + j) * row_bytes;
      if (d0 == 0 && j + kPrefetchKeys < n) prefetch_row(vr + kPrefetchKeys * row_bytes, d_bytes);
      VecF vv[NV];
      for (int c = 0; c < NV; ++c)
        if (c < nv) vv[c] = kv_load<KV>(vr, d0 + c * W);
      for (int r = 0; r < R; ++r) {
        const VecF pr = VecF::set1(p[r * stride + j]);
        for (int c = 0; c < NV; ++c)
          if (c < nv) o[r][c] = VecF::fma(pr, vv[c], o[r][c]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < nv; ++c) o[r][c].store(acc + r * D + d0 + c * W);
  }
  for (int64_t d = DV; d < D; ++d)
    for (int r = 0; r < R; ++r) {
      float o = 0.f;
      for (int64_t j = 0; j < n; ++j) o += p[r * stride + j] * kv_at<KV>(v + (k0 + j) * row_bytes, d);
      acc[r * D + d] = o;
    }
}

// A task of at most kFewRows rows (decode: the G query heads of one kv head, one or two tokens): the chunk's
// scores into a buffer (few_rows_scores), an exact two-pass softmax over it, then P V (few_rows_values). Writes
// the same unnormalized (m, l, acc) as attention_task. R is a template parameter so that the rows' accumulators
// live in registers.
template <int KV, int R>
void few_rows(const AttentionArgs& a, int64_t b, int64_t h, const float* qf, const int64_t* lim, int64_t k0,
              int64_t kend, float* m, float* l, float* acc) {
  constexpr int W = VecF::W;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t D = a.head_dim;
  std::fill(acc, acc + R * D, 0.f);
  const int64_t n = kend - k0;
  if (n <= 0) return;
  thread_local std::vector<float> sc;
  sc.resize(R * n);
  const char* k = static_cast<const char*>(a.k) + (b * a.k_sb + h * a.k_sh) * kv_bytes<KV>();
  const char* v = static_cast<const char*>(a.v) + (b * a.v_sb + h * a.v_sh) * kv_bytes<KV>();
  const int64_t scale_base = b * a.s_sb + h;
  few_rows_scores<KV, R>(a, k, KV == kKvI8 ? a.k_scale + scale_base : nullptr, qf, k0, n, n, sc.data());
  // softmax numerators p = exp(s - max) in place (0 past the row's causal limit); m and l per row
  for (int r = 0; r < R; ++r) {
    float* sr = sc.data() + r * n;
    const int64_t nr = std::max<int64_t>(0, lim[r] - k0);
    if (nr == 0) {
      std::fill(sr, sr + n, 0.f);
      continue;
    }
    const bool poisoned = any_nan_or_pos_inf(sr, nr);
    float mx = kNegInf;
    for (int64_t j = 0; j < nr; ++j) mx = std::max(mx, sr[j]);
    if (mx == kNegInf) {  // every valid score is -inf (or NaN): weights 0, and the row marked for finalize
      std::fill(sr, sr + n, 0.f);
      m[r] = kNegInf;
      l[r] = poisoned ? kNaN : kSawOnlyNegInf;
      continue;
    }
    const VecF vmx = VecF::set1(mx);
    VecF vsum = VecF::zero();
    int64_t j = 0;
    for (; j + W <= nr; j += W) {
      const VecF p = exp(VecF::load(sr + j) - vmx);
      p.store(sr + j);
      vsum = vsum + p;
    }
    float sum = vsum.sum();
    for (; j < nr; ++j) {
      sr[j] = std::exp(sr[j] - mx);
      sum += sr[j];
    }
    std::fill(sr + nr, sr + n, 0.f);
    m[r] = mx;
    l[r] = poisoned ? kNaN : sum;
  }
  if constexpr (KV == kKvI8) {  // the values' scales go into the weights (l keeps the unscaled sum)
    const float* vscale = a.v_scale + scale_base;
    for (int64_t j = 0; j < n; ++j) {
      const float vs = vscale[(k0 + j) * a.s_st];
      for (int r = 0; r < R; ++r) sc[r * n + j] *= vs;
    }
  }
  few_rows_values<KV, R>(a, v, sc.data(), k0, n, n, acc);
}

template <int Mode>
void attention_task_few_rows(const AttentionArgs& a, int64_t b, int64_t h, int64_t i0, int64_t i1, int64_t k0,
                             int64_t k1, float* m, float* l, float* acc) {
  using TQ = std::conditional_t<(Mode & 4) != 0, uint16_t, float>;
  constexpr int KV = Mode & 3;
  constexpr int kRows = 8;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t G = a.hq / a.hkv, D = a.head_dim, R = (i1 - i0) * G;
  thread_local std::vector<float> qf;
  qf.resize(R * D);
  int64_t lim[kRows], kend = k0;
  load_queries<TQ>(a, b, h, i0, R, k1, qf.data(), lim);
  for (int64_t r = 0; r < R; ++r) {
    kend = std::max(kend, lim[r]);
    m[r] = kNegInf;
    l[r] = 0.f;
  }
  switch (R) {
    case 1: few_rows<KV, 1>(a, b, h, qf.data(), lim, k0, kend, m, l, acc); break;
    case 2: few_rows<KV, 2>(a, b, h, qf.data(), lim, k0, kend, m, l, acc); break;
    case 3: few_rows<KV, 3>(a, b, h, qf.data(), lim, k0, kend, m, l, acc); break;
    case 4: few_rows<KV, 4>(a, b, h, qf.data(), lim, k0, kend, m, l, acc); break;
    case 5: few_rows<KV, 5>(a, b, h, qf.data(), lim, k0, kend, m, l, acc); break;
    case 6: few_rows<KV, 6>(a, b, h, qf.data(), lim, k0, kend, m, l, acc); break;
    case 7: few_rows<KV, 7>(a, b, h, qf.data(), lim, k0, kend, m, l, acc); break;
    default: few_rows<KV, 8>(a, b, h, qf.data(), lim, k0, kend, m, l, acc); break;
  }
}

}  // namespace LF_ISA
}  // namespace cpu
}  // namespace llama_fast
#endif
