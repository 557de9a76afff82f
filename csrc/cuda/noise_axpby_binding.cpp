// Registers the CUDA kernels of three ops (schemas in csrc/cpu/noise_axpby_cpu.cpp):
//
//   noise_axpby_(Tensor(a!)[] params, int[] offsets, int[] seeds, Tensor scales,
//                str distribution) -> ()
//       The list op: checks the arguments, packs the tensor table and the seeds in pinned
//       memory, uploads them on the current stream and launches. Nothing waits for the
//       device, but each call packs and copies the table: fine for a few calls, not for
//       every pass of a training step (and not capturable in a CUDA graph).
//
//   cuda_table(Tensor[] params, int[] offsets) -> (Tensor table, int n_tiles)
//       The prepared path, once per parameter list: checks the tensors exactly as
//       noise_axpby_ does and returns the table (entries + tile_begin, no seeds) as a uint8
//       tensor on the params' device, and its tile count. The upload is synchronous (it
//       runs once). The table holds raw data pointers: the caller keeps the params alive
//       and rebuilds it when any of their storages changes (p.data = ...).
//
//   noise_axpby_table_(Tensor table, int n_tensors, int n_tiles, Tensor seeds,
//                      Tensor scales, str distribution) -> ()
//       One pass over the tensors of a cuda_table: params[k] = scales[0] * params[k] +
//       sum_i scales[1 + i] * z_k(seeds[i]). seeds: int64 CUDA vector [q] (the uint64 seeds'
//       bits); scales: float32 CUDA vector [1 + q], both contiguous on the table's device;
//       n_tensors: the length of the list the table was built from; n_tiles: what cuda_table
//       returned. It only checks tensor metadata and launches on the current stream: no
//       host<->device copy, no sync, no allocation, so it may be captured in a CUDA graph
//       (the graph then reads whatever seeds and scales hold at replay). It writes the
//       params, which are not among its arguments: it is an op with a side effect (eager
//       and graph capture only; not for tracing frameworks that drop unused results).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "binding_checks.h"
#include "noise_axpby.cuh"
#include "tensor_table.h"

namespace {

int32_t table_dtype(at::ScalarType t, size_t k, const char* op) {
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, op, ": tensor ", k,
              " has dtype ", t, "; the cuda backend takes float32, float16 and bfloat16");
  return t == at::kFloat ? zo::cuda::kFloat32 : t == at::kHalf ? zo::cuda::kFloat16 : zo::cuda::kBFloat16;
}

// The table entries of `params`, all on `device`.
std::vector<zo::cuda::TensorEntry> entries_of(at::TensorList params, at::IntArrayRef offsets,
                                              const at::Device& device, const char* op) {
  TORCH_CHECK(params.size() == offsets.size(), op, ": ", params.size(), " tensors but ",
              offsets.size(), " offsets");
  std::vector<zo::cuda::TensorEntry> entries;
  entries.reserve(params.size());
  for (size_t k = 0; k < params.size(); ++k) {
    const auto& p = params[k];
    TORCH_CHECK(p.device() == device && p.is_contiguous(), op, ": tensor ", k,
                " must be a contiguous tensor on ", device, " (it is on ", p.device(), ")");
    TORCH_CHECK(offsets[k] >= 0 && offsets[k] % zo::kAlign == 0, op, ": tensor ", k,
                "'s offset is ", offsets[k], "; it must be a non-negative multiple of ", zo::kAlign,
                " (as zo_opt.noise.offsets makes them, from a base_offset that is one too); "
                "the torch and triton backends take any offset");
    void* data = p.data_ptr();
    const bool aligned = reinterpret_cast<uintptr_t>(data) % 16 == 0;
    entries.push_back({data, p.numel(), offsets[k], table_dtype(p.scalar_type(), k, op), aligned});
  }
  return entries;
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, " (cuda): ", cudaGetErrorString(err));
}

void noise_axpby_cuda(at::TensorList params, at::IntArrayRef offsets, at::IntArrayRef seeds,
                      const at::Tensor& scales, c10::string_view distribution) {
  const char* op = "noise_axpby_";
  const int dist = zo::cuda::distribution_code(distribution, op);
  TORCH_CHECK(scales.is_cuda() && scales.scalar_type() == at::kFloat && scales.dim() == 1 &&
                  scales.numel() == static_cast<int64_t>(seeds.size()) + 1,
              "noise_axpby_: scales must be a float32 CUDA vector [alpha, c_1..c_n] of length ",
              seeds.size() + 1);
  const at::Device device = scales.device();
  const std::vector<zo::cuda::TensorEntry> entries = entries_of(params, offsets, device, op);
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
  const auto* seeds_dev =
      reinterpret_cast<const uint64_t*>(static_cast<const char*>(table.data_ptr()) + layout.seeds);
  check_launch(zo::cuda::noise_axpby_launch(table.data_ptr(), n, n_tiles, seeds_dev, q,
                                            sc.data_ptr<float>(), dist,
                                            c10::cuda::getCurrentCUDAStream(device.index())),
               op);
}

std::tuple<at::Tensor, int64_t> cuda_table(at::TensorList params, at::IntArrayRef offsets) {
  const char* op = "cuda_table";
  TORCH_CHECK(!params.empty(), op, ": no tensors");
  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cuda(), op, ": tensors must be on a CUDA device (got ", device, ")");
  const std::vector<zo::cuda::TensorEntry> entries = entries_of(params, offsets, device, op);
  const auto n = static_cast<int64_t>(entries.size());
  const auto layout = zo::cuda::table_layout(n, 0);
  at::Tensor host = at::empty({static_cast<int64_t>(layout.bytes)}, at::TensorOptions().dtype(at::kByte));
  const int64_t n_tiles = zo::cuda::pack_table(entries.data(), n, nullptr, 0, host.data_ptr());
  const c10::cuda::CUDAGuard guard(device);
  // Synchronous (pageable source): once per parameter list, and the table is then ready for
  // any stream.
  return {host.to(device), n_tiles};
}

void noise_axpby_table_cuda(const at::Tensor& table, int64_t n_tensors, int64_t n_tiles,
                            const at::Tensor& seeds, const at::Tensor& scales,
                            c10::string_view distribution) {
  const char* op = "noise_axpby_table_";
  const int dist = zo::cuda::distribution_code(distribution, op);
  const at::Device device = table.device();
  zo::cuda::check_table(table, n_tensors, n_tiles, op);
  TORCH_CHECK(seeds.device() == device && seeds.scalar_type() == at::kLong && seeds.dim() == 1 &&
                  seeds.is_contiguous(),
              op, ": seeds must be a contiguous int64 vector on ", device, " (got ",
              seeds.scalar_type(), " on ", seeds.device(), ")");
  TORCH_CHECK(scales.device() == device && scales.scalar_type() == at::kFloat && scales.dim() == 1 &&
                  scales.is_contiguous() && scales.numel() == seeds.numel() + 1,
              op, ": scales must be a contiguous float32 vector [alpha, c_1..c_q] on ", device,
              " of length ", seeds.numel() + 1, " (got ", scales.scalar_type(), " [",
              scales.numel(), "] on ", scales.device(), ")");
  if (n_tiles == 0) return;
  const c10::cuda::CUDAGuard guard(device);
  check_launch(zo::cuda::noise_axpby_launch(table.data_ptr(), n_tensors, n_tiles,
                                            reinterpret_cast<const uint64_t*>(seeds.data_ptr()),
                                            seeds.numel(), scales.data_ptr<float>(), dist,
                                            c10::cuda::getCurrentCUDAStream(device.index())),
               op);
}

}  // namespace

TORCH_LIBRARY_IMPL(zo_opt, CUDA, m) {
  m.impl("noise_axpby_", &noise_axpby_cuda);
  m.impl("cuda_table", &cuda_table);
  m.impl("noise_axpby_table_", &noise_axpby_table_cuda);
}
