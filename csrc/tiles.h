// Strided 2-D copies with an element conversion, tile by tile: the attention op's packing of the heads
// (attention_loops.h) and its torch backend's transposes (attention.cpp). Plain C++ in an anonymous namespace,
// always inlined: each caller compiles its copy for the ISA it targets.
#pragma once
#include <algorithm>
#include <cstdint>

#include "convert.h"

namespace cmfast {
namespace {

// E from S: the identity for equal types (and raw bits), to fp32 from the storage types, fp32 to them.
template <typename E>
struct As {
  template <typename S>
  static E from(S v) { return static_cast<E>(v); }
};
template <>
struct As<float> {
  template <typename S>
  static float from(S v) { return to_f32(v); }
};
template <>
struct As<c10::Half> {
  static c10::Half from(float v) { return from_f32<c10::Half>(v); }
};
template <>
struct As<c10::BFloat16> {
  static c10::BFloat16 from(float v) { return from_f32<c10::BFloat16>(v); }
};

// dst[r * dst_stride + c] = src[r * src_stride + c] as E, for r < rows, c < cols.
template <typename E, typename S>
__attribute__((always_inline)) inline void copy_rows(const S* __restrict__ src, int64_t src_stride, int64_t rows, int64_t cols, E* __restrict__ dst,
                      int64_t dst_stride) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[r * dst_stride + c] = As<E>::from(src[r * src_stride + c]);
}

constexpr int64_t kTile = 32;  // a 32x32 tile of 4-byte elements: 4 KB read and 4 KB written, both in L1

// dst[c * dst_stride + r] = src[r * src_stride + c] as E, for r < rows, c < cols. A tile is read row by row into a
// local buffer, then written column by column: reading it by columns straight from src would touch rows that,
// 4 KB apart, alias in L1.
template <typename E, typename S>
__attribute__((always_inline)) inline void transpose(const S* __restrict__ src, int64_t src_stride, int64_t rows, int64_t cols, E* __restrict__ dst,
                      int64_t dst_stride) {
  E tile[kTile][kTile];
  for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
    const int64_t nr = std::min(kTile, rows - r0);
    for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
      const int64_t nc = std::min(kTile, cols - c0);
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t c = 0; c < nc; ++c) tile[r][c] = As<E>::from(src[(r0 + r) * src_stride + c0 + c]);
      for (int64_t c = 0; c < nc; ++c)
        for (int64_t r = 0; r < nr; ++r) dst[(c0 + c) * dst_stride + r0 + r] = tile[r][c];
    }
  }
}

// Zeroes dst[r * stride + c] for r < rows, c0 <= c < c1: the padding of packed operands.
template <typename E>
__attribute__((always_inline)) inline void zero_columns(E* dst, int64_t stride, int64_t rows, int64_t c0, int64_t c1) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = c0; c < c1; ++c) dst[r * stride + c] = E{};
}

}  // namespace
}  // namespace cmfast
