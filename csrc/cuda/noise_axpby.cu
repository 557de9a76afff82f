// CUDA backend kernel: one pass of NOISE.md's schedule over every tensor of a table.
//
// Work split: a tile is 4096 consecutive elements of one tensor (32 Philox blocks of 128);
// a 256-thread block walks tiles grid-stride, the grid sized to fill the SMs once. Inside a
// tile, 8 threads share one Philox block: thread l of the 8 takes the 16-byte vectors
// l, l + 8, l + 16, ... of that block, so each load instruction of 8 threads reads one
// contiguous 128-byte segment, and each thread draws its Rademacher bits with a single
// Philox call per seed (a float32 thread holds 4 vectors = 16 elements, a 16-bit one 2 = 16).
// Gaussian vectors start at multiples of 4 elements, so each takes whole gaussian4 calls.
//
// Arithmetic follows the torch reference backend operation by operation, with explicit
// round-to-nearest multiplies and adds (no FMA contraction): acc = 0; acc += c_i * z_i in
// seed order; p = alpha * p + acc. Rademacher results are then bit-identical to it.
#include <cuda_fp16.h>

#include "../zo_noise.h"
#include "noise_axpby.cuh"
#include "tensor_table.h"

namespace zo {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kLanesPerBlock = 8;  // threads sharing one Philox block of kAlign elements
static_assert(kThreads / kLanesPerBlock * kAlign == kTile, "a tile is one pass of the block");

// Element types: how a stored element becomes float32 and back (round to nearest even).
struct F32 {
  using Bits = float;
  __device__ static float load(float v) { return v; }
  __device__ static float store(float v) { return v; }
};
struct F16 {
  using Bits = uint16_t;
  __device__ static float load(uint16_t b) { return __half2float(__ushort_as_half(b)); }
  __device__ static uint16_t store(float v) { return __half_as_ushort(__float2half_rn(v)); }
};
struct BF16 {
  using Bits = uint16_t;
  __device__ static float load(uint16_t b) { return bf16_to_float(b); }
  __device__ static uint16_t store(float v) { return float_to_bf16_rne(v); }
};

template <typename D>
union Vec16 {
  static constexpr int kN = 16 / sizeof(typename D::Bits);
  uint4 raw;
  typename D::Bits e[kN];
};

// Explicitly global accesses: the tensor table hands the kernel generic pointers, and plain
// dereferences of those compile to generic loads/stores instead of LDG/STG.
template <typename T>
__device__ __forceinline__ T load_global(const T* p) { return __ldca(p); }
template <typename T>
__device__ __forceinline__ void store_global(T* p, T v) { __stwb(p, v); }

__device__ __forceinline__ uint32_t pick(const Words4& w, int i) {
  return i == 0 ? w.w0 : i == 1 ? w.w1 : i == 2 ? w.w2 : w.w3;
}

// One thread's share of one tile: its vectors of one Philox block, read once, written once.
template <typename D, int kDist>
__device__ __forceinline__ void tile_pass(const TensorEntry& t, int64_t tile_start,
                                          const uint64_t* seeds, int64_t n_seeds,
                                          const float* scales) {
  using V = Vec16<D>;
  constexpr int kVec = V::kN;                            // elements per 16-byte vector
  constexpr int kNV = kAlign / (kLanesPerBlock * kVec);  // vectors per thread
  const int lane = threadIdx.x % kLanesPerBlock;
  const int64_t block_start = tile_start + (threadIdx.x / kLanesPerBlock) * kAlign;
  if (block_start >= t.numel) return;  // past the end of a tail tile
  typename D::Bits* p = static_cast<typename D::Bits*>(t.data);

  // Position in the Philox block of element e of vector v is (v * 8 + lane) * kVec + e.
  float x[kNV][kVec];
#pragma unroll
  for (int v = 0; v < kNV; ++v) {
    const int64_t i0 = block_start + (v * kLanesPerBlock + lane) * kVec;
    if (t.aligned && i0 + kVec <= t.numel) {
      V vec;
      vec.raw = load_global(reinterpret_cast<const uint4*>(p + i0));
#pragma unroll
      for (int e = 0; e < kVec; ++e) x[v][e] = D::load(vec.e[e]);
    } else {  // a tensor's ragged end, or a view that is not 16-byte aligned
#pragma unroll
      for (int e = 0; e < kVec; ++e) x[v][e] = i0 + e < t.numel ? D::load(load_global(p + i0 + e)) : 0.0f;
    }
  }

  float acc[kNV][kVec];
#pragma unroll
  for (int v = 0; v < kNV; ++v)
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[v][e] = 0.0f;

  const uint64_t g_block = static_cast<uint64_t>(t.offset + block_start);  // a multiple of 128
  for (int64_t i = 0; i < n_seeds; ++i) {
    const uint64_t seed = seeds[i];
    const float c = scales[1 + i];
    if (kDist == kRademacher) {
      const Words4 w = rademacher_words(seed, g_block >> 7);
#pragma unroll
      for (int v = 0; v < kNV; ++v) {
        const int bit0 = (v * kLanesPerBlock + lane) * kVec;  // this vector's first bit
        const uint32_t bits = pick(w, bit0 >> 5) >> (bit0 & 31);
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[v][e] = __fadd_rn(acc[v][e], (bits >> e) & 1u ? c : -c);
      }
    } else {
#pragma unroll
      for (int v = 0; v < kNV; ++v) {
        const uint64_t g = g_block + (v * kLanesPerBlock + lane) * kVec;
#pragma unroll
        for (int q = 0; q < kVec / 4; ++q) {
          const Float4 z = gaussian4(seed, (g >> 2) + q);
          acc[v][4 * q + 0] = __fadd_rn(acc[v][4 * q + 0], __fmul_rn(c, z.x));
          acc[v][4 * q + 1] = __fadd_rn(acc[v][4 * q + 1], __fmul_rn(c, z.y));
          acc[v][4 * q + 2] = __fadd_rn(acc[v][4 * q + 2], __fmul_rn(c, z.z));
          acc[v][4 * q + 3] = __fadd_rn(acc[v][4 * q + 3], __fmul_rn(c, z.w));
        }
      }
    }
  }

  const float alpha = scales[0];
#pragma unroll
  for (int v = 0; v < kNV; ++v) {
    const int64_t i0 = block_start + (v * kLanesPerBlock + lane) * kVec;
    if (t.aligned && i0 + kVec <= t.numel) {
      V vec;
#pragma unroll
      for (int e = 0; e < kVec; ++e) vec.e[e] = D::store(__fadd_rn(__fmul_rn(alpha, x[v][e]), acc[v][e]));
      store_global(reinterpret_cast<uint4*>(p + i0), vec.raw);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e)
        if (i0 + e < t.numel)
          store_global(p + i0 + e, D::store(__fadd_rn(__fmul_rn(alpha, x[v][e]), acc[v][e])));
    }
  }
}

// Register caps: the most resident blocks per SM that compile without spills on sm_90
// (Box-Muller holds more live values than the sign bits).
template <int kDist>
constexpr int kMinBlocksPerSM = kDist == kGaussian ? 3 : 4;

template <int kDist>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM<kDist>)
    noise_axpby_kernel(const void* table, int64_t n_tensors, int64_t n_seeds, int64_t n_tiles,
                       const float* scales) {
  const TableLayout layout = table_layout(n_tensors, n_seeds);
  const char* base = static_cast<const char*>(table);
  const TensorEntry* entries = reinterpret_cast<const TensorEntry*>(base);
  const int64_t* tile_begin = reinterpret_cast<const int64_t*>(base + layout.tile_begin);
  const uint64_t* seeds = reinterpret_cast<const uint64_t*>(base + layout.seeds);
  for (int64_t tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
    const int64_t k = tensor_of_tile(tile_begin, n_tensors, tile);
    const TensorEntry t = entries[k];
    const int64_t start = (tile - tile_begin[k]) * kTile;
    // the dtype is uniform across the block, so this branch never diverges
    if (t.dtype == kFloat32)
      tile_pass<F32, kDist>(t, start, seeds, n_seeds, scales);
    else if (t.dtype == kFloat16)
      tile_pass<F16, kDist>(t, start, seeds, n_seeds, scales);
    else
      tile_pass<BF16, kDist>(t, start, seeds, n_seeds, scales);
  }
}

}  // namespace

cudaError_t noise_axpby_launch(const void* table, int64_t n_tensors, int64_t n_seeds,
                               int64_t n_tiles, const float* scales, int distribution,
                               cudaStream_t stream) {
  if (distribution != kGaussian && distribution != kRademacher) return cudaErrorInvalidValue;
  if (n_tiles == 0) return cudaSuccess;
  const auto kernel =
      distribution == kGaussian ? noise_axpby_kernel<kGaussian> : noise_axpby_kernel<kRademacher>;
  int device = 0, sms = 0, per_sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0);
  if (err != cudaSuccess) return err;
  // One resident wave: more blocks would only queue, fewer would leave SMs idle.
  const int64_t wave = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
  const unsigned blocks = static_cast<unsigned>(n_tiles < wave ? n_tiles : wave);
  kernel<<<blocks, kThreads, 0, stream>>>(table, n_tensors, n_seeds, n_tiles, scales);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace zo
