// Flash-style attention over [B, T, H, D] tensors (prefill and decode against the KV cache), fp32 softmax.
//
// Work is split into tasks (batch b, kv head h, block of queries, block of keys). A task stacks the queries
// of the block for all G = Hq / Hkv heads sharing kv head h into R = queries x G rows, so each K/V row is
// read once for its whole query group, and streams the keys W at a time (W = SIMD width): the key block is
// transposed once into Kt[D][W] so the scores of a row are D broadcast-FMAs (no horizontal sums), then an
// online softmax (running max m, sum l, unnormalized acc) folds the block in. No T x T matrix exists.
// When there are fewer tasks than threads (decode: B x Hkv small), the keys are split into chunks (split-K)
// whose partial (m, l, acc) are merged at the end.
#ifndef LF_ISA
#include "cpu/kernels.h"
#include "cpu/thread_pool.h"
#define LF_ISA_SELF "cpu/attention.cpp"
#include "cpu/foreach_isa.h"

namespace llama_fast {
namespace cpu {
namespace {

constexpr int64_t kRowsPerTask = 32;  // query rows (queries x group) per task: fits L1 with D = 128
constexpr int64_t kFewRows = 8;       // tasks of at most this many rows (decode) take attention_task_few_rows

int64_t key_chunk_alignment() { return 16; }

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
  if (tasks < 4 * threads && kmax >= 256) {
    nsplit = std::min<int64_t>((4 * threads + tasks - 1) / tasks, kmax / 128);
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
  // Work below ~2^18 query-key-dim products (a decode step over a few hundred keys: microseconds) stays on
  // the calling thread: a fork/join costs as much, and far more when a helper thread is not running now.
  const bool small = a.tq * kmax * a.hq * D < (1 << 18);
  parallel_for(work, small ? work : 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t split = w % nsplit, task = w / nsplit;
      const int64_t q_block = task % nqb, bh = task / nqb, h = bh % a.hkv, b = bh / a.hkv;
      const int64_t i0 = q_block * qb, i1 = std::min(a.tq, i0 + qb);
      const int64_t k0 = split * chunk, k1 = std::min(kmax, k0 + chunk);
      const int64_t R = (i1 - i0) * G;
      float* p = base + w * part_stride;
      if (R <= kFewRows) {
        if (a.bf16)
          LF_DISPATCH(attention_task_few_rows<uint16_t>, a, b, h, i0, i1, k0, k1, p, p + R, p + 2 * R);
        else
          LF_DISPATCH(attention_task_few_rows<float>, a, b, h, i0, i1, k0, k1, p, p + R, p + 2 * R);
      } else if (a.bf16) {
        LF_DISPATCH(attention_task<uint16_t>, a, b, h, i0, i1, k0, k1, p, p + R, p + 2 * R);
      } else {
        LF_DISPATCH(attention_task<float>, a, b, h, i0, i1, k0, k1, p, p + R, p + 2 * R);
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

// Whether scores[0..n) hold a NaN or a +inf. The reference's softmax makes such a row NaN (+inf - max(+inf) is
// NaN); the vector exp here clamps its input, which would turn both into a finite weight, so the row's l is
// set to NaN instead and finalize writes NaN (a scalar pass over n scores; the scores cost D FMAs each).
inline bool any_nan_or_pos_inf(const float* scores, int64_t n) {
  bool bad = false;
  for (int64_t j = 0; j < n; ++j) bad |= !(scores[j] < std::numeric_limits<float>::infinity());
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

// One task: rows r = (i - i0) * G + g for queries i0..i1-1 and heads h*G+g, keys k0..k1-1. Writes the
// unnormalized online-softmax state m[R], l[R], acc[R][D].
template <typename T>
void attention_task(const AttentionArgs& a, int64_t b, int64_t h, int64_t i0, int64_t i1, int64_t k0, int64_t k1,
                    float* m, float* l, float* acc) {
  constexpr int W = VecF::W;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t G = a.hq / a.hkv, D = a.head_dim, R = (i1 - i0) * G;
  thread_local std::vector<float> qf, kt, vb;
  thread_local std::vector<int64_t> lim;
  qf.resize(R * D);
  kt.resize(D * W);
  vb.resize(W * D);
  lim.resize(R);
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  const int64_t kv_len = a.kv_lens ? a.kv_lens[b] : a.tk;
  int64_t kend = 0;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t i = i0 + r / G, head = h * G + r % G;
    const T* src = q + b * a.q_sb + i * a.q_st + head * a.q_sh;
    for (int64_t d = 0; d < D; ++d) qf[r * D + d] = to_f32(src[d]) * a.scale;
    // bottom-right causal: query i sits at position kv_len - tq + i
    lim[r] = a.causal ? std::min(kv_len, kv_len - a.tq + i + 1) : kv_len;
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
    for (int64_t j = 0; j < W; ++j) {
      if (j < jn) {
        const T* kr = k + b * a.k_sb + (j0 + j) * a.k_st + h * a.k_sh;
        const T* vr = v + b * a.v_sb + (j0 + j) * a.v_st + h * a.v_sh;
        for (int64_t d = 0; d < D; ++d) kt[d * W + j] = to_f32(kr[d]);
        for (int64_t d = 0; d < D; ++d) vb[j * D + d] = to_f32(vr[d]);
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
      for (int rr = 0; rr < rb; ++rr) {
        const int64_t r = r0 + rr;
        const int64_t n = std::min(jn, lim[r] - j0);
        if (n <= 0) continue;
        S[rr].store(sbuf);
        for (int64_t j = n; j < W; ++j) sbuf[j] = kNegInf;
        const bool poisoned = any_nan_or_pos_inf(sbuf, n);
        const VecF s = VecF::load(sbuf);
        const float m_new = std::max(m[r], s.hmax());
        if (m_new == kNegInf) {  // every valid score so far is -inf: nothing to add; see kSawOnlyNegInf
          l[r] = poisoned ? kNaN : kSawOnlyNegInf;
          continue;
        }
        const float alpha = m[r] == kNegInf ? 0.f : std::exp(m[r] - m_new);
        const VecF p = exp(s - VecF::set1(m_new));
        p.store(sbuf);
        l[r] = poisoned ? kNaN : l[r] * alpha + p.sum();
        m[r] = m_new;
        float* ar = acc + r * D;
        const VecF va = VecF::set1(alpha);
        int64_t d = 0;
        for (; d + W <= D; d += W) {
          VecF av = VecF::load(ar + d) * va;
          for (int64_t j = 0; j < n; ++j) av = VecF::fma(VecF::set1(sbuf[j]), VecF::load(vb.data() + j * D + d), av);
          av.store(ar + d);
        }
        for (; d < D; ++d) {
          float av = ar[d] * alpha;
          for (int64_t j = 0; j < n; ++j) av += sbuf[j] * vb[j * D + d];
          ar[d] = av;
        }
      }
    }
  }
}

// A task of at most kFewRows rows (decode: the G query heads of one kv head, one or two tokens). Each key
// is scored by one dot product per row over its D contiguous values (no transposed key block, which costs
// more than the few rows' FMAs), then an exact two-pass softmax over the chunk's score buffer, then P V with
// the accumulators in registers. Writes the same unnormalized (m, l, acc) as attention_task.
template <typename T>
void attention_task_few_rows(const AttentionArgs& a, int64_t b, int64_t h, int64_t i0, int64_t i1, int64_t k0,
                             int64_t k1, float* m, float* l, float* acc) {
  constexpr int W = VecF::W;
  constexpr int kRows = 8;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t G = a.hq / a.hkv, D = a.head_dim, R = (i1 - i0) * G;
  const int64_t DV = D / W * W;  // the vector part of a row
  thread_local std::vector<float> qf, sc;
  qf.resize(R * D);
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k) + b * a.k_sb + h * a.k_sh;
  const T* v = static_cast<const T*>(a.v) + b * a.v_sb + h * a.v_sh;
  const int64_t kv_len = a.kv_lens ? a.kv_lens[b] : a.tk;
  int64_t lim[kRows], kend = k0;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t i = i0 + r / G, head = h * G + r % G;
    const T* src = q + b * a.q_sb + i * a.q_st + head * a.q_sh;
    for (int64_t d = 0; d < D; ++d) qf[r * D + d] = to_f32(src[d]) * a.scale;
    // bottom-right causal: query i sits at position kv_len - tq + i
    lim[r] = std::min(k1, a.causal ? std::min(kv_len, kv_len - a.tq + i + 1) : kv_len);
    kend = std::max(kend, lim[r]);
    m[r] = kNegInf;
    l[r] = 0.f;
  }
  std::fill(acc, acc + R * D, 0.f);
  const int64_t n = kend - k0;
  if (n <= 0) return;
  sc.resize(R * n);

  // scores sc[r][j] = q_r . k_j (-inf past the row's causal limit)
  for (int64_t j = 0; j < n; ++j) {
    const T* kr = k + (k0 + j) * a.k_st;
    VecF s[kRows];
    for (int64_t r = 0; r < R; ++r) s[r] = VecF::zero();
    for (int64_t d = 0; d < DV; d += W) {
      const VecF kv = VecF::load(kr + d);
      for (int64_t r = 0; r < R; ++r) s[r] = VecF::fma(VecF::load(qf.data() + r * D + d), kv, s[r]);
    }
    for (int64_t r = 0; r < R; ++r) {
      float dot = s[r].sum();
      for (int64_t d = DV; d < D; ++d) dot += qf[r * D + d] * to_f32(kr[d]);
      sc[r * n + j] = k0 + j < lim[r] ? dot : kNegInf;
    }
  }
  // softmax numerators p = exp(s - max) in place (0 past the limit); m and l per row
  for (int64_t r = 0; r < R; ++r) {
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
  // acc[r] = sum_j p[r][j] v_j
  for (int64_t d = 0; d < DV; d += W) {
    VecF o[kRows];
    for (int64_t r = 0; r < R; ++r) o[r] = VecF::zero();
    for (int64_t j = 0; j < n; ++j) {
      const VecF vv = VecF::load(v + (k0 + j) * a.v_st + d);
      for (int64_t r = 0; r < R; ++r) o[r] = VecF::fma(VecF::set1(sc[r * n + j]), vv, o[r]);
    }
    for (int64_t r = 0; r < R; ++r) o[r].store(acc + r * D + d);
  }
  for (int64_t d = DV; d < D; ++d) {
    for (int64_t r = 0; r < R; ++r) {
      float o = 0.f;
      for (int64_t j = 0; j < n; ++j) o += sc[r * n + j] * to_f32(v[(k0 + j) * a.v_st + d]);
      acc[r * D + d] = o;
    }
  }
}

}  // namespace LF_ISA
}  // namespace cpu
}  // namespace llama_fast
#endif
