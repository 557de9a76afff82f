// The CPU noise generators shared by the plain pass (noise_axpby_cpu.cpp) and the exact pass
// (exact_cpu.cpp): Philox words of a chunk with AVX-512 / AVX2 integer code, Box-Muller over
// them, Rademacher signs, and the run-time choice of the widest ISA. Everything here has
// internal linkage and inlines into the callers' per-ISA clones (ZO_TARGET_V3 / V4), whose
// loops then take the clone's vector width.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <string>

#include "../zo_noise.h"

namespace {

constexpr int64_t kChunk = 2048;  // elements per work item, a multiple of zo::kAlign
static_assert(kChunk % zo::kAlign == 0, "chunks must start on a fresh Philox counter");

#if defined(__x86_64__) && !defined(__clang__)
// One build runs everywhere and still uses the widest vectors the CPU has: the chunk body is
// compiled three times (AVX-512, AVX2+FMA, baseline x86-64) and picked once at run time.
#define ZO_X86_DISPATCH 1
#include <immintrin.h>
#define ZO_TARGET_V4 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")))
#define ZO_TARGET_V3 __attribute__((target("avx2,fma")))
#endif
// Helpers inline into the cloned chunk body, so their loops take the clone's ISA.
#define ZO_INLINE static inline __attribute__((always_inline))

// Baseline path: Philox and Box-Muller in one loop, as the header writes them.
ZO_INLINE void add_gaussian_scalar(float* acc, int64_t n, uint64_t g0, uint64_t seed, float coef) {
  const int64_t blocks = (n + 3) / 4;
  const uint64_t j0 = g0 >> 2;
#pragma omp simd
  for (int64_t b = 0; b < blocks; ++b) {
    const zo::Float4 z = zo::gaussian4(seed, j0 + b);
    acc[4 * b + 0] += coef * z.x;
    acc[4 * b + 1] += coef * z.y;
    acc[4 * b + 2] += coef * z.z;
    acc[4 * b + 3] += coef * z.w;
  }
}

constexpr int64_t kBlocks = kChunk / 4;  // Philox counters per chunk (Gaussian)

// Box-Muller over Philox words already in w[0..3][b] (planes of kBlocks words), accumulated
// into acc[4b + lane]. The auto-vectorizer handles this loop well once the 32x32->64-bit
// multiplies are out of it (it widens them to 64-bit lanes and emulates 64x64 products).
ZO_INLINE void add_box_muller(float* __restrict acc, const uint32_t* __restrict w, int64_t b0,
                              int64_t blocks, float coef) {
#pragma omp simd
  for (int64_t b = b0; b < blocks; ++b) {
    float z0, z1, z2, z3;
    zo::box_muller(w[b], w[kBlocks + b], &z0, &z1);
    zo::box_muller(w[2 * kBlocks + b], w[3 * kBlocks + b], &z2, &z3);
    acc[4 * b + 0] += coef * z0;
    acc[4 * b + 1] += coef * z1;
    acc[4 * b + 2] += coef * z2;
    acc[4 * b + 3] += coef * z3;
  }
}


#if defined(ZO_X86_DISPATCH)
// Philox4x32-10 on 16 (AVX-512) or 8 (AVX2) counters at once, with the 32x32->64 products
// on vpmuludq (even lanes, then odd lanes shifted down) and vpmulld for the low words.
// Same words as zo::philox4x32_10, bit for bit. Round 0 is folded: c2 = c3 = 0 there.
#define ZO_V4_INLINE ZO_TARGET_V4 static inline __attribute__((always_inline))
#define ZO_V3_INLINE ZO_TARGET_V3 static inline __attribute__((always_inline))

ZO_V4_INLINE __m512i mulhi_v4(__m512i a, __m512i m, __m512i hi_idx) {
  const __m512i pe = _mm512_mul_epu32(a, m);
  const __m512i po = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  return _mm512_permutex2var_epi32(pe, hi_idx, po);  // high words: pe[2i+1], po[2i+1]
}

// Not inlined: the caller is compiled for the baseline ISA (one call per chunk and seed).
ZO_TARGET_V4 __attribute__((noinline)) void philox_words_v4(uint32_t* __restrict w, int64_t blocks, uint64_t j0, uint64_t seed) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(zo::kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(zo::kPhiloxM1));
  const __m512i hi_idx = _mm512_setr_epi32(1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const uint32_t lo0 = static_cast<uint32_t>(j0), hi0 = static_cast<uint32_t>(j0 >> 32);
  const __m512i vlo0 = _mm512_set1_epi32(static_cast<int>(lo0));
  const __m512i vhi0 = _mm512_set1_epi32(static_cast<int>(hi0));
  const __m512i one = _mm512_set1_epi32(1);
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int64_t b = 0; b < blocks; b += 16) {
    __m512i c0 = _mm512_add_epi32(vlo0, _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int>(b))));
    __m512i c1 = _mm512_mask_add_epi32(vhi0, _mm512_cmplt_epu32_mask(c0, vlo0), vhi0, one);  // carry
    // round 0
    __m512i c2 = _mm512_xor_si512(mulhi_v4(c0, m0, hi_idx), _mm512_set1_epi32(static_cast<int>(k1)));
    __m512i c3 = _mm512_mullo_epi32(c0, m0);
    c0 = _mm512_xor_si512(c1, _mm512_set1_epi32(static_cast<int>(k0)));
    c1 = _mm512_setzero_si512();
#pragma GCC unroll 9
    for (int r = 1; r < 10; ++r) {
      const __m512i kr0 = _mm512_set1_epi32(static_cast<int>(k0 + r * zo::kPhiloxW0));
      const __m512i kr1 = _mm512_set1_epi32(static_cast<int>(k1 + r * zo::kPhiloxW1));
      const __m512i h0 = mulhi_v4(c0, m0, hi_idx), l0 = _mm512_mullo_epi32(c0, m0);
      const __m512i h1 = mulhi_v4(c2, m1, hi_idx), l1 = _mm512_mullo_epi32(c2, m1);
      c0 = _mm512_ternarylogic_epi32(h1, c1, kr0, 0x96);  // h1 ^ c1 ^ k0
      c2 = _mm512_ternarylogic_epi32(h0, c3, kr1, 0x96);  // h0 ^ c3 ^ k1
      c1 = l1;
      c3 = l0;
    }
    _mm512_store_si512(reinterpret_cast<__m512i*>(w + b), c0);
    _mm512_store_si512(reinterpret_cast<__m512i*>(w + kBlocks + b), c1);
    _mm512_store_si512(reinterpret_cast<__m512i*>(w + 2 * kBlocks + b), c2);
    _mm512_store_si512(reinterpret_cast<__m512i*>(w + 3 * kBlocks + b), c3);
  }
}

ZO_V3_INLINE __m256i mulhi_v3(__m256i a, __m256i m) {
  const __m256i pe = _mm256_mul_epu32(a, m);
  const __m256i po = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  return _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
}

ZO_TARGET_V3 __attribute__((noinline)) void philox_words_v3(uint32_t* __restrict w, int64_t blocks, uint64_t j0, uint64_t seed) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(zo::kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(zo::kPhiloxM1));
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const uint32_t lo0 = static_cast<uint32_t>(j0), hi0 = static_cast<uint32_t>(j0 >> 32);
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i vlo0 = _mm256_set1_epi32(static_cast<int>(lo0));
  const __m256i vhi0 = _mm256_set1_epi32(static_cast<int>(hi0));
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int64_t b = 0; b < blocks; b += 8) {
    __m256i c0 = _mm256_add_epi32(vlo0, _mm256_add_epi32(iota, _mm256_set1_epi32(static_cast<int>(b))));
    // carry into the high word where c0 wrapped (unsigned c0 < lo0, as a signed compare)
    const __m256i carry = _mm256_cmpgt_epi32(_mm256_xor_si256(vlo0, sign), _mm256_xor_si256(c0, sign));
    __m256i c1 = _mm256_sub_epi32(vhi0, carry);
    __m256i c2 = _mm256_xor_si256(mulhi_v3(c0, m0), _mm256_set1_epi32(static_cast<int>(k1)));
    __m256i c3 = _mm256_mullo_epi32(c0, m0);
    c0 = _mm256_xor_si256(c1, _mm256_set1_epi32(static_cast<int>(k0)));
    c1 = _mm256_setzero_si256();
#pragma GCC unroll 9
    for (int r = 1; r < 10; ++r) {
      const __m256i kr0 = _mm256_set1_epi32(static_cast<int>(k0 + r * zo::kPhiloxW0));
      const __m256i kr1 = _mm256_set1_epi32(static_cast<int>(k1 + r * zo::kPhiloxW1));
      const __m256i h0 = mulhi_v3(c0, m0), l0 = _mm256_mullo_epi32(c0, m0);
      const __m256i h1 = mulhi_v3(c2, m1), l1 = _mm256_mullo_epi32(c2, m1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(h1, c1), kr0);
      c2 = _mm256_xor_si256(_mm256_xor_si256(h0, c3), kr1);
      c1 = l1;
      c3 = l0;
    }
    _mm256_store_si256(reinterpret_cast<__m256i*>(w + b), c0);
    _mm256_store_si256(reinterpret_cast<__m256i*>(w + kBlocks + b), c1);
    _mm256_store_si256(reinterpret_cast<__m256i*>(w + 2 * kBlocks + b), c2);
    _mm256_store_si256(reinterpret_cast<__m256i*>(w + 3 * kBlocks + b), c3);
  }
}
#endif

// Philox words of blocks [0, ceil(n / 4)) into w (kIsa: 2 AVX-512, 1 AVX2).
template <int kIsa>
ZO_INLINE void philox_words(uint32_t* w, int64_t n, uint64_t g0, uint64_t seed) {
#if defined(ZO_X86_DISPATCH)
  const int64_t lanes = kIsa == 2 ? 16 : 8;
  const int64_t padded = ((n + 3) / 4 + lanes - 1) / lanes * lanes;
  if constexpr (kIsa == 2)
    philox_words_v4(w, padded, g0 >> 2, seed);
  else
    philox_words_v3(w, padded, g0 >> 2, seed);
#endif
}

// kIsa: 2 AVX-512, 1 AVX2, 0 baseline.
template <int kIsa>
ZO_INLINE void add_gaussian(float* acc, int64_t n, uint64_t g0, uint64_t seed, float coef) {
  if constexpr (kIsa > 0) {
    alignas(64) uint32_t w[4 * kBlocks];  // Philox words, one plane per word
    philox_words<kIsa>(w, n, g0, seed);
    add_box_muller(acc, w, 0, (n + 3) / 4, coef);
  } else {
    add_gaussian_scalar(acc, n, g0, seed, coef);
  }
}

ZO_INLINE void add_signs(float* acc, uint32_t word, float coef) {
#pragma omp simd
  for (int b = 0; b < 32; ++b) acc[b] += ((word >> b) & 1u) ? coef : -coef;
}

ZO_INLINE void add_rademacher(float* acc, int64_t n, uint64_t g0, uint64_t seed, float coef) {
  const int64_t blocks = (n + zo::kAlign - 1) / zo::kAlign;
  for (int64_t b = 0; b < blocks; ++b) {
    const zo::Words4 w = zo::rademacher_words(seed, (g0 >> 7) + b);
    float* a = acc + zo::kAlign * b;
    add_signs(a, w.w0, coef);
    add_signs(a + 32, w.w1, coef);
    add_signs(a + 64, w.w2, coef);
    add_signs(a + 96, w.w3, coef);
  }
}

// z itself (not accumulated) for elements [0, n) of a chunk at global index g0.
template <int kIsa>
ZO_INLINE void gaussian_z(float* __restrict z, int64_t n, uint64_t g0, uint64_t seed) {
  const int64_t blocks = (n + 3) / 4;
  if constexpr (kIsa > 0) {
    alignas(64) uint32_t w[4 * kBlocks];
    philox_words<kIsa>(w, n, g0, seed);
#pragma omp simd
    for (int64_t b = 0; b < blocks; ++b) {
      zo::box_muller(w[b], w[kBlocks + b], &z[4 * b + 0], &z[4 * b + 1]);
      zo::box_muller(w[2 * kBlocks + b], w[3 * kBlocks + b], &z[4 * b + 2], &z[4 * b + 3]);
    }
  } else {
    const uint64_t j0 = g0 >> 2;
#pragma omp simd
    for (int64_t b = 0; b < blocks; ++b) {
      const zo::Float4 v = zo::gaussian4(seed, j0 + b);
      z[4 * b + 0] = v.x;
      z[4 * b + 1] = v.y;
      z[4 * b + 2] = v.z;
      z[4 * b + 3] = v.w;
    }
  }
}

// The four Philox words of each Gaussian block in element order: out[e] = word (g & 3) of
// Philox(seed, g >> 2) for g = g0 + e (the stochastic-rounding stream of EXACT.md).
template <int kIsa>
ZO_INLINE void philox_element_words(uint32_t* __restrict out, int64_t n, uint64_t g0, uint64_t seed) {
  const int64_t blocks = (n + 3) / 4;
  if constexpr (kIsa > 0) {
    alignas(64) uint32_t w[4 * kBlocks];
    philox_words<kIsa>(w, n, g0, seed);
#pragma omp simd
    for (int64_t b = 0; b < blocks; ++b) {
      out[4 * b + 0] = w[b];
      out[4 * b + 1] = w[kBlocks + b];
      out[4 * b + 2] = w[2 * kBlocks + b];
      out[4 * b + 3] = w[3 * kBlocks + b];
    }
  } else {
    const uint64_t j0 = g0 >> 2;
    for (int64_t b = 0; b < blocks; ++b) {
      const zo::Words4 v = zo::philox4x32_10(j0 + b, seed);
      out[4 * b + 0] = v.w0;
      out[4 * b + 1] = v.w1;
      out[4 * b + 2] = v.w2;
      out[4 * b + 3] = v.w3;
    }
  }
}

// The widest ISA this CPU runs: 2 AVX-512, 1 AVX2+FMA, 0 baseline.
// ZO_OPT_CPU_ISA=avx2|baseline caps the choice (to test the narrower paths on a wider CPU).
inline int pick_isa() {
#if defined(ZO_X86_DISPATCH)
  const char* cap = std::getenv("ZO_OPT_CPU_ISA");
  const std::string isa = cap ? cap : "";
  if (isa == "baseline") return 0;
  __builtin_cpu_init();
  if (isa != "avx2" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("fma"))
    return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
  return 0;
}

}  // namespace
