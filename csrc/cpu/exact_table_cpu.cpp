// CPU side table of the exact mode (docs/EXACT.md "The state of an exact step"; reference:
// python/zo_opt/exact.py count_special_ / fill_special_). Built in two parallel passes over
// theta, with the exclusive prefix sum between them done by the caller:
//
//   exact_table_count_: counts[c] = the special elements of table chunk c (128 elements)
//   exact_table_fill_:  bits[chunk_base[c] + rank in chunk] = the raw bits of each of them
//
// Work items are kChunk (2048) elements of one tensor, so whole table chunks (offsets and
// code_base are 128-aligned), each pass compiled per ISA as the exact pass is (cpu_noise.h).
// Neither pass allocates.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "exact_cpu.h"

namespace {

struct TableItem {
  const void* data;
  at::ScalarType dtype;
  int64_t n;
  int64_t chunk0;  // table chunk of the item's first element
};

// The special flags of up to one table chunk, as raw bits of each dtype.
template <class D>
ZO_INLINE void flags(uint8_t* __restrict out, const typename D::Store* __restrict p, int64_t n,
                     float tau) {
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) out[e] = static_cast<uint8_t>(is_special<D>(p[e], tau));
}

template <class D>
ZO_INLINE void count_item(const TableItem& it, float tau, int32_t* counts) {
  const auto* p = static_cast<const typename D::Store*>(it.data);
  alignas(64) uint8_t f[kTableChunk];
  for (int64_t c0 = 0; c0 < it.n; c0 += kTableChunk) {
    const int64_t len = std::min(kTableChunk, it.n - c0);
    flags<D>(f, p + c0, len, tau);
    int32_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t e = 0; e < len; ++e) sum += f[e];
    counts[it.chunk0 + c0 / kTableChunk] = sum;
  }
}

// Bit e of the result: flag byte f[e] (0 or 1) of the 64 at f.
ZO_INLINE uint64_t flag_mask(const uint8_t* f) {
  uint64_t m = 0;
  for (int w = 0; w < 8; ++w) {
    uint64_t word;
    std::memcpy(&word, f + 8 * w, 8);
    m |= byte_bits(word) << (8 * w);
  }
  return m;
}

// Returns false if a chunk holds more special elements than chunk_base gives it room for.
// The flags of the whole item first (one vector loop), then each chunk's special elements
// from bit masks (N(0, 0.02) weights at eps = 1e-3, Gaussian: 0.7% of them, in 60% of the
// chunks): a branch per element, and flags per chunk, took 2-4x as long.
template <class D>
ZO_INLINE bool fill_item(const TableItem& it, float tau, const int32_t* chunk_base, int32_t* bits) {
  static_assert(kChunk % 64 == 0, "whole 64-bit masks per item");
  const auto* p = static_cast<const typename D::Store*>(it.data);
  alignas(64) uint8_t f[kChunk];
  flags<D>(f, p, it.n, tau);
  std::memset(f + it.n, 0, kChunk - it.n);  // a tensor's ragged end
  for (int64_t c0 = 0; c0 < it.n; c0 += kTableChunk) {
    const int64_t c = it.chunk0 + c0 / kTableChunk;
    int64_t slot = chunk_base[c];
    const int64_t end = chunk_base[c + 1];
    for (int64_t h = c0; h < c0 + kTableChunk; h += 64) {
      for (uint64_t m = flag_mask(f + h); m != 0; m &= m - 1) {
        if (slot >= end) return false;
        bits[slot++] = static_cast<int32_t>(static_cast<uint32_t>(p[h + __builtin_ctzll(m)]));
      }
    }
    if (slot != end) return false;
  }
  return true;
}

// One work item of either pass, for its dtype, inlined into one clone per ISA (below) so that
// the flag loops take the clone's vector width. A switch, not a lambda: a lambda's body would
// not take the clone's target.
template <bool kFill, class D>
ZO_INLINE bool table_item_of(const TableItem& it, float tau, const int32_t* chunk_base, int32_t* out) {
  if constexpr (kFill) {
    return fill_item<D>(it, tau, chunk_base, out);
  } else {
    count_item<D>(it, tau, out);
    return true;
  }
}

template <bool kFill>
ZO_INLINE bool table_item(const TableItem& it, float tau, const int32_t* chunk_base, int32_t* out) {
  switch (it.dtype) {
    case at::kFloat: return table_item_of<kFill, F32>(it, tau, chunk_base, out);
    case at::kBFloat16: return table_item_of<kFill, BF16>(it, tau, chunk_base, out);
    default: return table_item_of<kFill, F16>(it, tau, chunk_base, out);
  }
}

#define ZO_TABLE_ARGS const TableItem &it, float tau, const int32_t *chunk_base, int32_t *out
using TableItemFn = bool (*)(ZO_TABLE_ARGS);

template <bool kFill>
bool table_item_base(ZO_TABLE_ARGS) { return table_item<kFill>(it, tau, chunk_base, out); }
#if defined(ZO_X86_DISPATCH)
template <bool kFill>
ZO_TARGET_V3 bool table_item_v3(ZO_TABLE_ARGS) { return table_item<kFill>(it, tau, chunk_base, out); }
template <bool kFill>
ZO_TARGET_V4 bool table_item_v4(ZO_TABLE_ARGS) { return table_item<kFill>(it, tau, chunk_base, out); }
#endif

template <bool kFill>
TableItemFn pick_table_item() {
  switch (pick_isa()) {
#if defined(ZO_X86_DISPATCH)
    case 2: return table_item_v4<kFill>;
    case 1: return table_item_v3<kFill>;
#endif
    default: return table_item_base<kFill>;
  }
}

// The work items of a pass: checks each tensor against code_base and n_chunks.
std::vector<TableItem> table_items(const char* op, at::TensorList params, at::IntArrayRef offsets,
                                   int64_t code_base, int64_t n_chunks) {
  TORCH_CHECK(params.size() == offsets.size(), op, params.size(), " tensors but ", offsets.size(),
              " offsets");
  TORCH_CHECK(code_base >= 0 && code_base % kTableChunk == 0, op,
              "code_base must be a non-negative multiple of ", kTableChunk);
  std::vector<TableItem> items;
  for (size_t k = 0; k < params.size(); ++k) {
    const auto& p = params[k];
    check_param(op, p, k, offsets[k], code_base);
    if (p.numel() == 0) continue;
    const int64_t pos = offsets[k] - code_base;
    TORCH_CHECK((pos + p.numel() - 1) / kTableChunk < n_chunks, op, "tensor ", k,
                " runs past the last table chunk");
    const char* data = static_cast<const char*>(p.data_ptr());
    for (int64_t start = 0; start < p.numel(); start += kChunk)
      items.push_back({data + start * p.element_size(), p.scalar_type(),
                       std::min(kChunk, p.numel() - start), (pos + start) / kTableChunk});
  }
  return items;
}

void check_int32(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kInt && t.dim() == 1 && t.is_contiguous(),
              op, name, " must be a contiguous int32 CPU vector");
}

void exact_table_count_cpu(at::TensorList params, at::IntArrayRef offsets, int64_t code_base,
                           double tau, const at::Tensor& counts) {
  const char* op = "exact_table_count_: ";
  check_int32(op, "counts", counts);
  const auto items = table_items(op, params, offsets, code_base, counts.numel());
  int32_t* out = counts.data_ptr<int32_t>();
  const float t = static_cast<float>(tau);
  const TableItemFn count = pick_table_item<false>();
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) count(items[i], t, nullptr, out);
  });
}

void exact_table_fill_cpu(at::TensorList params, at::IntArrayRef offsets, int64_t code_base,
                          double tau, const at::Tensor& chunk_base, const at::Tensor& bits) {
  const char* op = "exact_table_fill_: ";
  check_int32(op, "chunk_base", chunk_base);
  check_int32(op, "bits", bits);
  const auto items = table_items(op, params, offsets, code_base, chunk_base.numel() - 1);
  const int32_t* base = chunk_base.data_ptr<int32_t>();
  const int64_t n_chunks = chunk_base.numel() - 1;
  TORCH_CHECK(n_chunks >= 0 && base[0] >= 0 && base[n_chunks] <= bits.numel(), op,
              "chunk_base runs past the ", bits.numel(), " entries of bits");
  int32_t* out = bits.data_ptr<int32_t>();
  const float t = static_cast<float>(tau);
  std::atomic<bool> ok{true};
  const TableItemFn fill = pick_table_item<true>();
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      if (!fill(items[i], t, base, out)) ok.store(false, std::memory_order_relaxed);
  });
  TORCH_CHECK(ok.load(), op, "chunk_base does not match the special elements of params "
              "(made with another tau, or params changed since the count)");
}

}  // namespace

TORCH_LIBRARY_IMPL(zo_opt, CPU, m) {
  m.impl("exact_table_count_", &exact_table_count_cpu);
  m.impl("exact_table_fill_", &exact_table_fill_cpu);
}
