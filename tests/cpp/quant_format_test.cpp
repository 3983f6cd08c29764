// Torch-free driver for csrc/common/quant_format.h, run by tests/test_quant_format_cpp.py.
//
// stdin:  int64 bits, N, K, group_size, has_offset; then the codes (N * row_bytes bytes), the scales
//         (N * K/g float32) and, if has_offset, the offsets (N * K/g float32), all little-endian.
// stdout: int32 codes [N][K] (via int4_code / int8_code), float32 weights [N][K] (via dequant_int4 /
//         dequant_int8) and, for int4, the codes packed again with int4_pack_row [N][K/2].
#include <cstdio>
#include <vector>

#include "common/quant_format.h"

namespace q = llama_fast::quant;

template <typename T>
static bool read_all(std::vector<T>& v) {
  return std::fread(v.data(), sizeof(T), v.size(), stdin) == v.size();
}

template <typename T>
static void write_all(const std::vector<T>& v) {
  std::fwrite(v.data(), sizeof(T), v.size(), stdout);
}

int main() {
  int64_t header[5];
  if (std::fread(header, sizeof(int64_t), 5, stdin) != 5) return 2;
  const int bits = static_cast<int>(header[0]);
  const int64_t n = header[1], k = header[2], group = header[3];
  const bool has_offset = header[4] != 0;
  const int64_t groups = k / group, bytes = q::row_bytes(bits, k);

  std::vector<uint8_t> codes(n * bytes);
  std::vector<float> scales(n * groups), offsets(has_offset ? n * groups : 0);
  if (!read_all(codes) || !read_all(scales) || (has_offset && !read_all(offsets))) return 3;

  std::vector<int32_t> unpacked(n * k);
  std::vector<float> weights(n * k);
  std::vector<uint8_t> repacked(bits == 4 ? n * bytes : 0);
  for (int64_t r = 0; r < n; ++r) {
    const uint8_t* row = codes.data() + r * bytes;
    const float* s = scales.data() + r * groups;
    const float* o = has_offset ? offsets.data() + r * groups : nullptr;
    for (int64_t c = 0; c < k; ++c) {
      if (bits == 4) {
        unpacked[r * k + c] = q::int4_code(row, c);
        weights[r * k + c] = q::dequant_int4(row, s, o, c, group);
      } else {
        const int8_t* row8 = reinterpret_cast<const int8_t*>(row);
        unpacked[r * k + c] = q::int8_code(row8, c);
        weights[r * k + c] = q::dequant_int8(row8, s, o, c, group);
      }
    }
    if (bits == 4) q::int4_pack_row(unpacked.data() + r * k, k, repacked.data() + r * bytes);
  }
  write_all(unpacked);
  write_all(weights);
  write_all(repacked);
  return 0;
}
