// The argument checks both CUDA bindings make (noise_axpby_binding.cpp, exact_binding.cpp):
// host code against torch, so that each op rejects what the other would.
#pragma once

#include <ATen/ATen.h>

#include "../zo_noise.h"
#include "tensor_table.h"

namespace zo {
namespace cuda {

inline int distribution_code(c10::string_view distribution, const char* op) {
  if (distribution == "gaussian") return zo::kGaussian;
  TORCH_CHECK(distribution == "rademacher", op, ": unknown distribution ", distribution);
  return zo::kRademacher;
}

// `table` must be a buffer cuda_table packed for n_tensors tensors (uint8, on the GPU, 8-byte
// aligned, at least its entries' size).
inline void check_table(const at::Tensor& table, int64_t n_tensors, int64_t n_tiles, const char* op) {
  TORCH_CHECK(table.is_cuda() && table.scalar_type() == at::kByte && table.dim() == 1 &&
                  table.is_contiguous() && n_tensors >= 0 && n_tiles >= 0 &&
                  table.numel() >= static_cast<int64_t>(table_layout(n_tensors, 0).bytes) &&
                  reinterpret_cast<uintptr_t>(table.data_ptr()) % 8 == 0,
              op, ": table must be what cuda_table returned for ", n_tensors, " tensors");
}

}  // namespace cuda
}  // namespace zo
