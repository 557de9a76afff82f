// Registers the CUDA kernel of the prepared exact pass (schema in csrc/cpu/noise_axpby_cpu.cpp):
//
//   noise_axpby_exact_table_(Tensor table, int n_tensors, int n_tiles, Tensor seeds,
//                            Tensor scales, int n_old, Tensor(a!) codes, int code_base,
//                            Tensor chunk_base, Tensor table_bits, float tau, bool encode,
//                            bool rounding, str distribution) -> ()
//
// One exact pass of docs/EXACT.md over the tensors of a zo_opt::cuda_table. seeds: int64
// [n_old + n_new (+1 rounding seed)]; scales: float32 [1 + n_old + n_new]; codes: int8
// (codes[g - code_base]); chunk_base, table_bits: int32 (zo_opt.exact.Table), all contiguous
// on the table's device. code_base: a multiple of 128. Only metadata checks and one launch on
// the current stream: no copy, no sync, no allocation (graph-capturable). The extent of codes
// and chunk_base is checked by the Python runner, which knows the tensors' offsets.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "binding_checks.h"
#include "exact.cuh"
#include "tensor_table.h"

namespace {

void check_vector(const at::Tensor& t, const at::Device& device, at::ScalarType type, const char* name) {
  TORCH_CHECK(t.device() == device && t.scalar_type() == type && t.dim() == 1 && t.is_contiguous(),
              "noise_axpby_exact_table_: ", name, " must be a contiguous ", type, " vector on ", device,
              " (got ", t.scalar_type(), " [", t.sizes(), "] on ", t.device(), ")");
}

void noise_axpby_exact_table_cuda(const at::Tensor& table, int64_t n_tensors, int64_t n_tiles,
                                  const at::Tensor& seeds, const at::Tensor& scales, int64_t n_old,
                                  const at::Tensor& codes, int64_t code_base, const at::Tensor& chunk_base,
                                  const at::Tensor& table_bits, double tau, bool encode, bool rounding,
                                  c10::string_view distribution) {
  const char* op = "noise_axpby_exact_table_";
  const int dist = zo::cuda::distribution_code(distribution, op);
  const at::Device device = table.device();
  zo::cuda::check_table(table, n_tensors, n_tiles, op);
  check_vector(seeds, device, at::kLong, "seeds");
  check_vector(scales, device, at::kFloat, "scales");
  check_vector(codes, device, at::kChar, "codes");
  check_vector(chunk_base, device, at::kInt, "chunk_base");
  check_vector(table_bits, device, at::kInt, "table_bits");
  const int64_t n_new = scales.numel() - 1 - n_old;
  TORCH_CHECK(n_old >= 0 && n_new >= 0 && seeds.numel() == n_old + n_new + (rounding ? 1 : 0), op, ": ",
              seeds.numel(), " seeds and ", scales.numel(), " scales do not fit n_old = ", n_old,
              ", rounding = ", rounding);
  TORCH_CHECK(!(encode && rounding), op, ": encode needs round-to-nearest stores");
  TORCH_CHECK(code_base >= 0 && code_base % zo::kAlign == 0, op, ": code_base ", code_base,
              " must be a non-negative multiple of ", zo::kAlign);
  TORCH_CHECK(n_old == 0 || (chunk_base.numel() > 0 && table_bits.numel() > 0), op,
              ": decoding needs the side table (chunk_base and table_bits)");
  if (n_tiles == 0) return;
  zo::cuda::ExactArgs args;
  args.seeds = reinterpret_cast<const uint64_t*>(seeds.data_ptr());
  args.scales = scales.data_ptr<float>();
  args.codes = codes.data_ptr<int8_t>();
  args.chunk_base = chunk_base.data_ptr<int32_t>();
  args.bits = table_bits.data_ptr<int32_t>();
  args.code_base = code_base;
  args.n_old = static_cast<int32_t>(n_old);
  args.n_new = static_cast<int32_t>(n_new);
  args.tau = static_cast<float>(tau);
  args.encode = encode ? 1 : 0;
  args.rounding = rounding ? 1 : 0;
  args.codes_aligned = reinterpret_cast<uintptr_t>(codes.data_ptr()) % 8 == 0 ? 1 : 0;
  const c10::cuda::CUDAGuard guard(device);
  const cudaError_t err = zo::cuda::exact_launch(table.data_ptr(), n_tensors, n_tiles, args, dist,
                                                 c10::cuda::getCurrentCUDAStream(device.index()));
  TORCH_CHECK(err == cudaSuccess, op, " (cuda): ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(zo_opt, CUDA, m) { m.impl("noise_axpby_exact_table_", &noise_axpby_exact_table_cuda); }
