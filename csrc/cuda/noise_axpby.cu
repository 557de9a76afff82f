// CUDA backend kernel: one pass of NOISE.md's schedule over every tensor of a table.
//
// Work split: a tile is 16 KB of one tensor (tensor_table.h: 4096 float32 or 8192 16-bit
// elements, whole Philox blocks of 128); a 256-thread block walks tiles grid-stride, the
// grid sized to fill the SMs once. Inside a tile, 8 threads share one Philox block: thread
// l of the 8 takes the 16-byte vectors l, l + 8, l + 16, ... of that block, so each load
// instruction of 8 threads reads one contiguous 128-byte segment, and each thread draws its
// Rademacher bits with a single Philox call per seed and block. A float32 thread holds 4
// vectors of one Philox block; a 16-bit thread 2 vectors in each of two blocks, 32 groups
// apart, so that every load instruction of a warp still covers whole 128-byte lines.
// Gaussian vectors start at multiples of 4 elements, so each takes whole gaussian4 calls.
//
// Why 64 bytes a thread, all loaded before any Philox work: the pass is a stream, and at
// ~1 us DRAM latency an H200 SM needs ~32 KB of reads in flight to keep its share of the
// bandwidth. The loads do not depend on the noise, so issuing all of them first lets the
// Philox/Box-Muller work of the tile run under their latency; with 3-4 resident blocks that
// is 48-64 KB per SM for every dtype (16-bit types had half that with 16 elements a thread).
//
// Arithmetic follows the torch reference backend operation by operation, with explicit
// round-to-nearest multiplies and adds (no FMA contraction): acc = 0; acc += c_i * z_i in
// seed order; p = alpha * p + acc. Rademacher results are then bit-identical to it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../zo_noise.h"
#include "noise_axpby.cuh"
#include "pass_common.cuh"
#include "tensor_table.h"

namespace zo {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kVecsPerThread = 4;  // 16-byte vectors per thread and tile
static_assert(kThreads * kVecsPerThread * 16 == kTileBytes, "a tile is one pass of the block");

// Element types: how a stored element becomes float32 and back (round to nearest even, by
// the hardware's cvt.rn, which returns NaNs canonical: zo_noise.h's bit arithmetic took ~3
// more instructions an element in the bfloat16 path).
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
  __device__ static uint16_t store(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
};

template <typename D>
union Vec16 {
  static constexpr int kN = 16 / sizeof(typename D::Bits);
  uint4 raw;
  typename D::Bits e[kN];
};

// One thread's share of one tile: its vectors, read once, all before the noise, written once.
template <typename D, int kDist>
__device__ __forceinline__ void tile_pass(const TensorEntry& t, int64_t tile_start,
                                          const uint64_t* seeds, int64_t n_seeds,
                                          const float* scales) {
  using V = Vec16<D>;
  constexpr int kVec = V::kN;                            // elements per 16-byte vector
  constexpr int kNV = kAlign / (kLanesPerBlock * kVec);  // vectors per thread and Philox block
  constexpr int kPB = kVecsPerThread / kNV;              // Philox blocks per thread: 1 or 2
  constexpr int kGroups = kThreads / kLanesPerBlock;     // Philox blocks per tile and per kPB
  constexpr int kTileElems = kPB * kGroups * kAlign;
  static_assert(kTileElems * static_cast<int>(sizeof(typename D::Bits)) == kTileBytes,
                "a tile is one pass of the block");
  const int lane = threadIdx.x % kLanesPerBlock;
  const int group = threadIdx.x / kLanesPerBlock;
  // One base pointer and one element count per thread, and every vector at a compile-time
  // offset from them: the accesses take immediate offsets and the bounds checks compare
  // against constants. Per-vector 64-bit addresses kept live across the noise loop made the
  // Gaussian 16-bit paths spill their loaded data (a spill store waits for the load, which
  // serialized the very latency the early loads are meant to hide).
  const int first = group * kAlign + lane * kVec;  // this thread's first element in the tile
  const int64_t left = t.numel - tile_start;       // >= 1
  const int rem = static_cast<int>(left < kTileElems ? left : kTileElems) - first;  // may be < 0
  typename D::Bits* q = static_cast<typename D::Bits*>(t.data) + tile_start + first;
  const bool aligned = t.aligned;

  // Kept as stored bits (converted at the end): 16 registers for every dtype, where floats
  // would double them for the 16-bit types.
  V x[kPB][kNV];
#pragma unroll
  for (int b = 0; b < kPB; ++b)
#pragma unroll
    for (int v = 0; v < kNV; ++v) {
      const int o = at<kVec, kGroups>(b, v);
      if (aligned && o + kVec <= rem) {
        x[b][v].raw = load_global(reinterpret_cast<const uint4*>(q + o));
      } else {  // a tensor's ragged end, or a view that is not 16-byte aligned
#pragma unroll
        for (int e = 0; e < kVec; ++e)
          x[b][v].e[e] = o + e < rem ? load_global(q + o + e) : typename D::Bits(0);
      }
    }

  // The Philox blocks one after the other: holding one block's accumulators at a time keeps
  // the 16-bit path at the float32 path's register count (and so its occupancy).
  const uint64_t g_first = static_cast<uint64_t>(t.offset + tile_start + group * kAlign);
#pragma unroll
  for (int b = 0; b < kPB; ++b) {
    // past the end of a tail tile (and so are this thread's later blocks)
    if (b * kGroups * kAlign - lane * kVec >= rem) return;

    float acc[kNV][kVec];
    const uint64_t g_block = g_first + b * kGroups * kAlign;  // a multiple of 128
    noise_sum<kDist>(acc, seeds, scales + 1, n_seeds, false, g_block, lane);

    const float alpha = scales[0];
#pragma unroll
    for (int v = 0; v < kNV; ++v) {
      const int o = at<kVec, kGroups>(b, v);
      V out;
#pragma unroll
      for (int e = 0; e < kVec; ++e)
        out.e[e] = D::store(__fadd_rn(__fmul_rn(alpha, D::load(x[b][v].e[e])), acc[v][e]));
      if (aligned && o + kVec <= rem) {
        store_global(reinterpret_cast<uint4*>(q + o), out.raw);
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e)
          if (o + e < rem) store_global(q + o + e, out.e[e]);
      }
    }
  }
}

// Register caps: the most resident blocks per SM that compile without spills on sm_90
// (Box-Muller holds more live values than the sign bits).
template <int kDist>
constexpr int kMinBlocksPerSM = kDist == kGaussian ? 3 : 4;

template <int kDist>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM<kDist>)
    noise_axpby_kernel(const void* table, int64_t n_tensors, int64_t n_tiles,
                       const uint64_t* seeds, int64_t n_seeds, const float* scales) {
  const char* base = static_cast<const char*>(table);
  const TensorEntry* entries = reinterpret_cast<const TensorEntry*>(base);
  const int64_t* tile_begin =
      reinterpret_cast<const int64_t*>(base + table_layout(n_tensors, 0).tile_begin);
  int64_t k = tensor_of_tile(tile_begin, n_tensors, blockIdx.x);  // once per block
  for (int64_t tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
    k = advance_owner(tile_begin, n_tensors, k, tile);
    const TensorEntry t = entries[k];
    const int64_t start = (tile - tile_begin[k]) * tile_elements(t.dtype);
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

cudaError_t noise_axpby_launch(const void* table, int64_t n_tensors, int64_t n_tiles,
                               const uint64_t* seeds, int64_t n_seeds, const float* scales,
                               int distribution, cudaStream_t stream) {
  if (distribution != kGaussian && distribution != kRademacher) return cudaErrorInvalidValue;
  if (n_tiles == 0) return cudaSuccess;
  const auto kernel =
      distribution == kGaussian ? noise_axpby_kernel<kGaussian> : noise_axpby_kernel<kRademacher>;
  int wave = 0;
  const cudaError_t err = wave_blocks<2, kThreads>(distribution, reinterpret_cast<const void*>(kernel), &wave);
  if (err != cudaSuccess) return err;
  // One resident wave: more blocks would only queue, fewer would leave SMs idle.
  const unsigned blocks = static_cast<unsigned>(n_tiles < wave ? n_tiles : wave);
  kernel<<<blocks, kThreads, 0, stream>>>(table, n_tensors, n_tiles, seeds, n_seeds, scales);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace zo
