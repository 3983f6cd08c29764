// The torch-free entry of the ggml block GEMV (kquant_linear.cpp): what the op llama_fast::kquant_linear and
// the CPU decode plan (decode_step.cpp) both call, so that the two compute the same numbers.
#pragma once
#include <cstdint>
#include <vector>

#include "common/ggml_blocks.h"

namespace llama_fast {
namespace cpu {
namespace kquant {

struct Segment {  // rows of one block type
  ggml::BlockType type;
  const uint8_t* blocks;  // [rows, K / block_weights * block_bytes]
  int64_t rows;
};

inline int64_t row_bytes(ggml::BlockType t, int64_t k) { return k / ggml::block_weights(t) * ggml::block_bytes(t); }

// Rows per parallel chunk of the GEMV kernels over one segment: one contiguous range per thread
// (one_range_per_thread, thread_pool.h), at least ~32 KiB of blocks so that a small segment stays whole on one
// thread. Each claimed chunk is a new stream whose first prefetch distance of weights arrives without software
// prefetch, and whose last one is prefetched for a chunk that another thread may claim: with 32 KiB claims over a
// 30 MB token table (SmolLM2's tied lm_head) two threads read it at 16 of 28 GB/s; chunks of 1/16 of a weight's rows
// per thread gained most of that back, one range per thread another 5-20% on SmolLM2's gate_up / down shapes
// (benchmarks/results/kquant_gemv_one_range_{before,after}_intel_amx.json).
int64_t gemv_grain(ggml::BlockType t, int64_t k, int64_t rows);

// out[m, N] (fp32, row stride N) = x[m, K] @ W^T over the segments (stacked along N); x fp32 or bf16 bits.
// Meant for decode (m up to a few rows: every row is one more pass of the arithmetic over the blocks).
void linear(bool bf16, const void* x, int64_t m, const std::vector<Segment>& segs, int64_t k, float* out);

// The prefill GEMM of gemm.cpp on ggml blocks: out[m, N] (fp32, row stride N) = x[m, K] @ W^T, each weight row
// dequantized exactly (as dequantize_rows) once per call into the GEMM's fp32 tiles and multiplied with all m
// rows in fp32. For the types gemm_supports; on ISAs with a vector GEMM (cpu::prefill_gemm_available()).
// linear() calls it from the row count where it beats the GEMV (cpu::tuning().kquant_gemm_rows). Segment lists of
// Q8_0 / Q4_K / Q5_K / Q5_0 / Q5_1 only run on the AMX GEMM instead where it is usable (gemm_amx_quant.h; linear()
// then calls it from cpu::amx_kquant_from_rows rows).
void gemm(bool bf16, const void* x, int64_t m, const std::vector<Segment>& segs, int64_t k, float* out);
bool gemm_supports(ggml::BlockType t);
// Whether linear() may hand these segments to gemm(): every type supported, and a vector GEMM in this ISA.
bool gemm_available(const std::vector<Segment>& segs);

// The block GEMVs' second software prefetch, into L2, this many times further ahead than the one into L1: a core has
// only as many misses to L1 in flight as it has fill buffers, which the L1 prefetches fill; the L2 ones keep more
// lines coming from DRAM. SmolLM2's Q8_0 token table (30 MB, lm_head) on two threads: 17 -> 19 GB/s of 28 (Xeon,
// family 6 model 167); 2x-4x measured alike.
constexpr int64_t kL2PrefetchFactor = 4;
// The 256-bit ggml block GEMVs' prefetch distances (kquant_linear_avx2.cpp, kquant_linear_fma.cpp): bytes ahead of
// the current block into L1 (fixed, where kquant_linear.cpp's VNNI GEMV takes cpu::tuning().prefetch_bytes), and
// kL2PrefetchFactor times further into L2.
constexpr int kBlockGemvPrefetchBytes = 8192;
constexpr int kBlockGemvL2PrefetchBytes = static_cast<int>(kL2PrefetchFactor) * kBlockGemvPrefetchBytes;

// The GEMV in fp32 FMAs for AVX2 cores without VNNI (kquant_linear_fma.cpp): whether linear() uses it for these
// segments (the avx2 level on a CPU without AVX512-VNNI / AVX-VNNI, every type one it has, LLAMA_FAST_FMA_GEMV not
// 0), and out[m, ldo] = x @ W^T over the segments; false (nothing written) when x holds inf / NaN.
namespace fma_gemv {
bool use_for(const std::vector<Segment>& segs);
bool linear(bool bf16, const void* x, int64_t m, const std::vector<Segment>& segs, int64_t k, float* out, int64_t ldo);
}  // namespace fma_gemv

}  // namespace kquant
}  // namespace cpu
}  // namespace llama_fast
