// What the CUDA pass kernels (noise_axpby.cu, exact.cu) share: the weak global accesses,
// the thread layout inside a Philox block, the noise sum of one Philox block (device code,
// all inlined, so each kernel compiles to what it did with its own copies), and the size of
// a launch's grid. Internal linkage: each kernel file has its own copy (and its own cache).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../zo_noise.h"

namespace zo {
namespace cuda {
namespace {

constexpr int kLanesPerBlock = 8;  // threads sharing one Philox block of kAlign elements

// Explicitly global accesses: the tensor table hands the kernels generic pointers, and plain
// dereferences of those compile to generic loads/stores instead of LDG/STG. Plain ld/st.global
// (weak, default caching: LDG.E.128 / STG.E.128, what torch's copy kernels issue) rather than
// __ldca/__stwb, whose explicit cache operators compile to strong (STRONG.SM) accesses that
// these passes have no use for: every element is read and written by one thread only.
// volatile keeps the loads where they are written, ahead of the noise work.
__device__ __forceinline__ uint4 load_global(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
__device__ __forceinline__ float load_global(const float* p) {
  float v;
  asm volatile("ld.global.f32 %0, [%1];" : "=f"(v) : "l"(p));
  return v;
}
__device__ __forceinline__ uint16_t load_global(const uint16_t* p) {
  unsigned short v;
  asm volatile("ld.global.u16 %0, [%1];" : "=h"(v) : "l"(p));
  return v;
}
__device__ __forceinline__ void store_global(uint4* p, uint4 v) {
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};"
               :: "l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
}
__device__ __forceinline__ void store_global(float* p, float v) {
  asm volatile("st.global.f32 [%0], %1;" :: "l"(p), "f"(v) : "memory");
}
__device__ __forceinline__ void store_global(uint16_t* p, uint16_t v) {
  asm volatile("st.global.u16 [%0], %1;" :: "l"(p), "h"(static_cast<unsigned short>(v)) : "memory");
}

__device__ __forceinline__ uint32_t pick(const Words4& w, int i) {
  return i == 0 ? w.w0 : i == 1 ? w.w1 : i == 2 ? w.w2 : w.w3;
}

// Offset of vector v of the thread's Philox block b from the thread's first element: block b
// is kGroups blocks after block 0 (so a warp's load instruction covers whole 128-byte lines),
// and vector v is 8 vectors after vector v - 1 (the 8 threads of a block interleave).
template <int kVec, int kGroups>
__device__ __forceinline__ constexpr int at(int b, int v) {
  return b * kGroups * kAlign + v * kLanesPerBlock * kVec;
}

// acc = +0 + c_0 z(seed_0) + c_1 z(seed_1) + ... over the thread's elements of one Philox
// block, with round-to-nearest adds and multiplies in seed order, as the torch reference
// (c_i = 1 when `unit`: acc is then z itself, up to the sign of a zero). The count keeps
// its caller's type (Count), so each kernel's seed loop compiles as it did on its own.
template <int kDist, int kNV, int kVec, typename Count>
__device__ __forceinline__ void noise_sum(float (&acc)[kNV][kVec], const uint64_t* seeds,
                                          const float* coefs, Count n, bool unit,
                                          uint64_t g_block, int lane) {
#pragma unroll
  for (int v = 0; v < kNV; ++v)
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[v][e] = 0.0f;
  for (Count i = 0; i < n; ++i) {
    const uint64_t seed = seeds[i];
    const float c = unit ? 1.0f : coefs[i];
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
        for (int h = 0; h < kVec / 4; ++h) {
          const Float4 z = gaussian4(seed, (g >> 2) + h);
          acc[v][4 * h + 0] = __fadd_rn(acc[v][4 * h + 0], __fmul_rn(c, z.x));
          acc[v][4 * h + 1] = __fadd_rn(acc[v][4 * h + 1], __fmul_rn(c, z.y));
          acc[v][4 * h + 2] = __fadd_rn(acc[v][4 * h + 2], __fmul_rn(c, z.z));
          acc[v][4 * h + 3] = __fadd_rn(acc[v][4 * h + 3], __fmul_rn(c, z.w));
        }
      }
    }
  }
}

// The owner of `tile`, given the owner k of an earlier tile of this block: 32 candidates per
// round, one load per lane, and a ballot. A block's tiles only increase, so this is usually
// one round of L1 hits, where a binary search per tile was a chain of ~log2(n) dependent
// loads (9 at 388 tensors) with no data loads of the block in flight. Call with the whole
// warp (the tile loop is uniform across the block).
__device__ __forceinline__ int64_t advance_owner(const int64_t* tile_begin, int64_t n_tensors,
                                                 int64_t k, int64_t tile) {
  const int l = threadIdx.x % 32;
  for (;;) {
    const int64_t j = k + 1 + l;
    // tile_begin[n_tensors] is the tile count, past every tile: lanes from there on say "past"
    const bool past = j >= n_tensors || tile_begin[j] > tile;
    const unsigned m = __ballot_sync(0xffffffffu, past);
    if (m != 0) return k + (__ffs(m) - 1);  // the first tensor starting after `tile`, less one
    k += 32;
  }
}

// Blocks in one resident wave of `kernel` (variant `which` < kVariants of this file's kernel)
// of kThreads threads on the current device. The occupancy query costs a few microseconds and
// its answer never changes for a device, so it is asked once per device and variant (the
// prepared paths launch every pass, hundreds of times a step).
template <int kVariants, int kThreads>
cudaError_t wave_blocks(int which, const void* kernel, int* out) {
  constexpr int kMaxDevices = 64;
  static int cache[kMaxDevices][kVariants] = {};  // 0: not asked yet; a benign race (same answer)
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  int* slot = device < kMaxDevices ? &cache[device][which] : nullptr;
  if (slot != nullptr && *slot > 0) {
    *out = *slot;
    return cudaSuccess;
  }
  int sms = 0, per_sm = 0;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0);
  if (err != cudaSuccess) return err;
  *out = sms * (per_sm > 0 ? per_sm : 1);
  if (slot != nullptr) *slot = *out;
  return cudaSuccess;
}

}  // namespace
}  // namespace cuda
}  // namespace zo
