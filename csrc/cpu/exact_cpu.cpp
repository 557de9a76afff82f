// CPU backend of the exact pass (docs/EXACT.md; reference: python/zo_opt/exact.py,
// exact_pass_): recover theta exactly from the stored value, its one-byte code and the old
// displacement (or from the side table for ESC elements), then store alpha * theta + s_new
// (round to nearest or stochastic rounding) and, when encoding, the new code.
//
// Work items are kChunk (2048) elements of one tensor, done in blocks of kBlock (512) so that
// the scratch stays in L1; a block holds whole 128-element table chunks (a tensor's offset is
// 128-aligned, so a table chunk never spans two tensors). Per block the
// noise of each seed is generated once into a stack buffer by the shared vectorized
// generators (cpu_noise.h), so a seed that is both old and new (the central pass
// +eps z -> -eps z) costs one generation. Then the side table's values go to the ESC
// elements' slots (found by vector compares of the codes, visited in index order), and one
// branch-free loop that vectorizes decodes theta, stores the new value and encodes.
//
// All arithmetic is float32 with no contraction into FMAs: the file is compiled with
// -std=c++17 (GCC: -ffp-contract=off) and the pragma below makes it explicit.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "exact_cpu.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#elif defined(__clang__)
#pragma clang fp contract(off)
#endif

namespace {

// EXACT.md "Stochastic rounding", for a 16-bit dtype: lo = y rounded toward zero (bits), hi
// one step away from zero; hi with probability (|y| - |lo|) / (|hi| - |lo|). Every float
// below is exact, so the branch is the reference's.
template <class D>
ZO_INLINE uint32_t stochastic_round(float y, uint32_t word) {
  const uint32_t r = D::rn(y);
  const float ay = abs_f(y);
  const uint32_t lo = zo::select_bits(abs_f(D::to_f(r)) > ay, r - 1u, r);
  const uint32_t hi = lo + 1u;
  const float lo_f = abs_f(D::to_f(lo)), hi_f = abs_f(D::to_f(hi));
  const float u = static_cast<float>(word >> 8) * 5.9604644775390625e-08f;  // 2^-24
  const uint32_t out = zo::select_bits((ay - lo_f) > u * (hi_f - lo_f), hi, lo);
  return zo::select_bits(is_finite(y), out, r);
}

struct ExactArgs {
  const int64_t* seeds;  // [old..., new..., rounding seed?]
  const float* scales;   // [alpha, a_1..a_n_old, c_1..c_n_new]
  int64_t n_old, n_new;
  int8_t* codes;
  const int32_t* chunk_base;
  const int32_t* bits;
  int64_t n_bits;
  float tau;
  bool encode, rounding, gaussian;
};

// One block's scratch (on the stack: 5 x 2 KB, in L1 with the block's parameters).
constexpr int64_t kBlock = 512;
static_assert(kChunk % kBlock == 0 && kBlock % kTableChunk == 0, "blocks hold whole table chunks");
struct Scratch {
  alignas(64) float s_old[kBlock];
  alignas(64) float s_new[kBlock];
  alignas(64) float z[kBlock];        // Gaussian z of one seed
  alignas(64) uint32_t table[kBlock];  // the side table's bits at ESC elements (others unread)
  alignas(64) uint32_t words[kBlock];  // stochastic-rounding words
};

// acc = acc + c * z, or for the first term of a sum acc = +0 + c * z (no fill, no read).
ZO_INLINE void axpy_into(float* __restrict acc, const float* __restrict z, int64_t n, float c,
                         bool first) {
  if (first) {
#pragma omp simd
    for (int64_t e = 0; e < n; ++e) acc[e] = 0.0f + c * z[e];
  } else {
#pragma omp simd
    for (int64_t e = 0; e < n; ++e) acc[e] = acc[e] + c * z[e];
  }
}

// s_old and s_new of EXACT.md, each accumulated from +0 in seed order (an empty s_new is +0;
// s_old is read only when decoding, n_old > 0). Rademacher signs are added straight from the
// Philox words (one call per 128 elements, so whole blocks of 128: the fill covers them);
// Gaussian z goes through S.z, reused when the next seed is the same one.
template <int kIsa>
ZO_INLINE void displacements(Scratch& S, const ExactArgs& A, int64_t n, uint64_t g0) {
  const int64_t n_seeds = A.n_old + A.n_new;
  const int64_t whole = (n + zo::kAlign - 1) / zo::kAlign * zo::kAlign;
  if (A.n_new == 0) std::fill(S.s_new, S.s_new + n, 0.0f);
  bool have = false;
  uint64_t cached = 0;
  for (int64_t i = 0; i < n_seeds; ++i) {
    const uint64_t seed = static_cast<uint64_t>(A.seeds[i]);
    const bool old = i < A.n_old;
    float* acc = old ? S.s_old : S.s_new;
    const bool first = i == (old ? 0 : A.n_old);
    const float c = A.scales[1 + i];
    if (!A.gaussian) {
      if (first) std::fill(acc, acc + whole, 0.0f);
      add_rademacher(acc, n, g0, seed, c);
      continue;
    }
    if (!have || seed != cached) {
      gaussian_z<kIsa>(S.z, n, g0, seed);
      have = true;
      cached = seed;
    }
    axpy_into(acc, S.z, n, c, first);
  }
}

// 0x80 in each byte of ``w`` that holds ESC (0x80), 0 in the others: exact per byte (the add
// cannot carry into the next byte).
ZO_INLINE uint64_t esc_bytes(uint64_t w) {
  constexpr uint64_t k7f = 0x7f7f7f7f7f7f7f7fULL;
  const uint64_t v = w ^ 0x8080808080808080ULL;  // ESC bytes -> 0
  return ~(((v & k7f) + k7f) | v | k7f);
}
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "codes are read as little-endian words");

// masks[i], bit e: codes[64 i + e] is ESC, for i < groups (whole groups of 64 codes).
ZO_INLINE void esc_masks_scalar(const int8_t* codes, int64_t groups, uint64_t* masks) {
  for (int64_t i = 0; i < groups; ++i) {
    uint64_t m = 0;
    for (int w = 0; w < 8; ++w) {
      uint64_t word;
      std::memcpy(&word, codes + 64 * i + 8 * w, 8);
      m |= byte_bits(esc_bytes(word) >> 7) << (8 * w);
    }
    masks[i] = m;
  }
}

#if defined(ZO_X86_DISPATCH)
// Not inlined (the intrinsics need the clone's target; one call per block).
ZO_TARGET_V4 __attribute__((noinline)) void esc_masks_v4(const int8_t* codes, int64_t groups, uint64_t* masks) {
  const __m512i esc = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t i = 0; i < groups; ++i)
    masks[i] = _mm512_cmpeq_epi8_mask(_mm512_loadu_si512(codes + 64 * i), esc);
}
ZO_TARGET_V3 __attribute__((noinline)) void esc_masks_v3(const int8_t* codes, int64_t groups, uint64_t* masks) {
  const __m256i esc = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int64_t i = 0; i < 2 * groups; ++i) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 32 * i));
    const uint64_t m = static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(v, esc)));
    masks[i / 2] = i % 2 ? masks[i / 2] | (m << 32) : m;
  }
}
#endif

template <int kIsa>
ZO_INLINE void esc_masks(const int8_t* codes, int64_t groups, uint64_t* masks) {
#if defined(ZO_X86_DISPATCH)
  if constexpr (kIsa == 2) return esc_masks_v4(codes, groups, masks);
  if constexpr (kIsa == 1) return esc_masks_v3(codes, groups, masks);
#endif
  esc_masks_scalar(codes, groups, masks);
}

// The side table's bits into table[e] for the ESC elements e: slot = chunk_base[chunk] + ESC
// codes before e in its chunk, so the ESC elements of each chunk are visited in index order
// (N(0, 0.02) weights at eps = 1e-3: 0.7% of them, in 60% of the chunks, Gaussian; 0.13%, in
// 15% of the chunks, Rademacher). Returns false if a slot falls outside the table.
template <int kIsa>
ZO_INLINE bool lookup_table(uint32_t* table, const int8_t* codes, int64_t n, int64_t chunk0,
                            const ExactArgs& A) {
  uint64_t masks[kBlock / 64] = {};  // bit e of masks[i]: element 64 i + e is ESC (n <= kBlock)
  const int64_t whole = n / 64;
  esc_masks<kIsa>(codes, whole, masks);
  for (int64_t e = 64 * whole; e < n; ++e)  // a tensor's ragged end
    masks[e >> 6] |= static_cast<uint64_t>(codes[e] == kEsc) << (e & 63);
  for (int64_t c = 0; c * kTableChunk < n; ++c) {
    const uint64_t lo = masks[2 * c], hi = masks[2 * c + 1];
    if ((lo | hi) == 0) continue;
    int64_t slot = A.chunk_base[chunk0 + c];
    for (int h = 0; h < 2; ++h)
      for (uint64_t b = h ? hi : lo; b != 0; b &= b - 1) {
        if (slot < 0 || slot >= A.n_bits) return false;
        table[c * kTableChunk + 64 * h + __builtin_ctzll(b)] = static_cast<uint32_t>(A.bits[slot++]);
      }
  }
  return true;
}

// One loop over the block (EXACT.md "One exact pass"): theta (kDecode: from the stored value
// and the code, sign(t) | (mag(t) + code) with t = RN(p - s_old), or the table's bits at ESC
// codes; otherwise p itself), then p = RN or SR(alpha * theta [+ s_new]) and, with kEncode,
// the code mag(theta) - mag(RN(p - s_new)), or ESC (kDecode: where it was ESC; otherwise where
// theta is special). kEncode implies alpha == 1 (checked by the op). A NaN theta is stored as
// its own bits (a table element: restored bit for bit, payload included). Returns false if a
// code fell outside [-127, 127] (the bound of EXACT.md).
template <class D, bool kDecode, bool kSR, bool kEncode>
ZO_INLINE bool exact_loop(typename D::Store* __restrict p, int8_t* __restrict codes,
                          const uint32_t* __restrict table, const float* __restrict s_old,
                          const float* __restrict s_new, const uint32_t* __restrict words,
                          int64_t n, float alpha, float tau) {
  uint32_t bad = 0;  // (no omp simd reduction: GCC 12 sizes its lane array wrongly here)
  for (int64_t e = 0; e < n; ++e) {
    const uint32_t pb = p[e];
    uint32_t tb = pb, esc = 0;
    if constexpr (kDecode) {
      const int32_t code = codes[e];
      // NaN only at an ESC element (a NaN theta is special), where the table's bits win
      const uint32_t t = D::rn_finite(D::to_f(pb) - s_old[e]);
      const uint32_t decoded = (t & ~D::kMag) | ((t & D::kMag) + static_cast<uint32_t>(code));
      esc = static_cast<uint32_t>(code == kEsc);
      tb = zo::select_bits(esc != 0, table[e], decoded);
    } else if constexpr (kEncode) {
      esc = is_special<D>(tb, tau);
    }
    const float th = D::to_f(tb);
    const float sn = s_new[e];
    const float ya = kEncode ? th : alpha * th;
    const float ys = ya + sn;
    const float y = zo::bits_to_float(  // -0 + 0 would lose the sign of -0
        zo::select_bits(sn != 0.0f, zo::float_to_bits(ys), zo::float_to_bits(ya)));
    uint32_t out;
    // A NaN y from arithmetic is the default NaN, which rn_finite keeps a NaN; a NaN with
    // a payload only comes from a NaN theta, whose own bits are stored instead
    if constexpr (kSR)
      out = stochastic_round<D>(y, words[e]);
    else
      out = D::rn_finite(y);
    out = zo::select_bits(is_nan(th), tb, out);
    p[e] = static_cast<typename D::Store>(out);
    if constexpr (kEncode) {
      // NaN only where theta is NaN: a special element, whose code is ESC whatever t2 is
      const uint32_t t2 = D::rn_finite(D::to_f(out) - sn);
      const int32_t k = static_cast<int32_t>(tb & D::kMag) - static_cast<int32_t>(t2 & D::kMag);
      bad |= (esc ^ 1u) & static_cast<uint32_t>(static_cast<uint32_t>(k + 127) > 254u);
      codes[e] = static_cast<int8_t>(zo::select_bits(esc != 0, 0x80u, static_cast<uint32_t>(k)));
    }
  }
  return bad == 0;
}

enum Status : int { kOk = 0, kBadCode = 1, kBadSlot = 2 };

template <int kIsa, class D>
ZO_INLINE int exact_block(Scratch& S, const ExactArgs& A, typename D::Store* p, int64_t n,
                          uint64_t g0, int64_t pos0) {
  int8_t* codes = A.codes + pos0;
  displacements<kIsa>(S, A, n, g0);
  const bool decode = A.n_old > 0;
  if (decode && !lookup_table<kIsa>(S.table, codes, n, pos0 / kTableChunk, A)) return kBadSlot;
  constexpr bool k16 = sizeof(typename D::Store) == 2;
  const bool sr = k16 && A.rounding;
  if (sr) philox_element_words<kIsa>(S.words, n, g0, static_cast<uint64_t>(A.seeds[A.n_old + A.n_new]));
  const float alpha = A.scales[0], tau = A.tau;
  const auto loop = [&](auto decode_c, auto sr_c, auto encode_c) {
    return exact_loop<D, decltype(decode_c)::value, decltype(sr_c)::value, decltype(encode_c)::value>(
        p, codes, S.table, S.s_old, S.s_new, S.words, n, alpha, tau);
  };
  using T = std::true_type;
  using F = std::false_type;
  bool ok;
  if (A.encode)  // encode needs round-to-nearest stores (checked by the op)
    ok = decode ? loop(T{}, F{}, T{}) : loop(F{}, F{}, T{});
  else if (sr)
    ok = decode ? loop(T{}, T{}, F{}) : loop(F{}, T{}, F{});
  else
    ok = decode ? loop(T{}, F{}, F{}) : loop(F{}, F{}, F{});
  return ok ? kOk : kBadCode;
}

// A work item in blocks of kBlock elements, so that the scratch stays in L1.
template <int kIsa, class D>
ZO_INLINE int exact_item_body(const ExactArgs& A, void* data, int64_t n, uint64_t g0, int64_t pos0) {
  Scratch S;
  std::fill(S.table, S.table + kBlock, 0u);  // read (and discarded) at non-ESC elements
  auto* p = static_cast<typename D::Store*>(data);
  int status = kOk;
  for (int64_t b = 0; b < n; b += kBlock)
    status |= exact_block<kIsa, D>(S, A, p + b, std::min(kBlock, n - b), g0 + b, pos0 + b);
  return status;
}

template <int kIsa>
ZO_INLINE int exact_item_dispatch(const ExactArgs& A, void* data, at::ScalarType dtype, int64_t n,
                                  uint64_t g0, int64_t pos0) {
  switch (dtype) {
    case at::kFloat: return exact_item_body<kIsa, F32>(A, data, n, g0, pos0);
    case at::kBFloat16: return exact_item_body<kIsa, BF16>(A, data, n, g0, pos0);
    default: return exact_item_body<kIsa, F16>(A, data, n, g0, pos0);
  }
}

#define ZO_ITEM_ARGS \
  const ExactArgs &A, void *data, at::ScalarType dtype, int64_t n, uint64_t g0, int64_t pos0
#define ZO_ITEM_PASS A, data, dtype, n, g0, pos0

using ItemFn = int (*)(ZO_ITEM_ARGS);

int exact_item_base(ZO_ITEM_ARGS) { return exact_item_dispatch<0>(ZO_ITEM_PASS); }
#if defined(ZO_X86_DISPATCH)
ZO_TARGET_V3 int exact_item_v3(ZO_ITEM_ARGS) { return exact_item_dispatch<1>(ZO_ITEM_PASS); }
ZO_TARGET_V4 int exact_item_v4(ZO_ITEM_ARGS) { return exact_item_dispatch<2>(ZO_ITEM_PASS); }
#endif

ItemFn pick_exact_item() {
  switch (pick_isa()) {
#if defined(ZO_X86_DISPATCH)
    case 2: return exact_item_v4;
    case 1: return exact_item_v3;
#endif
    default: return exact_item_base;
  }
}

struct Item {
  int64_t tensor;
  int64_t start;
};

void noise_axpby_exact_cpu(at::TensorList params, at::IntArrayRef offsets, const at::Tensor& seeds,
                           const at::Tensor& scales, int64_t n_old, const at::Tensor& codes,
                           int64_t code_base, const at::Tensor& chunk_base,
                           const at::Tensor& table_bits, double tau, bool encode, bool rounding,
                           c10::string_view distribution) {
  const char* op = "noise_axpby_exact_: ";
  TORCH_CHECK(params.size() == offsets.size(), op, params.size(), " tensors but ", offsets.size(),
              " offsets");
  const bool gaussian = distribution == "gaussian";
  TORCH_CHECK(gaussian || distribution == "rademacher", op, "unknown distribution ", distribution);
  TORCH_CHECK(seeds.device().is_cpu() && seeds.scalar_type() == at::kLong && seeds.dim() == 1 &&
                  seeds.is_contiguous(),
              op, "seeds must be a contiguous int64 CPU vector");
  const int64_t n_seeds = seeds.numel() - (rounding ? 1 : 0);
  TORCH_CHECK(n_old >= 0 && n_seeds >= n_old, op, "n_old = ", n_old, " but ", n_seeds,
              " direction seeds");
  TORCH_CHECK(scales.device().is_cpu() && scales.scalar_type() == at::kFloat && scales.dim() == 1 &&
                  scales.is_contiguous() && scales.numel() == n_seeds + 1,
              op, "scales must be a contiguous float32 CPU vector of length ", n_seeds + 1);
  TORCH_CHECK(codes.device().is_cpu() && codes.scalar_type() == at::kChar && codes.is_contiguous(),
              op, "codes must be a contiguous int8 CPU tensor");
  TORCH_CHECK(chunk_base.device().is_cpu() && chunk_base.scalar_type() == at::kInt &&
                  chunk_base.is_contiguous() && table_bits.device().is_cpu() &&
                  table_bits.scalar_type() == at::kInt && table_bits.is_contiguous(),
              op, "chunk_base and table_bits must be contiguous int32 CPU tensors");
  TORCH_CHECK(code_base >= 0 && code_base % kTableChunk == 0, op, "code_base must be a non-negative multiple of ",
              kTableChunk);
  const float* sc = scales.data_ptr<float>();
  TORCH_CHECK(!encode || (sc[0] == 1.0f && !rounding), op,
              "encode needs alpha == 1 and round-to-nearest stores");
  // (the stores also rely on it: a NaN there could only come from theta, see exact_loop)
  TORCH_CHECK(std::all_of(sc, sc + scales.numel(), [](float v) { return std::isfinite(v); }), op,
              "scales must be finite: a non-finite alpha or coefficient leaves nothing to restore");

  ExactArgs A;
  A.seeds = seeds.data_ptr<int64_t>();
  A.scales = sc;
  A.n_old = n_old;
  A.n_new = n_seeds - n_old;
  A.codes = codes.data_ptr<int8_t>();
  A.chunk_base = chunk_base.data_ptr<int32_t>();
  A.bits = table_bits.data_ptr<int32_t>();
  A.n_bits = table_bits.numel();
  A.tau = static_cast<float>(tau);
  A.encode = encode;
  A.rounding = rounding;
  A.gaussian = gaussian;

  const int64_t n_codes = codes.numel(), n_chunks = chunk_base.numel() - 1;
  std::vector<Item> items;
  for (size_t k = 0; k < params.size(); ++k) {
    const auto& p = params[k];
    check_param(op, p, k, offsets[k], code_base);
    if (p.numel() == 0) continue;
    const int64_t pos = offsets[k] - code_base;
    // a pass that neither decodes nor encodes (a stochastically rounded update) reads no code
    TORCH_CHECK((n_old == 0 && !encode) || pos + p.numel() <= n_codes, op, "tensor ", k,
                " runs past the end of codes");
    TORCH_CHECK(n_old == 0 || (pos + p.numel() - 1) / kTableChunk < n_chunks, op, "tensor ", k,
                " runs past the end of chunk_base");
    for (int64_t start = 0; start < p.numel(); start += kChunk) items.push_back({int64_t(k), start});
  }

  static const ItemFn item_fn = pick_exact_item();
  std::atomic<int> status{kOk};
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const auto& p = params[items[i].tensor];
      const int64_t start = items[i].start;
      char* data = static_cast<char*>(p.data_ptr()) + start * p.element_size();
      const int64_t g0 = offsets[items[i].tensor] + start;
      const int s = item_fn(A, data, p.scalar_type(), std::min(kChunk, p.numel() - start),
                            static_cast<uint64_t>(g0), g0 - code_base);
      if (s != kOk) status.fetch_or(s, std::memory_order_relaxed);
    }
  });
  const int s = status.load();
  TORCH_CHECK(!(s & kBadSlot), op, "a table slot out of range: the table does not match the codes");
  TORCH_CHECK(!(s & kBadCode), op, "a code out of range; tau is too small");
}

}  // namespace

TORCH_LIBRARY_IMPL(zo_opt, CPU, m) { m.impl("noise_axpby_exact_", &noise_axpby_exact_cpu); }
