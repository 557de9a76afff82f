// The metadata of one multi-tensor launch, as one flat buffer in device memory: which
// tensors, where their noise starts, which tiles of work belong to which tensor, and
// (list op only) the seeds. Torch-free and CUDA-free, so the binding packs it on the host,
// the kernel reads it on the device, and a plain g++ test checks the packing and the lookup.
//
//   [TensorEntry x n] [int64 tile_begin x (n + 1)] [uint64 seed x q]
//
// A prepared table (zo_opt::cuda_table) has q = 0: it depends only on the parameters, so it
// is built and uploaded once, and each pass passes its seeds as a device tensor.
//
// Only the per-tensor table travels (tens of bytes per tensor), not a per-chunk table: a
// block finds the tensor of its first tile by binary search in tile_begin and then walks
// forward (its tiles only increase), which is cheaper than one entry per tile.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../zo_noise.h"

namespace zo {
namespace cuda {

// A tile is the unit of work of one 256-thread block: 16 KB of data, 64 bytes a thread
// (4096 float32 or 8192 16-bit elements). Sizing it in bytes rather than elements gives
// 16-bit tensors the same loads in flight per thread as float32 (a fixed 4096-element tile
// left them half as much). Tiles start on a fresh Philox counter for both distributions
// because tensors start at multiples of kAlign (NOISE.md) and tiles at multiples of
// kAlign elements inside them.
constexpr int64_t kTileBytes = 16384;

enum DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

ZO_HD int64_t element_bytes(int32_t dtype) { return dtype == kFloat32 ? 4 : 2; }
ZO_HD int64_t tile_elements(int32_t dtype) { return kTileBytes / element_bytes(dtype); }
static_assert((kTileBytes / 4) % kAlign == 0, "tiles must start on a fresh Philox counter");

struct TensorEntry {
  void* data;
  int64_t numel;
  int64_t offset;   // global noise index of element 0, a multiple of kAlign
  int32_t dtype;    // a DType
  int32_t aligned;  // data is 16-byte aligned: full vectors may use 16-byte accesses
};

struct TableLayout {
  size_t tile_begin;  // byte offsets into the buffer
  size_t seeds;
  size_t bytes;
};

ZO_HD TableLayout table_layout(int64_t n_tensors, int64_t n_seeds) {
  TableLayout l;
  l.tile_begin = sizeof(TensorEntry) * static_cast<size_t>(n_tensors);
  l.seeds = l.tile_begin + sizeof(int64_t) * static_cast<size_t>(n_tensors + 1);
  l.bytes = l.seeds + sizeof(uint64_t) * static_cast<size_t>(n_seeds);
  return l;
}

ZO_HD int64_t tiles_of(int64_t numel, int32_t dtype) {
  return (numel + tile_elements(dtype) - 1) / tile_elements(dtype);
}

// Writes the table for `tensors` (its tile_begin and seeds parts) into `buffer`, which holds
// table_layout(n_tensors, n_seeds).bytes bytes aligned to 8; returns the total tile count.
// n_seeds may be 0 (a prepared table; `seeds` is then not read).
inline int64_t pack_table(const TensorEntry* tensors, int64_t n_tensors, const uint64_t* seeds,
                          int64_t n_seeds, void* buffer) {
  const TableLayout l = table_layout(n_tensors, n_seeds);
  char* base = static_cast<char*>(buffer);
  TensorEntry* entries = reinterpret_cast<TensorEntry*>(base);
  int64_t* tile_begin = reinterpret_cast<int64_t*>(base + l.tile_begin);
  uint64_t* seed_out = reinterpret_cast<uint64_t*>(base + l.seeds);
  int64_t tiles = 0;
  for (int64_t k = 0; k < n_tensors; ++k) {
    entries[k] = tensors[k];
    tile_begin[k] = tiles;
    tiles += tiles_of(tensors[k].numel, tensors[k].dtype);
  }
  tile_begin[n_tensors] = tiles;
  for (int64_t i = 0; i < n_seeds; ++i) seed_out[i] = seeds[i];
  return tiles;
}

// The tensor that owns `tile` (0 <= tile < tile_begin[n]): the last k with
// tile_begin[k] <= tile. Empty tensors own no tile and are never returned.
ZO_HD int64_t tensor_of_tile(const int64_t* tile_begin, int64_t n_tensors, int64_t tile) {
  int64_t lo = 0, hi = n_tensors;  // invariant: tile_begin[lo] <= tile < tile_begin[hi]
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (tile_begin[mid] <= tile)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

// The owner of `tile` given the owner k of an earlier tile (tile_begin[k] <= tile): the
// same answer as tensor_of_tile, by a forward walk. The kernel uses its own warp-wide
// version of this walk; this scalar one is the reference the host test checks.
ZO_HD int64_t advance_tensor(const int64_t* tile_begin, int64_t n_tensors, int64_t k, int64_t tile) {
  while (k + 1 < n_tensors && tile_begin[k + 1] <= tile) ++k;
  return k;
}

}  // namespace cuda
}  // namespace zo
