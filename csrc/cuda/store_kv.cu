// store_kv_: scatters this step's k/v rows into the static KV cache at per-token slots, one block per token.
#include "cuda/cuda_utils.cuh"

namespace llama_fast {
namespace cuda {
namespace {

constexpr int kThreads = 128;

template <typename T, typename Slot, bool kVectorized>
__global__ void __launch_bounds__(kThreads)
    store_kv_kernel(T* __restrict__ k_cache, T* __restrict__ v_cache, const T* __restrict__ k, const T* __restrict__ v,
                    const Slot* __restrict__ slots, int64_t t, int64_t slots_per_seq, int64_t row_elems) {
  const int64_t b = blockIdx.y, token = b * t + blockIdx.x;  // grid (t, batch): no 64-bit division
  const int64_t slot = slots[token];
  if (slot < 0 || slot >= slots_per_seq) return;  // left padding (negative); overflow is checked on the host
  const int64_t dst = (b * slots_per_seq + slot) * row_elems, src = token * row_elems;
  if constexpr (kVectorized) {  // 16-byte copies; the rows are copied bit for bit, so their type is irrelevant
    constexpr int kPerVec = 16 / sizeof(T);
    const int64_t n = row_elems / kPerVec;
    const uint4* ks = reinterpret_cast<const uint4*>(k + src);
    const uint4* vs = reinterpret_cast<const uint4*>(v + src);
    uint4* kd = reinterpret_cast<uint4*>(k_cache + dst);
    uint4* vd = reinterpret_cast<uint4*>(v_cache + dst);
#pragma unroll 1  // a row is a few hundred bytes; unrolling only spends registers
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      kd[i] = ks[i];
      vd[i] = vs[i];
    }
  } else {
    for (int64_t i = threadIdx.x; i < row_elems; i += kThreads) {
      k_cache[dst + i] = k[src + i];
      v_cache[dst + i] = v[src + i];
    }
  }
}

template <typename T, typename Slot>
void launch(void* kc, void* vc, const void* k, const void* v, const void* slots, int64_t batch, int64_t t,
            int64_t slots_per_seq, int64_t row_elems, cudaStream_t stream) {
  const bool vectorized =
      row_elems % Vec16<T>::kN == 0 && aligned16(kc) && aligned16(vc) && aligned16(k) && aligned16(v);
  const dim3 grid(static_cast<unsigned>(t), static_cast<unsigned>(batch));
  auto run = [&](auto kernel) {
    kernel<<<grid, kThreads, 0, stream>>>(static_cast<T*>(kc), static_cast<T*>(vc), static_cast<const T*>(k),
                                          static_cast<const T*>(v), static_cast<const Slot*>(slots), t, slots_per_seq,
                                          row_elems);
  };
  if (vectorized)
    run(store_kv_kernel<T, Slot, true>);
  else
    run(store_kv_kernel<T, Slot, false>);
}

}  // namespace

cudaError_t store_kv(DType dt, void* k_cache, void* v_cache, const void* k, const void* v, const void* slots,
                     bool slots_int64, int64_t batch, int64_t t, int64_t slots_per_seq, int64_t row_elems,
                     cudaStream_t stream) {
  if (batch * t == 0 || row_elems == 0) return cudaSuccess;
  LF_DISPATCH_DTYPE(dt, T, {
    if (slots_int64)
      launch<T, int64_t>(k_cache, v_cache, k, v, slots, batch, t, slots_per_seq, row_elems, stream);
    else
      launch<T, int32_t>(k_cache, v_cache, k, v, slots, batch, t, slots_per_seq, row_elems, stream);
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace llama_fast
