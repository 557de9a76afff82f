// CPU backend: p = alpha * p + sum_i c_i * z(seed_i) over a whole parameter list, in place,
// in one parallel pass. The work is cut into chunks of whole Philox blocks (multi-tensor
// apply: the chunk body never knows which tensor it is in); each chunk regenerates its noise
// into a small stack buffer, then reads and writes each parameter element once.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <vector>

#include "../zo_noise.h"

namespace {

constexpr int64_t kChunk = 2048;  // elements per work item, a multiple of zo::kAlign
static_assert(kChunk % zo::kAlign == 0, "chunks must start on a fresh Philox counter");

#if defined(__x86_64__) && !defined(__clang__)
// One build runs everywhere and still uses the widest vectors the CPU has.
#define ZO_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ZO_CLONES
#endif
// Helpers inline into the cloned chunk body, so their loops take the clone's ISA.
#define ZO_INLINE static inline __attribute__((always_inline))

ZO_INLINE void add_gaussian(float* acc, int64_t n, uint64_t g0, uint64_t seed, float coef) {
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

// y = alpha * x + acc in float32, stored with round-to-nearest-even (the header's
// branch-free conversions, which vectorize where c10's do not).
ZO_INLINE void axpby_f32(float* __restrict p, const float* __restrict acc, int64_t n, float alpha) {
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) p[e] = alpha * p[e] + acc[e];
}

ZO_INLINE void axpby_bf16(uint16_t* __restrict p, const float* __restrict acc, int64_t n, float alpha) {
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) p[e] = zo::float_to_bf16_rne(alpha * zo::bf16_to_float(p[e]) + acc[e]);
}

ZO_INLINE void axpby_f16(uint16_t* __restrict p, const float* __restrict acc, int64_t n, float alpha) {
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) p[e] = zo::float_to_half_rne(alpha * zo::half_to_float(p[e]) + acc[e]);
}

// One work item: n <= kChunk elements starting at global index g0 (a multiple of 128).
ZO_CLONES void process_chunk(void* data, at::ScalarType dtype, int64_t n, uint64_t g0,
                             const int64_t* seeds, const float* coefs, int64_t n_seeds,
                             float alpha, bool gaussian) {
  alignas(64) float acc[kChunk];
  std::fill(acc, acc + kChunk, 0.0f);
  for (int64_t i = 0; i < n_seeds; ++i) {
    const uint64_t seed = static_cast<uint64_t>(seeds[i]);
    if (gaussian)
      add_gaussian(acc, n, g0, seed, coefs[i]);
    else
      add_rademacher(acc, n, g0, seed, coefs[i]);
  }
  switch (dtype) {
    case at::kFloat: axpby_f32(static_cast<float*>(data), acc, n, alpha); break;
    case at::kBFloat16: axpby_bf16(static_cast<uint16_t*>(data), acc, n, alpha); break;
    default: axpby_f16(static_cast<uint16_t*>(data), acc, n, alpha); break;
  }
}

struct Chunk {
  int64_t tensor;
  int64_t start;
};

void noise_axpby_cpu(at::TensorList params, at::IntArrayRef offsets, at::IntArrayRef seeds,
                     const at::Tensor& scales, c10::string_view distribution) {
  TORCH_CHECK(params.size() == offsets.size(), "noise_axpby_: ", params.size(), " tensors but ",
              offsets.size(), " offsets");
  TORCH_CHECK(scales.device().is_cpu() && scales.scalar_type() == at::kFloat && scales.dim() == 1 &&
                  scales.numel() == static_cast<int64_t>(seeds.size()) + 1,
              "noise_axpby_: scales must be a float32 CPU vector [alpha, c_1..c_n] of length ",
              seeds.size() + 1);
  const bool gaussian = distribution == "gaussian";
  TORCH_CHECK(gaussian || distribution == "rademacher", "noise_axpby_: unknown distribution ",
              distribution);
  const auto sc = scales.contiguous();
  const float* s = sc.data_ptr<float>();
  const float alpha = s[0];

  std::vector<Chunk> chunks;
  for (size_t k = 0; k < params.size(); ++k) {
    const auto& p = params[k];
    TORCH_CHECK(p.device().is_cpu() && p.is_contiguous(), "noise_axpby_: tensor ", k,
                " must be a contiguous CPU tensor");
    TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == at::kHalf ||
                    p.scalar_type() == at::kBFloat16,
                "noise_axpby_: tensor ", k, " has dtype ", p.scalar_type(),
                "; the cpu backend takes float32, float16 and bfloat16");
    TORCH_CHECK(offsets[k] >= 0 && offsets[k] % zo::kAlign == 0, "noise_axpby_: offset ", k,
                " must be a non-negative multiple of ", zo::kAlign);
    for (int64_t start = 0; start < p.numel(); start += kChunk) chunks.push_back({int64_t(k), start});
  }

  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const auto& p = params[chunks[c].tensor];
      const int64_t start = chunks[c].start;
      char* data = static_cast<char*>(p.data_ptr()) + start * p.element_size();
      process_chunk(data, p.scalar_type(), std::min(kChunk, p.numel() - start),
                    static_cast<uint64_t>(offsets[chunks[c].tensor] + start), seeds.data(), s + 1,
                    static_cast<int64_t>(seeds.size()), alpha, gaussian);
    }
  });
}

}  // namespace

TORCH_LIBRARY(zo_opt, m) {
  m.def(
      "noise_axpby_(Tensor(a!)[] params, int[] offsets, int[] seeds, Tensor scales, str distribution) -> ()");
}

TORCH_LIBRARY_IMPL(zo_opt, CPU, m) { m.impl("noise_axpby_", &noise_axpby_cpu); }
