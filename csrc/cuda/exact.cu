// CUDA backend kernel of the exact pass (docs/EXACT.md; interface in exact.cuh).
//
// The work split of noise_axpby.cu: 16 KB tiles of one tensor, walked grid-stride by
// 256-thread blocks (one resident wave); 8 threads share a 128-element Philox block, which is
// also one 128-element chunk of the side table (offsets and code_base are multiples of 128).
// Thread l of the 8 holds the 16-byte vectors l, l + 8, ... of its block (float32: 4 vectors
// of 4 in one block; 16-bit: 2 vectors of 8 in each of two blocks 32 groups apart).
//
// Per tile a thread:
// per Philox block (one table chunk):
//   1. issues its data loads, its codes (4 or 8 bytes a vector) and the chunk's chunk_base;
//   2. (decoding) counts the ESC codes before each of its elements in the chunk: a popcount
//      per vector, packed 8 bits a vector into one word, and an inclusive scan over the 8
//      lanes of the chunk (__shfl_up_sync, width 8);
//   3. s_old (or z once, when the old and new seed are one seed), decodes theta into the data
//      registers (ESC elements: loaded from the side table), s_new, then y, the rounding,
//      the store and the codes.
//
// Arithmetic: explicit __fadd_rn / __fsub_rn / __fmul_rn everywhere, so nothing is contracted
// into an FMA and the encode's RN(p - s_new) is the next decode's RN(p - s_old) bit for bit.
// The sums start from +0 in seed order, as the reference (zo_opt/exact.py) does.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../zo_noise.h"
#include "exact.cuh"
#include "pass_common.cuh"
#include "tensor_table.h"

namespace zo {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kVecsPerThread = 4;  // 16-byte vectors per thread and tile
constexpr int kEsc = -128;
static_assert(kThreads * kVecsPerThread * 16 == kTileBytes, "a tile is one pass of the block");
static_assert(kAlign == 128, "a Philox block of 128 elements is one table chunk");

// Element types. value(): raw bits (only the dtype's width is read) -> float32, exact; rn():
// float32 -> raw bits of RN_D (the hardware's cvt.rn); make(): raw bits -> the stored element.
struct F32 {
  using Bits = float;
  static constexpr uint32_t kMag = 0x7FFFFFFFu;
  static constexpr uint32_t kBigBits = 0x7EFFFFFFu;  // float32 bits of max(float32) / 2
  static constexpr bool kWide = true;
  __device__ static float value(uint32_t u) { return __uint_as_float(u); }
  __device__ static uint32_t rn(float v) { return __float_as_uint(v); }
  __device__ static float make(uint32_t u) { return __uint_as_float(u); }
};
struct F16 {
  using Bits = uint16_t;
  static constexpr uint32_t kMag = 0x7FFFu;
  static constexpr uint32_t kBigBits = 0x46FFE000u;  // 32752 = max(float16) / 2
  static constexpr bool kWide = false;
  __device__ static float value(uint32_t u) { return __half2float(__ushort_as_half(static_cast<unsigned short>(u))); }
  __device__ static uint32_t rn(float v) { return __half_as_ushort(__float2half_rn(v)); }
  __device__ static uint16_t make(uint32_t u) { return static_cast<uint16_t>(u); }
};
struct BF16 {
  using Bits = uint16_t;
  static constexpr uint32_t kMag = 0x7FFFu;
  static constexpr uint32_t kBigBits = 0x7EFF0000u;  // max(bfloat16) / 2
  static constexpr bool kWide = false;
  __device__ static float value(uint32_t u) { return __uint_as_float((u & 0xFFFFu) << 16); }
  __device__ static uint32_t rn(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
  __device__ static uint16_t make(uint32_t u) { return static_cast<uint16_t>(u); }
};

// A 16-byte vector of raw bits, elements read and written with shifts (as 32-bit words:
// a union of 16-bit elements let the compiler split it into one register per element).
template <typename D>
struct Vec16 {
  static constexpr int kN = 16 / sizeof(typename D::Bits);
  uint4 raw;
  __device__ __forceinline__ uint32_t word(int i) const {
    return i == 0 ? raw.x : i == 1 ? raw.y : i == 2 ? raw.z : raw.w;
  }
  __device__ __forceinline__ void set_word(int i, uint32_t u) {
    if (i == 0) raw.x = u; else if (i == 1) raw.y = u; else if (i == 2) raw.z = u; else raw.w = u;
  }
  // element e's raw bits, zero-extended
  __device__ __forceinline__ uint32_t get(int e) const {
    if (kN == 4) return word(e);
    return (word(e / 2) >> (16 * (e % 2))) & 0xFFFFu;
  }
  __device__ __forceinline__ void set(int e, uint32_t u) {
    if (kN == 4) {
      set_word(e, u);
    } else {
      const int sh = 16 * (e % 2);
      set_word(e / 2, (word(e / 2) & ~(0xFFFFu << sh)) | ((u & 0xFFFFu) << sh));
    }
  }
};

// The codes of one vector, 4 (float32) or 8 (16-bit) bytes, kept packed in 32-bit words
// (byte e of word e / 4) and unpacked only where used: one register per 4 codes.
template <int kVec>
struct Codes {
  uint32_t w[kVec / 4];
  __device__ __forceinline__ int32_t get(int e) const {  // sign-extended code e
    return static_cast<int32_t>(w[e / 4] << (24 - 8 * (e % 4))) >> 24;
  }
  __device__ __forceinline__ bool esc(int e) const { return ((w[e / 4] >> (8 * (e % 4))) & 0xFFu) == 0x80u; }
};

__device__ __forceinline__ uint32_t load_bits(const float* p) { return __float_as_uint(load_global(p)); }
__device__ __forceinline__ uint32_t load_bits(const uint16_t* p) { return load_global(p); }
__device__ __forceinline__ uint32_t load_u32(const void* p) {
  uint32_t v;
  asm volatile("ld.global.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}
__device__ __forceinline__ uint2 load_u32x2(const void* p) {
  uint2 v;
  asm volatile("ld.global.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}
__device__ __forceinline__ uint32_t load_u8(const void* p) {
  uint32_t v;
  asm volatile("ld.global.u8 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}
__device__ __forceinline__ void store_u32(void* p, uint32_t v) {
  asm volatile("st.global.u32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void store_u32x2(void* p, uint32_t a, uint32_t b) {
  asm volatile("st.global.v2.u32 [%0], {%1, %2};" :: "l"(p), "r"(a), "r"(b) : "memory");
}
__device__ __forceinline__ void store_u8(void* p, uint32_t v) {
  asm volatile("st.global.u8 [%0], %1;" :: "l"(p), "r"(v) : "memory");
}

template <int kVec>
__device__ __forceinline__ void load_codes(Codes<kVec>& c, const int8_t* p) {
  if constexpr (kVec == 4) {
    c.w[0] = load_u32(p);
  } else {
    const uint2 v = load_u32x2(p);
    c.w[0] = v.x;
    c.w[kVec / 4 - 1] = v.y;
  }
}
template <int kVec>
__device__ __forceinline__ void store_codes(int8_t* p, const Codes<kVec>& c) {
  if constexpr (kVec == 4)
    store_u32(p, c.w[0]);
  else
    store_u32x2(p, c.w[0], c.w[kVec / 4 - 1]);
}

// Stochastic rounding of docs/EXACT.md (zo_opt.exact.stochastic_round), on raw bits.
template <typename D>
__device__ __forceinline__ uint32_t sr_bits(float y, uint32_t word) {
  const uint32_t r = D::rn(y);
  const float ay = fabsf(y);
  const bool over = fabsf(D::value(r)) > ay;  // rounded away from zero: one step back
  const uint32_t lo = over ? r - 1u : r;
  const uint32_t hi = lo + 1u;
  const float lo_f = fabsf(D::value(lo));
  const float hi_f = fabsf(D::value(hi));
  const float u = __fmul_rn(__uint2float_rn(word >> 8), 5.9604644775390625e-08f);  // 2^-24
  const bool up = __fsub_rn(ay, lo_f) > __fmul_rn(u, __fsub_rn(hi_f, lo_f));
  const bool finite = (__float_as_uint(y) & 0x7FFFFFFFu) < 0x7F800000u;
  return finite ? (up ? hi : lo) : r;
}

// 8-bit field k of a packed count word.
__device__ __forceinline__ int field(uint32_t w, int k) { return static_cast<int>((w >> (8 * k)) & 0xFFu); }

// One thread's share of one tile, one Philox block (= table chunk) at a time: float32 threads
// have one, 16-bit threads two, 32 groups apart. Called by every thread of the block, past
// the tensor's end included: the ESC scan shuffles among the 8 lanes of each chunk.
//
// kMode: kPlain (n_old == 0: theta = p), kDecode (theta from the codes and s_old), kPair
// (kDecode with one old and one new seed that are the same seed: z is made once).
//
// Not inlined: each (dtype, mode) instantiation is register-allocated on its own. Inlined
// into the kernel's tile loop, the three dtypes' paths shared one allocation and took 176-198
// registers (ptxas, sm_90; one resident block per SM, 8 warps: too few loads in flight for a
// stream); on their own they take 90-128, no spills, so the kernel fits two blocks per SM.
// One call per tile (16 KB), with the entry by value and the args read in place (the kernel
// takes them __grid_constant__): no stack frame.
enum Mode : int { kPlain = 0, kDecode = 1, kPair = 2 };

template <typename D, int kDist, int kMode>
__device__ __noinline__ void exact_tile(const TensorEntry t, int64_t tile_start, const ExactArgs& a) {
  constexpr bool decode = kMode != kPlain;
  constexpr bool pair = kMode == kPair;
  using V = Vec16<D>;
  constexpr int kVec = V::kN;                            // elements per 16-byte vector
  constexpr int kNV = kAlign / (kLanesPerBlock * kVec);  // vectors per thread and Philox block
  constexpr int kPB = kVecsPerThread / kNV;              // Philox blocks per thread: 1 or 2
  constexpr int kGroups = kThreads / kLanesPerBlock;
  constexpr int kTileElems = kPB * kGroups * kAlign;
  static_assert(kNV <= 4 && kNV * kVec <= 32, "packed per-vector counts and masks");
  const int lane = threadIdx.x % kLanesPerBlock;
  const int group = threadIdx.x / kLanesPerBlock;
  const int first = group * kAlign + lane * kVec;  // this thread's first element in the tile
  const int64_t left = t.numel - tile_start;       // >= 1
  const int rem = static_cast<int>(left < kTileElems ? left : kTileElems) - first;  // may be < 0
  typename D::Bits* q = static_cast<typename D::Bits*>(t.data) + tile_start + first;
  const bool aligned = t.aligned;
  // this thread's first element as a position in codes (its chunk: (pos - lane * kVec) >> 7)
  const int64_t pos = t.offset - a.code_base + tile_start + first;
  int8_t* cq = a.codes + pos;
  const float alpha = a.scales[0];
  const bool round16 = a.rounding && !D::kWide;
  const uint64_t g_first = static_cast<uint64_t>(t.offset + tile_start + group * kAlign);

#pragma unroll
  for (int b = 0; b < kPB; ++b) {
    // whether this thread has elements in block b (whole chunks past the end do not exist in
    // the table; threads there still take part in the scan, with no ESC)
    const bool live = b * kGroups * kAlign - lane * kVec < rem;
    // 1. Loads: data, then (decoding) the codes and the chunk's chunk_base entry.
    V x[kNV];
#pragma unroll
    for (int v = 0; v < kNV; ++v) {
      const int o = at<kVec, kGroups>(b, v);
      if (aligned && o + kVec <= rem) {
        x[v].raw = load_global(reinterpret_cast<const uint4*>(q + o));
      } else {  // a tensor's ragged end, or a view that is not 16-byte aligned
        x[v].raw = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
        for (int e = 0; e < kVec; ++e)
          if (o + e < rem) x[v].set(e, load_bits(q + o + e));
      }
    }
    Codes<kVec> code[kNV];
    int32_t chunk_base = 0;
#pragma unroll
    for (int v = 0; v < kNV; ++v)
#pragma unroll
      for (int w = 0; w < kVec / 4; ++w) code[v].w[w] = 0u;
    if (decode) {
#pragma unroll
      for (int v = 0; v < kNV; ++v) {
        const int o = at<kVec, kGroups>(b, v);
        if (a.codes_aligned && o + kVec <= rem) {
          load_codes<kVec>(code[v], cq + o);
        } else {
#pragma unroll
          for (int e = 0; e < kVec; ++e)
            if (o + e < rem) code[v].w[e / 4] |= (load_u8(cq + o + e) & 0xFFu) << (8 * (e % 4));
        }
      }
      if (live)
        chunk_base = static_cast<int32_t>(
            load_u32(a.chunk_base + ((pos - lane * kVec + b * kGroups * kAlign) >> 7)));
    }

    // 2. ESC elements (decoding): how many ESC codes of the chunk precede each vector of this
    // lane: a popcount per vector, 8 bits a vector in one word, scanned over the 8 lanes.
    uint32_t esc = 0u;       // bit v * kVec + e: element e of vector v is ESC
    uint32_t exclusive = 0;  // 8 bits per vector: ESC codes of that vector in lanes before this one
    uint32_t total = 0;      // 8 bits per vector: ESC codes of that vector in all 8 lanes
    if (decode) {
      uint32_t counts = 0;
#pragma unroll
      for (int v = 0; v < kNV; ++v) {
        uint32_t m = 0;
#pragma unroll
        for (int e = 0; e < kVec; ++e) m |= (code[v].esc(e) ? 1u : 0u) << e;
        esc |= m << (v * kVec);
        counts += static_cast<uint32_t>(__popc(m)) << (8 * v);
      }
      uint32_t inclusive = counts;
#pragma unroll
      for (int d = 1; d < kLanesPerBlock; d *= 2) {
        const uint32_t up = __shfl_up_sync(0xFFFFFFFFu, inclusive, d, kLanesPerBlock);
        if (lane >= d) inclusive += up;
      }
      total = __shfl_sync(0xFFFFFFFFu, inclusive, kLanesPerBlock - 1, kLanesPerBlock);
      exclusive = inclusive - counts;  // fieldwise (at most 64 a field): no borrows
    }
    if (!live) continue;  // (no shuffle below)

    // 3. theta (decoding), then the new value and its code.
    const uint64_t g_block = g_first + b * kGroups * kAlign;  // a multiple of 128
    float acc[kNV][kVec];
    if (decode) {
      // pair: acc = z of the one seed, and s_old = +0 + a_1 z is formed per element
      noise_sum<kDist>(acc, a.seeds, a.scales + 1, pair ? 1 : a.n_old, pair, g_block, lane);
      const float a1 = a.scales[1];
      int before = chunk_base;  // ESC codes of the chunk before vector v of lane 0
#pragma unroll
      for (int v = 0; v < kNV; ++v) {
        const uint32_t m = (esc >> (v * kVec)) & ((1u << kVec) - 1u);
        const int mine = before + field(exclusive, v);
        before += field(total, v);
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          if ((m >> e) & 1u) {  // theta from the side table
            x[v].set(e, load_u32(a.bits + (mine + __popc(m & ((1u << e) - 1u)))));
          } else {  // theta = sign(t) | (mag(t) + code), t = RN(p - s_old)
            const float s_old = pair ? __fadd_rn(0.0f, __fmul_rn(a1, acc[v][e])) : acc[v][e];
            const uint32_t tb = D::rn(__fsub_rn(D::value(x[v].get(e)), s_old));
            const uint32_t mag = (tb & D::kMag) + static_cast<uint32_t>(code[v].get(e));
            x[v].set(e, (tb & ~D::kMag) | mag);
          }
        }
      }
    }
    if (!pair)
      noise_sum<kDist>(acc, a.seeds + a.n_old, a.scales + 1 + a.n_old, a.n_new, false, g_block, lane);
    const float c1 = pair ? a.scales[2] : 0.0f;
#pragma unroll
    for (int v = 0; v < kNV; ++v) {
      const int o = at<kVec, kGroups>(b, v);
      const uint64_t g = g_block + (v * kLanesPerBlock + lane) * kVec;
      V out;
      out.raw = make_uint4(0u, 0u, 0u, 0u);
      Codes<kVec> enc;
#pragma unroll
      for (int h = 0; h < kVec / 4; ++h) {
        enc.w[h] = 0u;
        // the rounding words of elements 4h .. 4h+3: Philox(rounding seed, g / 4 + h)
        Words4 w = {0u, 0u, 0u, 0u};
        if (round16) w = philox4x32_10((g >> 2) + h, a.seeds[a.n_old + a.n_new]);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int e = 4 * h + j;
          const uint32_t theta_bits = x[v].get(e);
          const float theta = D::value(theta_bits);
          const float s_new = pair ? __fadd_rn(0.0f, __fmul_rn(c1, acc[v][e])) : acc[v][e];
          float y = __fmul_rn(alpha, theta);
          if (s_new != 0.0f) y = __fadd_rn(y, s_new);  // -0 + 0 would lose the sign of -0
          const uint32_t ob = round16 ? sr_bits<D>(y, pick(w, j)) : D::rn(y);
          out.set(e, ob);
          if (a.encode) {
            const float at_ = fabsf(theta);
            const bool special = decode ? ((esc >> (v * kVec + e)) & 1u) != 0u
                                        : (!(at_ >= a.tau) || at_ > __uint_as_float(D::kBigBits));
            const uint32_t t2 = D::rn(__fsub_rn(D::value(ob), s_new));
            const int32_t k = static_cast<int32_t>(theta_bits & D::kMag) - static_cast<int32_t>(t2 & D::kMag);
            enc.w[h] |= ((special ? static_cast<uint32_t>(kEsc) : static_cast<uint32_t>(k)) & 0xFFu) << (8 * j);
          }
        }
      }
      if (aligned && o + kVec <= rem) {
        store_global(reinterpret_cast<uint4*>(q + o), out.raw);
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e)
          if (o + e < rem) store_global(q + o + e, D::make(out.get(e)));
      }
      if (a.encode) {
        if (a.codes_aligned && o + kVec <= rem) {
          store_codes<kVec>(cq + o, enc);
        } else {
#pragma unroll
          for (int e = 0; e < kVec; ++e)
            if (o + e < rem) store_u8(cq + o + e, (enc.w[e / 4] >> (8 * (e % 4))) & 0xFFu);
        }
      }
    }
  }
}

template <typename D, int kDist, bool kDecoding>
__device__ __forceinline__ void dispatch_mode(const TensorEntry& t, int64_t start, const ExactArgs& a, int mode) {
  if constexpr (!kDecoding)
    exact_tile<D, kDist, kPlain>(t, start, a);
  else if (mode == kPair)
    exact_tile<D, kDist, kPair>(t, start, a);
  else
    exact_tile<D, kDist, kDecode>(t, start, a);
}

// Two resident 256-thread blocks per SM (a 128-register cap): the most that compiles without
// spills (ptxas -v, sm_80 and sm_90); a cap of three (80 registers) spills 100-136 bytes in the
// Gaussian decoding paths.
constexpr int kMinBlocksPerSM = 2;

// kDecoding: n_old > 0 (known on the host); one kernel per case keeps each one's register
// allocation to its own paths.
template <int kDist, bool kDecoding>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    exact_kernel(const void* table, int64_t n_tensors, int64_t n_tiles, const __grid_constant__ ExactArgs args) {
  const char* base = static_cast<const char*>(table);
  const TensorEntry* entries = reinterpret_cast<const TensorEntry*>(base);
  const int64_t* tile_begin =
      reinterpret_cast<const int64_t*>(base + table_layout(n_tensors, 0).tile_begin);
  // one old and one new seed that are the same seed: z is made once
  const int mode = !kDecoding ? kPlain
                   : args.n_old == 1 && args.n_new == 1 && args.seeds[0] == args.seeds[1] ? kPair
                                                                                          : kDecode;
  int64_t k = tensor_of_tile(tile_begin, n_tensors, blockIdx.x);
  for (int64_t tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
    k = advance_owner(tile_begin, n_tensors, k, tile);
    const TensorEntry t = entries[k];
    const int64_t start = (tile - tile_begin[k]) * tile_elements(t.dtype);
    // dtype and mode are uniform across the block: these branches never diverge
    if (t.dtype == kFloat32)
      dispatch_mode<F32, kDist, kDecoding>(t, start, args, mode);
    else if (t.dtype == kFloat16)
      dispatch_mode<F16, kDist, kDecoding>(t, start, args, mode);
    else
      dispatch_mode<BF16, kDist, kDecoding>(t, start, args, mode);
  }
}

}  // namespace

cudaError_t exact_launch(const void* table, int64_t n_tensors, int64_t n_tiles, const ExactArgs& args,
                         int distribution, cudaStream_t stream) {
  if (distribution != kGaussian && distribution != kRademacher) return cudaErrorInvalidValue;
  if (n_tiles == 0) return cudaSuccess;
  const bool decoding = args.n_old > 0;
  const auto kernel = distribution == kGaussian
                          ? (decoding ? exact_kernel<kGaussian, true> : exact_kernel<kGaussian, false>)
                          : (decoding ? exact_kernel<kRademacher, true> : exact_kernel<kRademacher, false>);
  int wave = 0;
  const cudaError_t err = wave_blocks<4, kThreads>(2 * distribution + (decoding ? 1 : 0),
                                                   reinterpret_cast<const void*>(kernel), &wave);
  if (err != cudaSuccess) return err;
  const unsigned blocks = static_cast<unsigned>(n_tiles < wave ? n_tiles : wave);
  kernel<<<blocks, kThreads, 0, stream>>>(table, n_tensors, n_tiles, args);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace zo
