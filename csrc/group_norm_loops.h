// The CPU group_norm kernel's inner loops (csrc/group_norm.cpp, their one includer, runs them over the two
// layouts): the statistics sums, the affine + SiLU epilogue, loading and storing through convert.h. Every loop is
// plain C++ that GCC vectorises, cloned per ISA.
#pragma once
#include <algorithm>
#include <cstdint>

#include "convert.h"

// The inner loops are cloned for AVX-512, AVX2 and the baseline ISA (picked at load time), as in consistency.cpp;
// AVX-512 (which brings FMA) halves the cost of the SiLU epilogue where the CPU has it (measured on Zen 4). The
// AVX-512 clone is x86-64-v4 (F, BW, DQ, VL), not F alone: without BW, GCC vectorises the loops that load or store
// 16-bit values (fp16, bf16) 256 bits wide only, and the bf16 SiLU epilogue ran at half speed (2 Sapphire Rapids
// threads, 1x384x64x64 channels_last bf16 with SiLU: 0.92 ms with F alone).
#define CMFAST_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))

namespace cmfast {
namespace {

constexpr int kLanes = 64;           // independent fp32 partial sums: 4 AVX-512 accumulators hide the add latency

// The Moments of n fp32 values: their sum, then the squared deviations from their mean (two passes over a block
// that sits in L1), each over kLanes partial sums.

CMFAST_CLONES float sum_of(const float* __restrict__ x, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += x[i + j];
  for (int j = 0; i < n; ++i, ++j) acc[j] += x[i];
  float s = 0.0f;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

CMFAST_CLONES float squared_deviations(const float* __restrict__ x, int64_t n, float mean) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const float d = x[i + j] - mean;
      acc[j] += d * d;
    }
  for (int j = 0; i < n; ++i, ++j) {
    const float d = x[i] - mean;
    acc[j] += d * d;
  }
  float s = 0.0f;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

template <typename T>
CMFAST_CLONES void widen(const T* __restrict__ x, float* __restrict__ out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = to_f32(x[i]);
}

// acc[c] += sum over rows p of x[p, c] (channels_last: C channels per row).
template <typename T>
CMFAST_CLONES void column_sums(const T* __restrict__ x, int64_t rows, int64_t C, float* __restrict__ acc) {
  for (int64_t p = 0; p < rows; ++p)
    for (int64_t c = 0; c < C; ++c) acc[c] += to_f32(x[p * C + c]);
}

// acc[c] += sum over rows p of (x[p, c] - mean[c])^2.
template <typename T>
CMFAST_CLONES void column_squared_deviations(const T* __restrict__ x, int64_t rows, int64_t C,
                                             const float* __restrict__ mean, float* __restrict__ acc) {
  for (int64_t p = 0; p < rows; ++p)
    for (int64_t c = 0; c < C; ++c) {
      const float d = to_f32(x[p * C + c]) - mean[c];
      acc[c] += d * d;
    }
}

// 1 + exp(-y), the SiLU's denominator, in plain arithmetic that vectorises (libm's expf does not without
// -ffast-math) and kept lean, as the SiLU is most of the kernel's arithmetic: |y| clamped to 87 on the integer bits
// (a float comparison gets if-converted into a second division); n = round(-y / ln 2) taken from the low bits of the
// rounding sum k; r = -y - n ln 2 in two steps (Cody-Waite); exp(r) by a degree-5 polynomial (fitted for relative
// error on |r| <= ln 2 / 2); 2^n added to the exponent bits. Within 2.5e-7 of exp relatively, but for y near 87,
// where exp(-y) < 1e-37 may come out garbled and vanishes in the 1 + anyway. NaN stays NaN in y / (...).
__attribute__((always_inline)) inline float one_plus_exp_neg(float y) {
  const uint32_t bits = bits_as<uint32_t>(y);
  y = bits_as<float>(std::min(bits & 0x7fffffffu, bits_as<uint32_t>(87.0f)) | (bits & 0x80000000u));
  const float k = y * -1.44269504088896341f + 12582912.0f;  // 1.5 * 2^23 + n: n in the low mantissa bits
  const float n = k - 12582912.0f;
  float r = -y - n * 0.693359375f;  // ln 2 = 0.693359375 - 2.12194440e-4 (the first part exact in 9 bits)
  r = r + n * 2.12194440e-4f;
  float p = 8.312519639730453e-3f;
  p = p * r + 4.1890114545822144e-2f;
  p = p * r + 1.6667114198207855e-1f;
  p = p * r + 4.99992311000824e-1f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return 1.0f + bits_as<float>(bits_as<uint32_t>(p) + (bits_as<uint32_t>(k) << 23));
}

template <bool SILU>
__attribute__((always_inline)) inline float epilogue(float y) {
  return SILU ? y / one_plus_exp_neg(y) : y;
}

// out[k, i] = epilogue((x[k, i] - mean) * a[k] + d[k]) over a group's channels k, n values each (contiguous
// layout). One call a group, not a channel: at 8x8 a channel is only 64 values. Channel by channel it prefetches
// the next group (`next`, or null) so that its statistics pass does not wait on DRAM (15-25% at 8x8 to 32x32).
template <typename T, bool SILU>
CMFAST_CLONES void affine_channels(const T* __restrict__ x, T* __restrict__ out, int64_t channels, int64_t n,
                                   float mean, const float* __restrict__ a, const float* __restrict__ d,
                                   const T* next) {
  for (int64_t k = 0; k < channels; ++k) {
    if (next != nullptr) {
      const char* line = reinterpret_cast<const char*>(next + k * n);
      for (int64_t b = 0; b < n * int64_t(sizeof(T)); b += 64) __builtin_prefetch(line + b);
    }
    const T* xk = x + k * n;
    T* ok = out + k * n;
    const float ak = a[k], dk = d[k];
    for (int64_t i = 0; i < n; ++i) ok[i] = from_f32<T>(epilogue<SILU>((to_f32(xk[i]) - mean) * ak + dk));
  }
}

// out[p, c] = epilogue((x[p, c] - mean[c]) * a[c] + d[c]) over rows of C channels (channels_last). Row by row it
// prefetches as many rows from `next` (or nothing when null): the next wave's statistics pass then reads from cache.
template <typename T, bool SILU>
CMFAST_CLONES void affine_rows(const T* __restrict__ x, T* __restrict__ out, int64_t rows, int64_t C,
                               const float* __restrict__ mean, const float* __restrict__ a,
                               const float* __restrict__ d, const T* next) {
  for (int64_t p = 0; p < rows; ++p) {
    if (next != nullptr) {
      const char* line = reinterpret_cast<const char*>(next + p * C);
      for (int64_t b = 0; b < C * int64_t(sizeof(T)); b += 64) __builtin_prefetch(line + b);
    }
    for (int64_t c = 0; c < C; ++c)
      out[p * C + c] = from_f32<T>(epilogue<SILU>((to_f32(x[p * C + c]) - mean[c]) * a[c] + d[c]));
  }
}

// The sum of a group's few per-channel sums.
inline float total(const float* v, int64_t n) {
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += v[i];
  return s;
}

}  // namespace
}  // namespace cmfast
