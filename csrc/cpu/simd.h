// VecF: W fp32 lanes of the instruction set being compiled (cpu/foreach_isa.h includes this header once per
// ISA pass, inside that pass's target region; no include guard on purpose). Kernels are written once against
// this small interface: load/store from float or bf16 (uint16_t bits), fma, reductions, exp.
// LF_ISA_LEVEL 0 = portable scalar (W = 1), 1 = AVX2 (W = 8), 2 = AVX-512 (W = 16).
namespace llama_fast {
namespace cpu {
namespace LF_ISA {

inline float to_f32(float x) { return x; }
inline float to_f32(uint16_t x) { return bf16_bits_to_float(x); }
template <typename T>
inline T from_f32(float x);
template <>
inline float from_f32<float>(float x) {
  return x;
}
template <>
inline uint16_t from_f32<uint16_t>(float x) {
  return float_to_bf16_bits(x);
}

#if LF_ISA_LEVEL == 2
// (operators are free functions: GCC does not apply `#pragma GCC target` to in-class friend definitions)
struct VecF {
  static constexpr int W = 16;
  __m512 v;
  VecF() = default;
  VecF(__m512 x) : v(x) {}
  static VecF zero() { return _mm512_setzero_ps(); }
  static VecF set1(float a) { return _mm512_set1_ps(a); }
  static VecF load(const float* p) { return _mm512_loadu_ps(p); }
  static VecF load(const uint16_t* p) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  void store(uint16_t* p) const {  // round to nearest even, like float_to_bf16_bits (NaN stays NaN)
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  static VecF fma(VecF a, VecF b, VecF c) { return _mm512_fmadd_ps(a.v, b.v, c.v); }
  static VecF max(VecF a, VecF b) { return _mm512_max_ps(a.v, b.v); }
  float sum() const { return _mm512_reduce_add_ps(v); }
  float hmax() const { return _mm512_reduce_max_ps(v); }
};
inline VecF operator+(VecF a, VecF b) { return _mm512_add_ps(a.v, b.v); }
inline VecF operator-(VecF a, VecF b) { return _mm512_sub_ps(a.v, b.v); }
inline VecF operator*(VecF a, VecF b) { return _mm512_mul_ps(a.v, b.v); }
inline VecF operator/(VecF a, VecF b) { return _mm512_div_ps(a.v, b.v); }

// exp(x) to ~1 ulp (Cephes expf polynomial); scalef does the 2^n scaling and under/overflows cleanly.
inline VecF exp(VecF x) {
  __m512 xv = _mm512_max_ps(_mm512_min_ps(x.v, _mm512_set1_ps(88.7228f)), _mm512_set1_ps(-104.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xv, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xv);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

#elif LF_ISA_LEVEL == 1
struct VecF {
  static constexpr int W = 8;
  __m256 v;
  VecF() = default;
  VecF(__m256 x) : v(x) {}
  static VecF zero() { return _mm256_setzero_ps(); }
  static VecF set1(float a) { return _mm256_set1_ps(a); }
  static VecF load(const float* p) { return _mm256_loadu_ps(p); }
  static VecF load(const uint16_t* p) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void store(uint16_t* p) const {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
    __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  }
  static VecF fma(VecF a, VecF b, VecF c) { return _mm256_fmadd_ps(a.v, b.v, c.v); }
  static VecF max(VecF a, VecF b) { return _mm256_max_ps(a.v, b.v); }
  float sum() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  float hmax() const {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};
inline VecF operator+(VecF a, VecF b) { return _mm256_add_ps(a.v, b.v); }
inline VecF operator-(VecF a, VecF b) { return _mm256_sub_ps(a.v, b.v); }
inline VecF operator*(VecF a, VecF b) { return _mm256_mul_ps(a.v, b.v); }
inline VecF operator/(VecF a, VecF b) { return _mm256_div_ps(a.v, b.v); }

inline VecF exp(VecF x) {
  __m256 xv = _mm256_max_ps(_mm256_min_ps(x.v, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-88.3762626647949f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(xv, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xv);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  __m256 result = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  // Below the clamp the true value is < 2^-127: flush to zero (masked scores must give exactly 0).
  return _mm256_and_ps(result, _mm256_cmp_ps(x.v, _mm256_set1_ps(-88.3762626647949f), _CMP_GT_OQ));
}

#else
struct VecF {
  static constexpr int W = 1;
  float v;
  VecF() = default;
  VecF(float x) : v(x) {}
  static VecF zero() { return 0.f; }
  static VecF set1(float a) { return a; }
  static VecF load(const float* p) { return *p; }
  static VecF load(const uint16_t* p) { return bf16_bits_to_float(*p); }
  void store(float* p) const { *p = v; }
  void store(uint16_t* p) const { *p = float_to_bf16_bits(v); }
  static VecF fma(VecF a, VecF b, VecF c) { return std::fma(a.v, b.v, c.v); }
  static VecF max(VecF a, VecF b) { return std::max(a.v, b.v); }
  float sum() const { return v; }
  float hmax() const { return v; }
};
inline VecF operator+(VecF a, VecF b) { return a.v + b.v; }
inline VecF operator-(VecF a, VecF b) { return a.v - b.v; }
inline VecF operator*(VecF a, VecF b) { return a.v * b.v; }
inline VecF operator/(VecF a, VecF b) { return a.v / b.v; }

inline VecF exp(VecF x) { return std::exp(x.v); }
#endif

// v[j] <- column j of the W x W block whose rows are v[0..W): a square transpose in registers (4 shuffles per vector
// on AVX-512, 3 on AVX2). It moves blocks between row-major data and the column order a kernel multiplies in where
// a gather per column would (prefill GEMM packing and write-back, attention's key blocks): gathers cost ~24 cycles
// each on an Intel Ice Lake guest, ~9 ns whether 8 or 16 lanes, as under the microcode mitigation of Gather Data
// Sampling, and write_transposed's gathers alone were ~11% of a prefill GEMM there.
inline void transpose_square(VecF (&v)[VecF::W]) {
#if LF_ISA_LEVEL == 2
  __m512 t[16], u[16];
  for (int i = 0; i < 16; i += 2) {  // lane L of t[i]: rows i, i + 1 at 4L, 4L + 1; of t[i + 1]: at 4L + 2, 4L + 3
    t[i] = _mm512_unpacklo_ps(v[i].v, v[i + 1].v);
    t[i + 1] = _mm512_unpackhi_ps(v[i].v, v[i + 1].v);
  }
  for (int i = 0; i < 16; i += 4) {  // lane L of u[i + c]: rows i..i+3 at column 4L + c
    const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 2]);
    const __m512d c = _mm512_castps_pd(t[i + 1]), d = _mm512_castps_pd(t[i + 3]);
    u[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    u[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    u[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    u[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int c = 0; c < 4; ++c) {  // column 4L + c = lane L of u[c], u[4 + c], u[8 + c], u[12 + c]
    const __m512 even01 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88),
                 odd01 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xdd);
    const __m512 even23 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
    const __m512 odd23 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xdd);
    v[c] = _mm512_shuffle_f32x4(even01, even23, 0x88);
    v[8 + c] = _mm512_shuffle_f32x4(even01, even23, 0xdd);
    v[4 + c] = _mm512_shuffle_f32x4(odd01, odd23, 0x88);
    v[12 + c] = _mm512_shuffle_f32x4(odd01, odd23, 0xdd);
  }
#elif LF_ISA_LEVEL == 1
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(v[i].v, v[i + 1].v);
    t[i + 1] = _mm256_unpackhi_ps(v[i].v, v[i + 1].v);
  }
  for (int i = 0; i < 8; i += 4) {  // lane L of u[i + c]: rows i..i+3 at column 4L + c
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
  }
  for (int c = 0; c < 4; ++c) {
    v[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
    v[4 + c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
  }
#else
  (void)v;  // W = 1
#endif
}

}  // namespace LF_ISA
}  // namespace cpu
}  // namespace llama_fast
