// CUDA backend, torch-free interface of the exact pass (docs/EXACT.md): one launch over the
// tensors of a prepared table (tensor_table.h, built by zo_opt::cuda_table). Per element at
// global index g, with D the tensor's dtype and all arithmetic float32 round-to-nearest with
// no contraction:
//
//   s_old = +0 + a_1 z(old_1, g) + ...;  s_new = +0 + c_1 z(new_1, g) + ...   (seed order)
//   theta = p                                                   if n_old == 0
//         = bits[chunk_base[chunk] + #ESC before g in its chunk] if codes[g] == ESC
//         = sign(t) | (mag(t) + codes[g]),  t = RN_D(p - s_old)  otherwise
//   y = alpha * theta (+ s_new where s_new != 0);  p = RN_D(y), or SR_D(y) with rounding
//   codes[g] = special(theta) ? ESC : mag(theta) - mag(RN_D(p - s_new))       if encode
//
// The launch allocates nothing, copies nothing and never waits, so it can be graph-captured.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace zo {
namespace cuda {

// Every pointer is device memory on the launch's device; the kernel reads the seeds and
// scales itself (no host sync).
struct ExactArgs {
  const uint64_t* seeds;     // [n_old + n_new (+1: the rounding seed, last)]
  const float* scales;       // [1 + n_old + n_new]: alpha, a_1..a_n_old, c_1..c_n_new
  int8_t* codes;             // codes[g - code_base]; read when n_old > 0, written when encode
  const int32_t* chunk_base; // [(g - code_base) / 128] (read when n_old > 0)
  const int32_t* bits;       // the side table's raw bits (read when n_old > 0)
  int64_t code_base;         // a multiple of 128, <= every tensor's offset
  int32_t n_old;
  int32_t n_new;
  float tau;                 // special(theta) = !(|theta| >= tau) || |theta| > max(D) / 2
  int32_t encode;            // write the codes (alpha must be 1, no rounding)
  int32_t rounding;          // stochastic rounding for 16-bit dtypes (float32: nearest)
  int32_t codes_aligned;     // codes is 8-byte aligned: 4/8-code vector accesses allowed
};

// table / n_tensors / n_tiles: what cuda_table returned (as for noise_axpby_launch);
// distribution: zo::kGaussian or zo::kRademacher. Returns the launch's error status.
cudaError_t exact_launch(const void* table, int64_t n_tensors, int64_t n_tiles, const ExactArgs& args,
                         int distribution, cudaStream_t stream);

}  // namespace cuda
}  // namespace zo
