// Attention on CUDA cores with the keys split across blocks (flash-decoding). Used for decode (few query rows
// per kv head) and for fp32 everywhere.
//
// Grid (kv head x row block, split, batch). A block owns up to kRows query rows that all read the same kv head:
// row r = qi * group + g (query qi of head kv_head * group + g). Two kernels, by how many rows a kv head has:
// - attention_split_kernel (more than kRowsPerWarp rows: prefill in fp32, decode with a GQA group > 4): the
//   block's warps split the rows, 4 each, and one kv head's K/V tile is staged in shared memory once for all.
// - attention_split_keys_kernel (at most kRowsPerWarp rows: decode with MHA or a GQA group <= 4, e.g. Llama 2 7B
//   and Llama 3): splitting 1-4 rows over 4 warps would leave 15 of 16 row slots idle (MHA), so the warps
//   split the keys instead: each warp scores all of the block's rows against its own key tiles, read straight
//   from global memory (nothing to share), and the warps' partials merge in shared memory at the end.
// Both stream their split's keys in tiles of kTile with an online softmax (csrc/common/softmax_math.h) and write
// either the final rows (one split) or unnormalized partials (o, m, l) that attention_combine_kernel merges.
#include <algorithm>
#include <atomic>
#include <cmath>

#include "common/softmax_math.h"
#include "cuda/cuda_utils.cuh"

namespace llama_fast {
namespace cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 4;
constexpr int kRows = kWarps * kRowsPerWarp;  // query rows per block
constexpr int kTile = 32;                     // keys per shared-memory tile: one per lane when scoring
constexpr int kMinKeysPerSplit = 64;
constexpr int kMaxSplits = 64;

struct SplitPlan {
  int num_splits;
  int keys_per_split;  // a multiple of kTile (of kWarps * kTile when the warps split the keys)
  int row_blocks;
  int rows;               // tq * group
  bool warps_split_keys;  // attention_split_keys_kernel
};

// Few rows per kv head: the warps split the keys (attention_split_keys_kernel) rather than the rows.
bool warps_split_keys(const AttentionArgs& a) { return a.tq * (a.hq / a.hkv) <= kRowsPerWarp; }

SplitPlan plan(const AttentionArgs& a, int num_splits) {
  SplitPlan p;
  p.rows = a.tq * (a.hq / a.hkv);
  p.row_blocks = static_cast<int>(ceil_div(p.rows, kRows));
  p.warps_split_keys = warps_split_keys(a);
  const int64_t granule = p.warps_split_keys ? kWarps * kTile : kTile;  // every warp gets whole tiles
  const int64_t per = ceil_div(std::max(a.tk, 1), num_splits);
  p.keys_per_split = static_cast<int>(ceil_div(per, granule) * granule);
  p.num_splits = static_cast<int>(ceil_div(std::max(a.tk, 1), p.keys_per_split));
  return p;
}

// The valid key count of sequence b, and whether kv_lens[b] was out of range (then the rows become NaN).
__device__ __forceinline__ int valid_keys(const AttentionArgs& a, int b, bool* bad) {
  if (a.kv_lens == nullptr) {
    *bad = false;
    return a.tk;
  }
  const int len = a.kv_lens[b];
  *bad = len < 0 || len > a.tk;
  return min(max(len, 0), a.tk);
}

// Rows [row0, row0 + n) of the block's query rows, pre-scaled, into q_s (rows past p.rows are zero).
template <typename T, int D>
__device__ __forceinline__ void load_queries(const AttentionArgs& a, const SplitPlan& p, int b, int kv_head, int row0,
                                             int n, float (*q_s)[D]) {
  const int group = a.hq / a.hkv;
  const T* q = static_cast<const T*>(a.q);
  for (int i = threadIdx.x; i < n * D; i += kThreads) {
    const int r = row0 + i / D, d = i % D;
    float v = 0.0f;
    if (r < p.rows) {
      const int qi = r / group, head = kv_head * group + r % group;
      v = to_float(q[b * a.q_stride_b + qi * a.q_stride_t + head * D + d]) * a.scale;
    }
    q_s[i / D][d] = v;
  }
}

// A warp's online softmax over kRowsPerWarp query rows (rows first_row, first_row + 1, ...); lane owns output dims
// lane + 32c. Per key tile: fold(s) with lane j holding the scores of key tile + j, then add_value(s, j, v_j) for
// each key j of the tile with the lane's dims of its value row.
template <int D>
struct WarpRows {
  static constexpr int kPerLane = D / 32;
  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][kPerLane];
  int qpos[kRowsPerWarp];  // the position each row attends up to; -1 (no key) for rows past the end

  __device__ __forceinline__ WarpRows(const AttentionArgs& a, const SplitPlan& p, int kv_len, int first_row) {
    const int group = a.hq / a.hkv;
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      m[i] = -INFINITY;
      l[i] = 0.0f;
#pragma unroll
      for (int c = 0; c < kPerLane; ++c) acc[i][c] = 0.0f;
      const int r = first_row + i;
      qpos[i] = r < p.rows ? (a.causal ? kv_len - a.tq + r / group : kv_len - 1) : -1;
    }
  }

  // Masks key `key` (this lane's) past key_end or a row's position, updates (m, l), rescales acc and leaves in
  // s[i] the key's weight for row i.
  __device__ __forceinline__ void fold(float (&s)[kRowsPerWarp], int key, int key_end) {
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      if (key >= key_end || key > qpos[i]) s[i] = -INFINITY;
      const float m_new = fmaxf(m[i], warp_max(s[i]));
      const float alpha = softmax::rescale(m[i], m_new);
      const float prob = softmax::weight(s[i], m_new);
      l[i] = l[i] * alpha + warp_sum(prob);
      m[i] = m_new;
#pragma unroll
      for (int c = 0; c < kPerLane; ++c) acc[i][c] *= alpha;
      s[i] = prob;
    }
  }

  // acc += weight of key j (broadcast from lane j) x its value dims vj.
  __device__ __forceinline__ void add_value(const float (&s)[kRowsPerWarp], int j, const float (&vj)[kPerLane]) {
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const float pj = __shfl_sync(0xffffffffu, s[i], j);
#pragma unroll
      for (int c = 0; c < kPerLane; ++c) acc[i][c] += pj * vj[c];
    }
  }
};

// Query row r's output (one split) or its partial (several), for dim d.
template <typename T, int D>
__device__ __forceinline__ void write_row(const AttentionArgs& a, const SplitPlan& p, int b, int kv_head, int split,
                                          int r, int d, float o, float m, float l, bool bad, float* partial_o,
                                          float* partial_ml) {
  if (p.num_splits == 1) {
    const int group = a.hq / a.hkv, qi = r / group, head = kv_head * group + r % group;
    T* out = static_cast<T*>(a.out) + ((static_cast<int64_t>(b) * a.tq + qi) * a.hq + head) * D;
    out[d] = from_float<T>(bad ? NAN : o * softmax::inverse_sum(l));
  } else {
    const int64_t prow = ((static_cast<int64_t>(b) * a.hkv + kv_head) * p.rows + r) * p.num_splits + split;
    partial_o[prow * D + d] = o;
    if (d == 0) {
      partial_ml[prow * 2] = m;
      partial_ml[prow * 2 + 1] = l;
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    attention_split_kernel(AttentionArgs a, SplitPlan p, float* partial_o, float* partial_ml) {
  constexpr int kPerLane = D / 32;
  __shared__ float q_s[kRows][D];
  __shared__ float k_s[kTile][D + 1];  // +1: lane j reading row j, column d hits bank (j + d) % 32
  __shared__ float v_s[kTile][D];

  const int split = blockIdx.y, b = blockIdx.z;
  const int group = a.hq / a.hkv;
  const int kv_head = blockIdx.x / p.row_blocks, row0 = (blockIdx.x % p.row_blocks) * kRows;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  bool bad;
  const int kv_len = valid_keys(a, b, &bad);
  load_queries<T, D>(a, p, b, kv_head, row0, kRows, q_s);

  // This block's keys: its split, cut at the valid length and, when causal, at its last query's position.
  int key_end = min(kv_len, (split + 1) * p.keys_per_split);
  if (a.causal) {
    const int last_qi = min(row0 + kRows - 1, p.rows - 1) / group;
    key_end = min(key_end, kv_len - a.tq + last_qi + 1);
  }
  const int key_begin = split * p.keys_per_split;
  WarpRows<D> rows(a, p, kv_len, row0 + warp * kRowsPerWarp);

  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  constexpr int kVec = Vec16<T>::kN, kVecsPerRow = D / kVec;
  for (int tile = key_begin; tile < key_end; tile += kTile) {
    __syncthreads();  // the previous tile (and q_s on the first pass) is done with
    for (int i = threadIdx.x; i < kTile * kVecsPerRow; i += kThreads) {
      const int j = i / kVecsPerRow, c = (i % kVecsPerRow) * kVec, key = tile + j;
      Vec16<T> kv = {}, vv = {};
      if (key < key_end) {
        const int64_t off = b * a.kv_stride_b + key * a.kv_stride_t + kv_head * D + c;
        kv = *reinterpret_cast<const Vec16<T>*>(k + off);
        vv = *reinterpret_cast<const Vec16<T>*>(v + off);
      }
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        k_s[j][c + e] = to_float(kv.v[e]);
        v_s[j][c + e] = to_float(vv.v[e]);
      }
    }
    __syncthreads();

    // Scores: lane j scores key tile + j against the warp's rows.
    float s[kRowsPerWarp];
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) s[i] = 0.0f;
#pragma unroll 8
    for (int d = 0; d < D; ++d) {
      const float kd = k_s[lane][d];
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) s[i] += q_s[warp * kRowsPerWarp + i][d] * kd;
    }
    rows.fold(s, tile + lane, key_end);
    // o += P V: lane owns dims lane + 32c; the probabilities are broadcast from their lanes.
#pragma unroll 4
    for (int j = 0; j < kTile; ++j) {
      float vj[kPerLane];
#pragma unroll
      for (int c = 0; c < kPerLane; ++c) vj[c] = v_s[j][lane + 32 * c];
      rows.add_value(s, j, vj);
    }
  }

  // Write the final rows, or this split's partial.
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int r = row0 + warp * kRowsPerWarp + i;
    if (r >= p.rows) continue;
#pragma unroll
    for (int c = 0; c < kPerLane; ++c)
      write_row<T, D>(a, p, b, kv_head, split, r, lane + 32 * c, rows.acc[i][c], rows.m[i], rows.l[i], bad, partial_o,
                      partial_ml);
  }
}

// The few-rows kernel (see the top of the file): p.rows <= kRowsPerWarp, one block per (kv head, split, batch).
// Warp w takes the split's key tiles w, w + kWarps, ...; lane j scores key tile + j against every row (K read as
// 16-byte vectors of its own row), then the warp accumulates P V with lane owning dims lane + 32c (V rows read
// coalesced). The kWarps partials (m, l, o) of a row merge exactly like the splits' (softmax::merge).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    attention_split_keys_kernel(AttentionArgs a, SplitPlan p, float* partial_o, float* partial_ml) {
  constexpr int kPerLane = D / 32;
  constexpr int kVec = Vec16<T>::kN, kVecsPerRow = D / kVec;
  __shared__ float q_s[kRowsPerWarp][D];
  __shared__ float o_s[kWarps][kRowsPerWarp][D];
  __shared__ float ml_s[kWarps][kRowsPerWarp][2];

  const int kv_head = blockIdx.x, split = blockIdx.y, b = blockIdx.z;
  const int group = a.hq / a.hkv;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  bool bad;
  const int kv_len = valid_keys(a, b, &bad);
  load_queries<T, D>(a, p, b, kv_head, 0, kRowsPerWarp, q_s);
  __syncthreads();

  int key_end = min(kv_len, (split + 1) * p.keys_per_split);
  if (a.causal) key_end = min(key_end, kv_len - a.tq + (p.rows - 1) / group + 1);  // the last row's position
  const int key_begin = split * p.keys_per_split;
  WarpRows<D> rows(a, p, kv_len, 0);

  const T* k = static_cast<const T*>(a.k) + b * a.kv_stride_b + kv_head * D;
  const T* v = static_cast<const T*>(a.v) + b * a.kv_stride_b + kv_head * D;
  for (int tile = key_begin + warp * kTile; tile < key_end; tile += kWarps * kTile) {
    const int key = tile + lane;
    float s[kRowsPerWarp];
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) s[i] = 0.0f;
    if (key < key_end) {
      const T* k_row = k + static_cast<int64_t>(key) * a.kv_stride_t;
#pragma unroll 4
      for (int c = 0; c < kVecsPerRow; ++c) {
        const Vec16<T> kv = *reinterpret_cast<const Vec16<T>*>(k_row + c * kVec);
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const float kd = to_float(kv.v[e]);
#pragma unroll
          for (int i = 0; i < kRowsPerWarp; ++i) s[i] += q_s[i][c * kVec + e] * kd;  // a broadcast read
        }
      }
    }
    rows.fold(s, key, key_end);
    const int keys_here = min(kTile, key_end - tile);  // the same in every lane: the shuffles stay converged
    for (int j = 0; j < keys_here; ++j) {
      const T* v_row = v + static_cast<int64_t>(tile + j) * a.kv_stride_t;
      float vj[kPerLane];
#pragma unroll
      for (int c = 0; c < kPerLane; ++c) vj[c] = to_float(v_row[lane + 32 * c]);
      rows.add_value(s, j, vj);
    }
  }

  // Merge the warps' partials of each row, then write the final row or this split's partial.
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) o_s[warp][i][lane + 32 * c] = rows.acc[i][c];
    if (lane == 0) {
      ml_s[warp][i][0] = rows.m[i];
      ml_s[warp][i][1] = rows.l[i];
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < p.rows * D; idx += kThreads) {
    const int r = idx / D, d = idx % D;
    float m = -INFINITY, l = 0.0f, o = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      float scale_o, scale_w;
      softmax::merge(m, l, ml_s[w][r][0], ml_s[w][r][1], &scale_o, &scale_w);
      o = o * scale_o + o_s[w][r][d] * scale_w;
    }
    write_row<T, D>(a, p, b, kv_head, split, r, d, o, m, l, bad, partial_o, partial_ml);
  }
}

// One block of D threads per (row, kv head, batch): merges the splits' partials exactly.
template <typename T, int D>
__global__ void __launch_bounds__(D)
    attention_combine_kernel(AttentionArgs a, SplitPlan p, const float* partial_o, const float* partial_ml) {
  const int r = blockIdx.x, kv_head = blockIdx.y, b = blockIdx.z, d = threadIdx.x;
  const int group = a.hq / a.hkv;
  bool bad;
  valid_keys(a, b, &bad);
  const int64_t prow0 = ((static_cast<int64_t>(b) * a.hkv + kv_head) * p.rows + r) * p.num_splits;
  float m = -INFINITY, l = 0.0f, o = 0.0f;
  for (int s = 0; s < p.num_splits; ++s) {
    float scale_o, scale_s;
    softmax::merge(m, l, partial_ml[(prow0 + s) * 2], partial_ml[(prow0 + s) * 2 + 1], &scale_o, &scale_s);
    o = o * scale_o + partial_o[(prow0 + s) * D + d] * scale_s;
  }
  const int qi = r / group, head = kv_head * group + r % group;
  T* out = static_cast<T*>(a.out) + ((static_cast<int64_t>(b) * a.tq + qi) * a.hq + head) * D;
  out[d] = from_float<T>(bad ? NAN : o * softmax::inverse_sum(l));
}

template <typename T, int D>
void launch(const AttentionArgs& a, int num_splits, float* workspace, cudaStream_t stream) {
  const SplitPlan p = plan(a, num_splits);
  const int64_t partial_rows = static_cast<int64_t>(a.batch) * a.hkv * p.rows * p.num_splits;
  float* partial_o = workspace;
  float* partial_ml = workspace + partial_rows * D;
  const dim3 grid(a.hkv * p.row_blocks, p.num_splits, a.batch);
  if (p.warps_split_keys)  // p.row_blocks == 1
    attention_split_keys_kernel<T, D><<<grid, kThreads, 0, stream>>>(a, p, partial_o, partial_ml);
  else
    attention_split_kernel<T, D><<<grid, kThreads, 0, stream>>>(a, p, partial_o, partial_ml);
  if (p.num_splits > 1)
    attention_combine_kernel<T, D><<<dim3(p.rows, a.hkv, a.batch), D, 0, stream>>>(a, p, partial_o, partial_ml);
}

// The SM count of a device, queried once (called on every decode step).
int multiprocessors(int device) {
  static std::atomic<int> cached[64] = {};
  if (device < 0 || device >= 64) device = 0;
  int sms = cached[device].load(std::memory_order_relaxed);
  if (sms == 0) {
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) {
      cudaGetLastError();  // clear it: a failed query only costs a default
      sms = 108;
    }
    cached[device].store(sms, std::memory_order_relaxed);
  }
  return sms;
}

}  // namespace

int attention_num_splits(const AttentionArgs& a, int device) {
  const int sms = multiprocessors(device);
  const int64_t blocks = static_cast<int64_t>(a.batch) * a.hkv * ceil_div(a.tq * (a.hq / a.hkv), kRows);
  const int64_t want = ceil_div(2 * sms, std::max<int64_t>(blocks, 1));  // about two waves of blocks
  // A split must keep each of a few-rows block's warps busy with at least one tile.
  const int64_t min_keys = warps_split_keys(a) ? std::max(kMinKeysPerSplit, kWarps * kTile) : kMinKeysPerSplit;
  const int64_t most = std::max<int64_t>(1, a.tk / min_keys);
  const int splits = static_cast<int>(std::min<int64_t>({want, most, kMaxSplits}));
  return plan(a, std::max(splits, 1)).num_splits;
}

int64_t attention_split_workspace_floats(const AttentionArgs& a, int num_splits) {
  const SplitPlan p = plan(a, num_splits);
  if (p.num_splits == 1) return 0;
  return static_cast<int64_t>(a.batch) * a.hkv * p.rows * p.num_splits * (a.head_dim + 2);
}

cudaError_t attention_split_k(DType dt, const AttentionArgs& a, int num_splits, float* workspace, cudaStream_t stream) {
  if (a.batch == 0 || a.tq == 0) return cudaSuccess;
  LF_DISPATCH_DTYPE(dt, T, {
    if (a.head_dim == 64)
      launch<T, 64>(a, num_splits, workspace, stream);
    else if (a.head_dim == 128)
      launch<T, 128>(a, num_splits, workspace, stream);
    else
      return cudaErrorInvalidValue;
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace llama_fast
