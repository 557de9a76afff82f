// What the CPU side of the exact mode (docs/EXACT.md) shares between the exact pass
// (exact_cpu.cpp) and the side table (exact_table_cpu.cpp): the parameter dtypes as raw bits,
// and which elements the table keeps.
#pragma once

#include <torch/torch.h>

#include "cpu_noise.h"

namespace {

constexpr int32_t kEsc = -128;
constexpr int64_t kTableChunk = 128;  // EXACT.md: chunks of the side table
static_assert(kChunk % kTableChunk == 0, "work items hold whole table chunks");

// The parameter dtypes as raw bits (uint32, zero-extended) <-> float32, and round to nearest
// even back to the dtype's bits (the header's branch-free conversions). rn_finite: rn for an
// argument that is not NaN (bfloat16 then skips the NaN case).
struct F32 {
  using Store = uint32_t;
  static constexpr uint32_t kMag = 0x7fffffffu;
  static constexpr float kBig = 1.70141173319264429905852091742258462e+38f;  // max / 2
  ZO_HD static float to_f(uint32_t b) { return zo::bits_to_float(b); }
  ZO_HD static uint32_t rn(float f) { return zo::float_to_bits(f); }
  ZO_HD static uint32_t rn_finite(float f) { return rn(f); }
};
struct BF16 {
  using Store = uint16_t;
  static constexpr uint32_t kMag = 0x7fffu;
  static constexpr float kBig = 1.69477678e+38f;  // 0x7f7f as float, / 2 (exact)
  ZO_HD static float to_f(uint32_t b) { return zo::bf16_to_float(static_cast<uint16_t>(b)); }
  ZO_HD static uint32_t rn(float f) { return zo::float_to_bf16_rne(f); }
  ZO_HD static uint32_t rn_finite(float f) {
    const uint32_t b = zo::float_to_bits(f);
    return (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
  }
};
struct F16 {
  using Store = uint16_t;
  static constexpr uint32_t kMag = 0x7fffu;
  static constexpr float kBig = 32752.0f;  // 65504 / 2
  ZO_HD static float to_f(uint32_t b) { return zo::half_to_float(static_cast<uint16_t>(b)); }
  ZO_HD static uint32_t rn(float f) { return zo::float_to_half_rne(f); }
  ZO_HD static uint32_t rn_finite(float f) { return rn(f); }
};

ZO_INLINE float abs_f(float f) { return zo::bits_to_float(zo::float_to_bits(f) & 0x7fffffffu); }
ZO_INLINE bool is_nan(float f) { return (zo::float_to_bits(f) & 0x7fffffffu) > 0x7f800000u; }
ZO_INLINE bool is_finite(float f) { return (zo::float_to_bits(f) & 0x7fffffffu) < 0x7f800000u; }

// Bit i of the result: byte i of w, for a word whose bytes are each 0 or 1. The multiply
// gathers them into its top byte, in byte order and without carries (the ESC masks of the
// exact pass and the special-element masks of the side table's fill).
ZO_INLINE uint64_t byte_bits(uint64_t w) { return (w * 0x0102040810204080ULL) >> 56; }

// EXACT.md special(theta): !(|theta| >= tau) || |theta| > max / 2 (NaN fails the first).
template <class D>
ZO_INLINE uint32_t is_special(uint32_t bits, float tau) {
  const float a = abs_f(D::to_f(bits));
  return static_cast<uint32_t>(!(a >= tau)) | static_cast<uint32_t>(a > D::kBig);
}

// The checks both CPU exact ops make of params[k]: a contiguous float32/float16/bfloat16 CPU
// tensor whose offset, when it has elements, is a multiple of 128 at or above code_base.
inline void check_param(const char* op, const at::Tensor& p, size_t k, int64_t offset,
                        int64_t code_base) {
  TORCH_CHECK(p.device().is_cpu() && p.is_contiguous(), op, "tensor ", k,
              " must be a contiguous CPU tensor");
  TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == at::kHalf ||
                  p.scalar_type() == at::kBFloat16,
              op, "tensor ", k, " has dtype ", p.scalar_type(),
              "; the exact mode takes float32, float16 and bfloat16");
  TORCH_CHECK(p.numel() == 0 || (offset >= code_base && offset % kTableChunk == 0), op, "tensor ", k,
              "'s offset is ", offset, "; it must be a multiple of ", kTableChunk,
              " at or above code_base ", code_base);
}

}  // namespace
