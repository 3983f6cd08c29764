// Prefill attention on tensor cores (fp16 / bf16, head_dim 64 or 128), flash-attention-2 style.
//
// Grid (row block, kv head, batch). As in attention_split_k.cu the M dimension packs a kv head's whole query
// group, row r = qi * group + g, so each K/V tile is loaded once per group. Four warps own 16 rows each; the
// block streams tiles of kBlockN keys through shared memory: S = Q K^T with mma.sync (Q fragments stay in
// registers), an online softmax on the S fragments in fp32, then O += P V with P taken from the same
// registers (see mma.cuh). Causal is bottom-right with per-sequence kv_lens: query qi sits at position
// kv_len - tq + qi.
#include <algorithm>
#include <cmath>

#include "common/softmax_math.h"
#include "cuda/cuda_utils.cuh"
#include "cuda/mma.cuh"

namespace llama_fast {
namespace cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBlockM = kWarps * 16;
constexpr int kBlockN = 64;
constexpr int kPad = 8;  // row padding (elements) that keeps the fragment loads free of bank conflicts

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) attention_prefill_kernel(AttentionArgs a) {
  constexpr int kChunks = D / 16;  // k-chunks of Q K^T
  constexpr int kScoreTiles = kBlockN / 8;
  constexpr int kOutTiles = D / 8;
  __shared__ __align__(16) T k_s[kBlockN][D + kPad];
  __shared__ __align__(16) T v_s[kBlockN][D + kPad];

  const int b = blockIdx.z, kv_head = blockIdx.y, group = a.hq / a.hkv, rows = a.tq * group;
  const int row0 = blockIdx.x * kBlockM;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  int kv_len = a.tk;
  bool bad = false;
  if (a.kv_lens != nullptr) {
    kv_len = a.kv_lens[b];
    bad = kv_len < 0 || kv_len > a.tk;
    kv_len = min(max(kv_len, 0), a.tk);
  }

  // The lane's two rows (g and g + 8 of the warp's 16): their query positions (-1 = no valid key) and Q.
  int qpos[2];
  uint32_t qf[kChunks][4];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = row0 + warp * 16 + g + 8 * h;
    const int qi = r / group, head = kv_head * group + r % group;
    qpos[h] = r < rows ? (a.causal ? kv_len - a.tq + qi : kv_len - 1) : -1;
    const T* q_row = static_cast<const T*>(a.q) + b * a.q_stride_b + qi * a.q_stride_t + head * D;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      qf[c][h] = r < rows ? load2(q_row + c * 16 + 2 * t) : 0u;
      qf[c][h + 2] = r < rows ? load2(q_row + c * 16 + 8 + 2 * t) : 0u;
    }
  }

  float o[kOutTiles][4];
#pragma unroll
  for (int n = 0; n < kOutTiles; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // l: this lane's share of the row sums

  // Keys this block needs: up to its last query's position.
  int key_end = kv_len;
  if (a.causal) key_end = min(key_end, kv_len - a.tq + min(row0 + kBlockM - 1, rows - 1) / group + 1);

  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  constexpr int kVec = Vec16<T>::kN, kVecsPerRow = D / kVec;
  for (int n0 = 0; n0 < key_end; n0 += kBlockN) {
    __syncthreads();
    for (int i = threadIdx.x; i < kBlockN * kVecsPerRow; i += kThreads) {
      const int j = i / kVecsPerRow, c = (i % kVecsPerRow) * kVec, key = n0 + j;
      uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);  // 16 bytes: kVec elements
      if (key < key_end) {
        const int64_t off = b * a.kv_stride_b + key * a.kv_stride_t + kv_head * D + c;
        kv = *reinterpret_cast<const uint4*>(k + off);
        vv = *reinterpret_cast<const uint4*>(v + off);
      }
      *reinterpret_cast<uint4*>(&k_s[j][c]) = kv;
      *reinterpret_cast<uint4*>(&v_s[j][c]) = vv;
    }
    __syncthreads();

    // S = Q K^T for the warp's 16 rows x kBlockN keys.
    float s[kScoreTiles][4];
#pragma unroll
    for (int n = 0; n < kScoreTiles; ++n) {
      s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
      for (int c = 0; c < kChunks; ++c)
        mma_16816<T>(s[n], qf[c], load2(&k_s[n * 8 + g][c * 16 + 2 * t]), load2(&k_s[n * 8 + g][c * 16 + 8 + 2 * t]));
    }

    // Online softmax over the tile; element e of tile n is row g + 8 * (e / 2), key n0 + 8n + 2t + e % 2.
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < kScoreTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = n0 + n * 8 + 2 * t + (e & 1), h = e >> 1;
        s[n][e] = key <= qpos[h] ? s[n][e] * a.scale : -INFINITY;
        tile_max[h] = fmaxf(tile_max[h], s[n][e]);
      }
    }
    float alpha[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      // The four lanes of a row (same g) hold its columns.
      tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
      tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
      const float m_new = fmaxf(m[h], tile_max[h]);
      alpha[h] = softmax::rescale(m[h], m_new);
      m[h] = m_new;
      l[h] *= alpha[h];
    }
#pragma unroll
    for (int n = 0; n < kScoreTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[n][e] = softmax::weight(s[n][e], m[e >> 1]);
        l[e >> 1] += s[n][e];
      }
    }
#pragma unroll
    for (int n = 0; n < kOutTiles; ++n) {
      o[n][0] *= alpha[0];
      o[n][1] *= alpha[0];
      o[n][2] *= alpha[1];
      o[n][3] *= alpha[1];
    }

    // O += P V: P's C fragments of key tiles 2kk, 2kk+1 form the A fragment of key chunk kk.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t pf[4];
      pf[0] = pack2(from_float<T>(s[2 * kk][0]), from_float<T>(s[2 * kk][1]));
      pf[1] = pack2(from_float<T>(s[2 * kk][2]), from_float<T>(s[2 * kk][3]));
      pf[2] = pack2(from_float<T>(s[2 * kk + 1][0]), from_float<T>(s[2 * kk + 1][1]));
      pf[3] = pack2(from_float<T>(s[2 * kk + 1][2]), from_float<T>(s[2 * kk + 1][3]));
      const int key = kk * 16 + 2 * t;
#pragma unroll
      for (int n = 0; n < kOutTiles; ++n) {
        const int d = n * 8 + g;
        mma_16816<T>(o[n], pf, pack2(v_s[key][d], v_s[key + 1][d]), pack2(v_s[key + 8][d], v_s[key + 9][d]));
      }
    }
  }

  // Normalize and store: the lane holds dims 8n + 2t, +1 of its two rows.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float sum = l[h];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const int r = row0 + warp * 16 + g + 8 * h;
    if (r >= rows) continue;
    const float inv = bad ? NAN : softmax::inverse_sum(sum);
    const int qi = r / group, head = kv_head * group + r % group;
    T* out = static_cast<T*>(a.out) + ((static_cast<int64_t>(b) * a.tq + qi) * a.hq + head) * D;
#pragma unroll
    for (int n = 0; n < kOutTiles; ++n)
      *reinterpret_cast<uint32_t*>(out + n * 8 + 2 * t) =
          pack2(from_float<T>(o[n][2 * h] * inv), from_float<T>(o[n][2 * h + 1] * inv));
  }
}

template <typename T, int D>
void launch(const AttentionArgs& a, cudaStream_t stream) {
  const int rows = a.tq * (a.hq / a.hkv);
  const dim3 grid(static_cast<unsigned>(ceil_div(rows, kBlockM)), a.hkv, a.batch);
  attention_prefill_kernel<T, D><<<grid, kThreads, 0, stream>>>(a);
}

}  // namespace

bool attention_prefers_mma(DType dt, const AttentionArgs& a) {
  // Fewer rows than one m16 tile per warp would leave the tensor cores mostly idle: split-K decode wins.
  return dt != DType::kF32 && (a.head_dim == 64 || a.head_dim == 128) && a.tq * (a.hq / a.hkv) > 16;
}

cudaError_t attention_prefill_mma(DType dt, const AttentionArgs& a, cudaStream_t stream) {
  if (a.batch == 0 || a.tq == 0) return cudaSuccess;
  if (dt == DType::kF32) return cudaErrorInvalidValue;
  if (a.head_dim != 64 && a.head_dim != 128) return cudaErrorInvalidValue;
  if (dt == DType::kF16) {
    if (a.head_dim == 64)
      launch<__half, 64>(a, stream);
    else
      launch<__half, 128>(a, stream);
  } else {
    if (a.head_dim == 64)
      launch<__nv_bfloat16, 64>(a, stream);
    else
      launch<__nv_bfloat16, 128>(a, stream);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace llama_fast
