// CUDA backend, torch-free interface: one launch of
//
//   p[k][e] = scales[0] * p[k][e] + sum_i scales[1 + i] * z(seeds[i], offsets[k] + e)
//
// over every tensor of a table (tensor_table.h). The binding packs and uploads the table and
// picks the stream; this file and noise_axpby.cu need only the CUDA runtime, so CI
// compile-checks them with plain nvcc. The launch itself allocates nothing, copies nothing
// and never waits (the occupancy query is cached per device), so it can be graph-captured.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace zo {
namespace cuda {

// table: device pointer to a buffer packed by pack_table() (its seeds part, if any, is not
// read through `table`); n_tiles: what pack_table returned; seeds: device uint64 [n_seeds]
// (inside the list op's table, or a prepared path's seed tensor); scales: device float32
// [alpha, c_1 .. c_q], read by the kernel (no host sync); distribution: zo::kGaussian or
// zo::kRademacher. Returns the launch's error status.
cudaError_t noise_axpby_launch(const void* table, int64_t n_tensors, int64_t n_tiles,
                               const uint64_t* seeds, int64_t n_seeds, const float* scales,
                               int distribution, cudaStream_t stream);

}  // namespace cuda
}  // namespace zo
