// CUDA backend, torch-free interface: one launch of
//
//   p[k][e] = scales[0] * p[k][e] + sum_i scales[1 + i] * z(seeds[i], offsets[k] + e)
//
// over every tensor of a table (tensor_table.h). The binding packs and uploads the table and
// picks the stream; this file and noise_axpby.cu need only the CUDA runtime, so CI
// compile-checks them with plain nvcc.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace zo {
namespace cuda {

// table: device pointer to a buffer packed by pack_table(); n_tiles: what pack_table
// returned; scales: device float32 [alpha, c_1 .. c_q], read by the kernel (no host sync);
// distribution: zo::kGaussian or zo::kRademacher. Returns the launch's error status.
cudaError_t noise_axpby_launch(const void* table, int64_t n_tensors, int64_t n_seeds,
                               int64_t n_tiles, const float* scales, int distribution,
                               cudaStream_t stream);

}  // namespace cuda
}  // namespace zo
