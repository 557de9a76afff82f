// The noise contract of shared/design/NOISE.md in C++: one implementation for the CPU and
// CUDA backends. Torch-free (plain integers and floats) so that nvcc and the host compiler
// both take it as it is.
//
//   philox4x32_10(counter, seed)      four 32-bit words for a 64-bit counter and 64-bit key
//   gaussian4(seed, j)                z at global indices 4j .. 4j+3 (Box-Muller, float32)
//   rademacher_words(seed, j)         128 sign bits for global indices 128j .. 128j+127
//
// The host build uses branch-free polynomial log and sincos (a few ulp; z within 1e-6 of the
// float64 formula over every uniform, far inside the contract's 2e-5) so that the CPU loops
// vectorize; the Triton kernels use the same polynomials. CUDA device code uses CUDA's
// precise logf and sincospif: with the polynomial sincos the Gaussian pass kernel needs more
// registers than its 3-blocks-an-SM cap (ptxas sm_90: 256-320 spill bytes). Neither is a
// fast-math approximation.
#pragma once

#include <cstdint>
#include <cmath>
#include <cstring>

#if defined(__CUDACC__)
#define ZO_HD __host__ __device__ __forceinline__
#else
#define ZO_HD inline __attribute__((always_inline))
#endif

namespace zo {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
// Element offsets of consecutive parameters are rounded up to this, so every tensor starts
// on a fresh counter for both distributions.
constexpr int64_t kAlign = 128;

enum Distribution : int { kGaussian = 0, kRademacher = 1 };

struct Words4 {
  uint32_t w0, w1, w2, w3;
};

struct Float4 {
  float x, y, z, w;
};

ZO_HD Words4 philox4x32_10(uint64_t counter, uint64_t seed) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDACC__)
#pragma unroll
#else
#pragma GCC unroll 10
#endif
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxW0;  // the bump after the last round is unused
    k1 += kPhiloxW1;
  }
  return {c0, c1, c2, c3};
}

// u = ((w >> 9) + 0.5) * 2^-23: in (0, 1), exact in float32.
ZO_HD float uniform_open01(uint32_t w) {
  return (static_cast<float>(w >> 9) + 0.5f) * 1.1920928955078125e-07f;
}

ZO_HD float bits_to_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
#endif
}

ZO_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
#endif
}

#if !defined(__CUDA_ARCH__)
// ln(x) for normal positive x (Cephes logf: mantissa in [sqrt(1/2), sqrt(2)), degree-9 poly).
ZO_HD float host_logf(float x) {
  // Reduce to m in [sqrt(1/2), sqrt(2)) with the exponent adjusted, on integers: adding
  // 0x800000 - 0x3504f4 carries into the exponent exactly when the mantissa m' in [1, 2)
  // is above sqrt(2) (as float32, 0x3fb504f3), and m = m' or m'/2 as before (bit-identical
  // to the compare-and-halve form, with no selects).
  const uint32_t t = float_to_bits(x) + (0x00800000u - 0x003504f4u);
  const int e = static_cast<int>(t >> 23) - 127;
  const float m = bits_to_float((t & 0x007fffffu) + 0x3f3504f4u);
  const float f = m - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  const float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return (f + y) + 0.693359375f * fe;
}

// cos(2 pi u), sin(2 pi u) for u = uniform_open01(w), from the word itself: with m = w >> 9,
// u = (m + 0.5) 2^-23, the nearest quarter turn k = round(4u) = (m + 2^20) >> 21 and the rest
// u - k/4 = (m - k 2^21 + 0.5) 2^-23 are exact; Cephes polynomials on [-pi/4, pi/4], then the
// quadrant by a swap and sign bits.
ZO_HD void host_sincos2pi_word(uint32_t w, float* c_out, float* s_out) {
  const uint32_t m = w >> 9;
  const uint32_t k = (m + (1u << 20)) >> 21;
  const int d = static_cast<int>(m) - static_cast<int>(k << 21);
  const float a = 6.28318530717958647692f * ((static_cast<float>(d) + 0.5f) * 1.1920928955078125e-07f);
  const float a2 = a * a;
  const float s = a + a * a2 * (-1.6666654611e-1f + a2 * (8.3321608736e-3f + a2 * -1.9515295891e-4f));
  const float c = 1.0f - 0.5f * a2 +
                  a2 * a2 * (4.166664568298827e-2f + a2 * (-1.388731625493765e-3f + a2 * 2.443315711809948e-5f));
  const bool swap = (k & 1u) != 0;
  const uint32_t c_sign = ((k + 1u) & 2u) << 30;  // quadrants 1, 2
  const uint32_t s_sign = (k & 2u) << 30;         // quadrants 2, 3
  *c_out = bits_to_float(float_to_bits(swap ? s : c) ^ c_sign);
  *s_out = bits_to_float(float_to_bits(swap ? c : s) ^ s_sign);
}
#endif

ZO_HD void box_muller(uint32_t wr, uint32_t wt, float* z0, float* z1) {
  const float ur = uniform_open01(wr);
#if defined(__CUDA_ARCH__)
  const float ut = uniform_open01(wt);
  const float r = sqrtf(-2.0f * logf(ur));
  float s, c;
  sincospif(2.0f * ut, &s, &c);
#else
  const float r = std::sqrt(-2.0f * host_logf(ur));
  float s, c;
  host_sincos2pi_word(wt, &c, &s);
#endif
  *z0 = r * c;
  *z1 = r * s;
}

// Gaussian z at global indices 4j, 4j+1, 4j+2, 4j+3.
ZO_HD Float4 gaussian4(uint64_t seed, uint64_t j) {
  const Words4 w = philox4x32_10(j, seed);
  Float4 z;
  box_muller(w.w0, w.w1, &z.x, &z.y);
  box_muller(w.w2, w.w3, &z.z, &z.w);
  return z;
}

// Sign bits of global indices 128j .. 128j+127: bit b of word b/32; z = +1 where it is set.
ZO_HD Words4 rademacher_words(uint64_t seed, uint64_t j) { return philox4x32_10(j, seed); }

// float32 -> bfloat16 bits, round to nearest even (NaN kept quiet).
ZO_HD uint16_t float_to_bf16_rne(float f) {
  const uint32_t b = float_to_bits(f);
  const uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
  const bool nan = (b & 0x7fffffffu) > 0x7f800000u;
  return static_cast<uint16_t>(nan ? ((b >> 16) | 0x40u) : rounded);
}

ZO_HD float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// cond ? a : b on bits, with no branch for the vectorizer to refuse.
ZO_HD uint32_t select_bits(bool cond, uint32_t a, uint32_t b) {
  return b ^ ((a ^ b) & (0u - static_cast<uint32_t>(cond)));
}

// float32 -> float16 bits, round to nearest even, branch-free so that host loops vectorize
// (F. Giesen's float_to_half_fast3_rtne): overflow to inf, NaN kept quiet, subnormals
// rounded by a float addition that aligns them to the half's subnormal grid.
ZO_HD uint16_t float_to_half_rne(float f) {
  const uint32_t bits = float_to_bits(f);
  const uint32_t sign = bits & 0x80000000u;
  const uint32_t a = bits ^ sign;
  const uint32_t special = a > 0x7f800000u ? 0x7e00u : 0x7c00u;
  const float sub = bits_to_float(a) + bits_to_float(126u << 23);  // 0.5: subnormal grid
  const uint32_t subnormal = float_to_bits(sub) - (126u << 23);
  const uint32_t normal = (a + (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
  const uint32_t h = select_bits(a >= 0x47800000u, special, select_bits(a < 0x38800000u, subnormal, normal));
  return static_cast<uint16_t>(h | (sign >> 16));
}

// float16 bits -> float32, exact (normals by rebiasing, subnormals by a float subtraction).
ZO_HD float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = static_cast<uint32_t>(h & 0x7fffu) << 13;
  const uint32_t normal = em + (static_cast<uint32_t>(127 - 15) << 23);
  const uint32_t special = em | 0x7f800000u;
  const float sub = bits_to_float(em + (113u << 23)) - bits_to_float(113u << 23);  // 2^-14
  const uint32_t v = select_bits(em >= (0x7c00u << 13), special,
                                 select_bits(em < (0x0400u << 13), float_to_bits(sub), normal));
  return bits_to_float(v | sign);
}

}  // namespace zo
