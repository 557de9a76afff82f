// CPU backend: p = alpha * p + sum_i c_i * z(seed_i) over a whole parameter list, in place,
// in one parallel pass. The work is cut into chunks of whole Philox blocks (multi-tensor
// apply: the chunk body never knows which tensor it is in); each chunk regenerates its noise
// into a small stack buffer, then reads and writes each parameter element once.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "cpu_noise.h"

namespace {

// The last seed of a float32 chunk, fused with the axpby over whole blocks of 4:
// p = alpha * p + (acc + coef * z), the same arithmetic as accumulating then axpby_f32, but
// the parameter stream is spread over the noise computation instead of one burst at the end.
ZO_INLINE void box_muller_axpby_f32(float* __restrict p, const float* __restrict acc,
                                    const uint32_t* __restrict w, int64_t blocks, float coef,
                                    float alpha) {
#pragma omp simd
  for (int64_t b = 0; b < blocks; ++b) {
    float z0, z1, z2, z3;
    zo::box_muller(w[b], w[kBlocks + b], &z0, &z1);
    zo::box_muller(w[2 * kBlocks + b], w[3 * kBlocks + b], &z2, &z3);
    p[4 * b + 0] = alpha * p[4 * b + 0] + (acc[4 * b + 0] + coef * z0);
    p[4 * b + 1] = alpha * p[4 * b + 1] + (acc[4 * b + 1] + coef * z1);
    p[4 * b + 2] = alpha * p[4 * b + 2] + (acc[4 * b + 2] + coef * z2);
    p[4 * b + 3] = alpha * p[4 * b + 3] + (acc[4 * b + 3] + coef * z3);
  }
}

// add_gaussian for the last seed, then p = alpha * p + acc, on float32 (AVX paths only).
template <int kIsa>
ZO_INLINE void add_gaussian_axpby_f32(float* p, float* acc, int64_t n, uint64_t g0, uint64_t seed,
                                      float coef, float alpha) {
  alignas(64) uint32_t w[4 * kBlocks];
  philox_words<kIsa>(w, n, g0, seed);
  const int64_t whole = n / 4;
  box_muller_axpby_f32(p, acc, w, whole, coef, alpha);
  if (whole * 4 < n) {  // a partial last block: through acc
    add_box_muller(acc, w, whole, whole + 1, coef);
    for (int64_t e = whole * 4; e < n; ++e) p[e] = alpha * p[e] + acc[e];
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
template <int kIsa>
ZO_INLINE void process_chunk_body(void* data, at::ScalarType dtype, int64_t n, uint64_t g0,
                                  const int64_t* seeds, const float* coefs, int64_t n_seeds,
                                  float alpha, bool gaussian) {
  alignas(64) float acc[kChunk];
  std::fill(acc, acc + kChunk, 0.0f);
  // float32 Gaussian on the AVX paths: the last seed is fused with the axpby
  const bool fuse_last = kIsa > 0 && gaussian && dtype == at::kFloat && n_seeds > 0;
  for (int64_t i = 0; i < n_seeds - (fuse_last ? 1 : 0); ++i) {
    const uint64_t seed = static_cast<uint64_t>(seeds[i]);
    if (gaussian)
      add_gaussian<kIsa>(acc, n, g0, seed, coefs[i]);
    else
      add_rademacher(acc, n, g0, seed, coefs[i]);
  }
  if (fuse_last) {
    add_gaussian_axpby_f32<kIsa>(static_cast<float*>(data), acc, n, g0,
                                 static_cast<uint64_t>(seeds[n_seeds - 1]), coefs[n_seeds - 1], alpha);
    return;
  }
  switch (dtype) {
    case at::kFloat: axpby_f32(static_cast<float*>(data), acc, n, alpha); break;
    case at::kBFloat16: axpby_bf16(static_cast<uint16_t*>(data), acc, n, alpha); break;
    default: axpby_f16(static_cast<uint16_t*>(data), acc, n, alpha); break;
  }
}

#define ZO_CHUNK_ARGS                                                                         \
  void *data, at::ScalarType dtype, int64_t n, uint64_t g0, const int64_t *seeds,             \
      const float *coefs, int64_t n_seeds, float alpha, bool gaussian
#define ZO_CHUNK_PASS data, dtype, n, g0, seeds, coefs, n_seeds, alpha, gaussian

using ChunkFn = void (*)(ZO_CHUNK_ARGS);

void process_chunk_base(ZO_CHUNK_ARGS) { process_chunk_body<0>(ZO_CHUNK_PASS); }

#if defined(ZO_X86_DISPATCH)
ZO_TARGET_V3 void process_chunk_v3(ZO_CHUNK_ARGS) { process_chunk_body<1>(ZO_CHUNK_PASS); }
ZO_TARGET_V4 void process_chunk_v4(ZO_CHUNK_ARGS) { process_chunk_body<2>(ZO_CHUNK_PASS); }
#endif

ChunkFn pick_process_chunk() {
  switch (pick_isa()) {
#if defined(ZO_X86_DISPATCH)
    case 2: return process_chunk_v4;
    case 1: return process_chunk_v3;
#endif
    default: return process_chunk_base;
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
    TORCH_CHECK(offsets[k] >= 0 && offsets[k] % zo::kAlign == 0, "noise_axpby_: tensor ", k,
                "'s offset is ", offsets[k], "; it must be a non-negative multiple of ", zo::kAlign,
                " (as zo_opt.noise.offsets makes them, from a base_offset that is one too); "
                "the torch and triton backends take any offset");
    for (int64_t start = 0; start < p.numel(); start += kChunk) chunks.push_back({int64_t(k), start});
  }

  static const ChunkFn process_chunk = pick_process_chunk();
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
  // CUDA only (csrc/cuda/noise_axpby_binding.cpp): the prepared path's table and launch
  m.def("cuda_table(Tensor[] params, int[] offsets) -> (Tensor, int)");
  m.def(
      "noise_axpby_table_(Tensor table, int n_tensors, int n_tiles, Tensor seeds, Tensor scales, str distribution) -> ()");
  // CUDA only (csrc/cuda/exact_binding.cpp): the exact pass over a cuda_table
  m.def(
      "noise_axpby_exact_table_(Tensor table, int n_tensors, int n_tiles, Tensor seeds, Tensor scales, int n_old, Tensor(a!) codes, int code_base, Tensor chunk_base, Tensor table_bits, float tau, bool encode, bool rounding, str distribution) -> ()");
  // The exact pass of docs/EXACT.md (CPU: csrc/cpu/exact_cpu.cpp)
  m.def(
      "noise_axpby_exact_(Tensor(a!)[] params, int[] offsets, Tensor seeds, Tensor scales, int n_old, Tensor(b!) codes, int code_base, Tensor chunk_base, Tensor table_bits, float tau, bool encode, bool rounding, str distribution) -> ()");
  // Its side table, counted then filled (CPU: csrc/cpu/exact_table_cpu.cpp)
  m.def("exact_table_count_(Tensor[] params, int[] offsets, int code_base, float tau, Tensor(a!) counts) -> ()");
  m.def(
      "exact_table_fill_(Tensor[] params, int[] offsets, int code_base, float tau, Tensor chunk_base, Tensor(a!) bits) -> ()");
}

TORCH_LIBRARY_IMPL(zo_opt, CPU, m) { m.impl("noise_axpby_", &noise_axpby_cpu); }
