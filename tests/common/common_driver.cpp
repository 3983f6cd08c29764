// A torch-free driver over the csrc/common headers, compiled with the host compiler by
// tests/test_common_math.py: it runs the exact functions the CUDA (and CPU) kernels use and prints their
// results, as hex bit patterns where exactness matters, for comparison with torch.
//
// Usage: common_driver MODE < input; every value on stdin/stdout is whitespace-separated.
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "common/activation_math.h"
#include "common/fp16_bits.h"
#include "common/half_float.h"
#include "common/int4_magic.h"
#include "common/quant_format.h"
#include "common/rotary_math.h"
#include "common/softmax_math.h"

using namespace llama_fast;

static float read_float_bits() {
  uint32_t u = 0;
  if (std::scanf("%" SCNx32, &u) != 1) return NAN;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

static void print_float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  std::printf("%08" PRIx32 "\n", u);
}

int main(int argc, char** argv) {
  if (argc < 2) return 2;
  const char* mode = argv[1];
  long n = 0;
  if (std::strcmp(mode, "half_to_float") == 0) {  // every fp16 bit pattern -> fp32 bits
    for (uint32_t h = 0; h < 65536; ++h) print_float_bits(half_bits_to_float(static_cast<uint16_t>(h)));
  } else if (std::strcmp(mode, "float_to_half") == 0 || std::strcmp(mode, "float_to_bf16") == 0) {
    const bool half = mode[9] == 'h';
    std::scanf("%ld", &n);
    for (long i = 0; i < n; ++i) {
      const float f = read_float_bits();
      std::printf("%04x\n", half ? float_to_half_bits(f) : float_to_bf16_bits(f));
    }
  } else if (std::strcmp(mode, "int4_words") == 0) {  // word -> 8 codes by the magic trick, then by int4_code
    std::scanf("%ld", &n);
    for (long w = 0; w < n; ++w) {
      uint32_t word = 0;
      std::scanf("%" SCNx32, &word);
      int magic[8];
      for (int i = 0; i < 4; ++i) {
        const uint32_t bits = quant::int4_pair_as_half2_bits(word, i);
        magic[quant::int4_pair_element(i, 0)] = static_cast<int>(half_bits_to_float(bits & 0xFFFFu)) - 1024;
        magic[quant::int4_pair_element(i, 1)] = static_cast<int>(half_bits_to_float(bits >> 16)) - 1024;
      }
      uint8_t bytes[4];
      std::memcpy(bytes, &word, 4);  // little endian: byte j holds elements 2j (low) and 2j+1 (high)
      for (int e = 0; e < 8; ++e) std::printf("%d %d%c", magic[e], quant::int4_code(bytes, e), e == 7 ? '\n' : ' ');
    }
  } else if (std::strcmp(mode, "dequant") == 0) {  // code scale offset -> w
    std::scanf("%ld", &n);
    for (long i = 0; i < n; ++i) {
      int code = 0;
      std::scanf("%d", &code);
      const float s = read_float_bits(), o = read_float_bits();
      print_float_bits(quant::dequant_value(code, s, o));
    }
  } else if (std::strcmp(mode, "softmax") == 0) {
    // n keys, d dims, chunk size c: scores[n] (-inf = masked), values[n*d]; streams each chunk with the
    // online update, merges the chunks, prints softmax(scores) @ values (d floats).
    long d = 0, c = 0;
    std::scanf("%ld %ld %ld", &n, &d, &c);
    std::vector<float> s(n), v(n * d);
    for (auto& x : s) x = read_float_bits();
    for (auto& x : v) x = read_float_bits();
    float m = -INFINITY, l = 0.0f;
    std::vector<float> o(d, 0.0f);
    for (long c0 = 0; c0 < n || c0 == 0; c0 += c) {
      float cm = -INFINITY, cl = 0.0f;  // this chunk's partial, key by key
      std::vector<float> co(d, 0.0f);
      for (long j = c0; j < std::min(n, c0 + c); ++j) {
        const float m_new = std::fmax(cm, s[j]);
        const float alpha = softmax::rescale(cm, m_new), p = softmax::weight(s[j], m_new);
        cl = cl * alpha + p;
        for (long e = 0; e < d; ++e) co[e] = co[e] * alpha + p * v[j * d + e];
        cm = m_new;
      }
      float sa, sb;
      softmax::merge(m, l, cm, cl, &sa, &sb);
      for (long e = 0; e < d; ++e) o[e] = o[e] * sa + co[e] * sb;
      if (n == 0) break;
    }
    const float inv = softmax::inverse_sum(l);
    for (long e = 0; e < d; ++e) print_float_bits(o[e] * inv);
  } else if (std::strcmp(mode, "rotary") == 0) {  // x1 x2 cos sin -> y1 y2
    std::scanf("%ld", &n);
    for (long i = 0; i < n; ++i) {
      const float x1 = read_float_bits(), x2 = read_float_bits(), c = read_float_bits(), s = read_float_bits();
      float y1, y2;
      rotary::rotate_pair(x1, x2, c, s, &y1, &y2);
      print_float_bits(y1);
      print_float_bits(y2);
    }
  } else if (std::strcmp(mode, "silu_mul") == 0) {  // gate up -> silu(gate) * up
    std::scanf("%ld", &n);
    for (long i = 0; i < n; ++i) {
      const float g = read_float_bits(), u = read_float_bits();
      print_float_bits(activation::silu_mul(g, u));
    }
  } else {
    return 2;
  }
  return 0;
}
