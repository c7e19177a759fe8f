// fp32 <-> storage type (float, c10::Half, c10::BFloat16) in integer arithmetic the vectoriser takes (c10's own
// conversions stay scalar): the CPU kernels' loads and stores. Internal linkage: each kernel file compiles its own
// copy for the ISA it targets.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace cmfast {
namespace {

// std::bit_cast is C++20; torch extensions build as C++17 up to torch 2.11. A fixed-size memcpy compiles to a move.
template <typename To, typename From>
__attribute__((always_inline)) inline To bits_as(From v) {
  static_assert(sizeof(To) == sizeof(From), "bits_as: sizes differ");
  To out;
  std::memcpy(&out, &v, sizeof(To));
  return out;
}

__attribute__((always_inline)) inline float to_f32(float v) { return v; }
__attribute__((always_inline)) inline float to_f32(c10::BFloat16 v) {
  return bits_as<float>(static_cast<uint32_t>(v.x) << 16);
}
// Exponent and mantissa moved into a float and rescaled by 2^112 (exact for normals and subnormals); Inf/NaN
// get the all-ones exponent back.
__attribute__((always_inline)) inline float to_f32(c10::Half v) {
  const uint32_t magnitude = v.x & 0x7fffu;
  uint32_t bits = bits_as<uint32_t>(bits_as<float>(magnitude << 13) * 0x1p112f);
  bits = magnitude >= 0x7c00u ? bits | 0x7f800000u : bits;
  return bits_as<float>(bits | (static_cast<uint32_t>(v.x & 0x8000u) << 16));
}

template <typename T>
T from_f32(float v);
template <>
__attribute__((always_inline)) inline float from_f32<float>(float v) {
  return v;
}
// Round to nearest even; NaN stays a (quiet) NaN, as c10::BFloat16(float).
template <>
__attribute__((always_inline)) inline c10::BFloat16 from_f32<c10::BFloat16>(float v) {
  const uint32_t u = bits_as<uint32_t>(v);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t bits = (u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded;
  return c10::BFloat16(static_cast<uint16_t>(bits), c10::BFloat16::from_bits());
}
// Round to nearest even (F. Giesen's float_to_half_fast3_rtne): every case computed, then selected. Overflow
// gives Inf, NaN a quiet NaN, small values subnormals (rounded by an fp32 add).
template <>
__attribute__((always_inline)) inline c10::Half from_f32<c10::Half>(float v) {
  const uint32_t u = bits_as<uint32_t>(v);
  const uint32_t sign = u & 0x80000000u, f = u ^ sign;
  const uint32_t subnormal = bits_as<uint32_t>(bits_as<float>(f) + 0.5f) - 0x3f000000u;
  const uint32_t normal = (f + 0xc8000fffu + ((f >> 13) & 1u)) >> 13;  // rebias (15 - 127) << 23, round
  const uint32_t inf_nan = f > 0x7f800000u ? 0x7e00u : 0x7c00u;
  // Masks, not ?: -- the compiler would move the fp32 add into a branch, and a branch stays scalar.
  const uint32_t tiny = 0u - static_cast<uint32_t>(f < 0x38800000u);
  const uint32_t huge = 0u - static_cast<uint32_t>(f >= 0x47800000u);
  const uint32_t bits = (subnormal & tiny) | (inf_nan & huge) | (normal & ~(tiny | huge));
  return c10::Half(static_cast<uint16_t>(bits | (sign >> 16)), c10::Half::from_bits());
}

}  // namespace
}  // namespace cmfast
