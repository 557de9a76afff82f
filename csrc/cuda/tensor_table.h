// The metadata of one multi-tensor launch, as one flat buffer in device memory: which
// tensors, where their noise starts, which tiles of work belong to which tensor, and the
// seeds. Torch-free and CUDA-free, so the binding packs it on the host, the kernel reads it
// on the device, and a plain g++ test checks the packing and the tile lookup.
//
//   [TensorEntry x n] [int64 tile_begin x (n + 1)] [uint64 seed x q]
//
// Only the per-tensor table travels (tens of bytes per tensor), not a per-chunk table: a
// block finds the tensor of a tile by binary search in tile_begin, which is cheaper than
// copying one entry per 4096 elements to the device on every pass.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../zo_noise.h"

namespace zo {
namespace cuda {

// Elements per tile: the unit of work of one thread block, 32 Philox blocks of 128. A tile
// starts on a fresh counter for both distributions because tensors start at multiples of
// kAlign (NOISE.md) and tiles at multiples of kTile inside them.
constexpr int64_t kTile = 4096;
static_assert(kTile % kAlign == 0, "tiles must start on a fresh Philox counter");

enum DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

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

ZO_HD int64_t tiles_of(int64_t numel) { return (numel + kTile - 1) / kTile; }

// Writes the table for `tensors` (its tile_begin and seeds parts) into `buffer`, which holds
// table_layout(n_tensors, n_seeds).bytes bytes aligned to 8; returns the total tile count.
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
    tiles += tiles_of(tensors[k].numel);
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

}  // namespace cuda
}  // namespace zo
