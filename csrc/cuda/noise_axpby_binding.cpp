// Registers the CUDA kernel of zo_opt::noise_axpby_ (schema in csrc/cpu/noise_axpby_cpu.cpp):
// checks the arguments, packs the tensor table in pinned memory, uploads it on the current
// stream and launches. Nothing here waits for the device: the table copy is asynchronous
// and the scales stay in device memory.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "noise_axpby.cuh"
#include "tensor_table.h"

namespace {

int32_t table_dtype(at::ScalarType t, size_t k) {
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, "noise_axpby_: tensor ", k,
              " has dtype ", t, "; the cuda backend takes float32, float16 and bfloat16");
  return t == at::kFloat ? zo::cuda::kFloat32 : t == at::kHalf ? zo::cuda::kFloat16 : zo::cuda::kBFloat16;
}

void noise_axpby_cuda(at::TensorList params, at::IntArrayRef offsets, at::IntArrayRef seeds,
                      const at::Tensor& scales, c10::string_view distribution) {
  TORCH_CHECK(params.size() == offsets.size(), "noise_axpby_: ", params.size(), " tensors but ",
              offsets.size(), " offsets");
  const bool gaussian = distribution == "gaussian";
  TORCH_CHECK(gaussian || distribution == "rademacher", "noise_axpby_: unknown distribution ",
              distribution);
  TORCH_CHECK(scales.is_cuda() && scales.scalar_type() == at::kFloat && scales.dim() == 1 &&
                  scales.numel() == static_cast<int64_t>(seeds.size()) + 1,
              "noise_axpby_: scales must be a float32 CUDA vector [alpha, c_1..c_n] of length ",
              seeds.size() + 1);
  const at::Device device = scales.device();

  std::vector<zo::cuda::TensorEntry> entries;
  entries.reserve(params.size());
  for (size_t k = 0; k < params.size(); ++k) {
    const auto& p = params[k];
    TORCH_CHECK(p.device() == device && p.is_contiguous(), "noise_axpby_: tensor ", k,
                " must be a contiguous tensor on ", device, " (it is on ", p.device(), ")");
    TORCH_CHECK(offsets[k] >= 0 && offsets[k] % zo::kAlign == 0, "noise_axpby_: offset ", k,
                " must be a non-negative multiple of ", zo::kAlign);
    void* data = p.data_ptr();
    const bool aligned = reinterpret_cast<uintptr_t>(data) % 16 == 0;
    entries.push_back({data, p.numel(), offsets[k], table_dtype(p.scalar_type(), k), aligned});
  }
  // torch's int[] is signed; the seeds are the uint64 values with the same bits
  const std::vector<uint64_t> seeds_u64(seeds.begin(), seeds.end());

  const c10::cuda::CUDAGuard guard(device);
  const auto n = static_cast<int64_t>(entries.size());
  const auto q = static_cast<int64_t>(seeds_u64.size());
  const auto layout = zo::cuda::table_layout(n, q);
  at::Tensor host = at::empty({static_cast<int64_t>(layout.bytes)},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  const int64_t n_tiles = zo::cuda::pack_table(entries.data(), n, seeds_u64.data(), q, host.data_ptr());
  if (n_tiles == 0) return;
  // Pinned source + non_blocking: the copy is queued on the current stream, and torch keeps
  // the pinned block alive until it has run. The device table is freed to the same stream's
  // cache, so it is not reused before the kernel below has read it.
  const at::Tensor table = host.to(device, /*non_blocking=*/true);
  const at::Tensor sc = scales.contiguous();
  const cudaError_t err = zo::cuda::noise_axpby_launch(
      table.data_ptr(), n, q, n_tiles, sc.data_ptr<float>(),
      gaussian ? zo::kGaussian : zo::kRademacher, c10::cuda::getCurrentCUDAStream(device.index()));
  TORCH_CHECK(err == cudaSuccess, "noise_axpby_ (cuda): ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(zo_opt, CUDA, m) { m.impl("noise_axpby_", &noise_axpby_cuda); }
