// The group_norm kernel's normalising pass for bfloat16 tensors on CPUs with AVX512_BF16 (csrc/group_norm.cpp, its
// one includer, picks it where cpu_runs_avx512_bf16()). The same arithmetic as affine_rows / affine_channels in
// group_norm_loops.h, operation for operation (the same fp32 results), written with intrinsics so that the rounding
// to bf16 is one vcvtne2ps2bf16 for 32 values: the compiler's vectorisation of the portable rounding took 9
// instructions a vector of 16, a third of the SiLU pass's instructions (on 2 Sapphire Rapids threads, where the
// pass is compute-bound: 1x256x256x256 channels_last with SiLU, 4.4 ms, 2.5 without the SiLU, 1.0 for a copy).
// vcvtne2ps2bf16 rounds to nearest even as torch does; it differs only where torch's rounding keeps an fp32
// subnormal (it gives 0 there: below 1.2e-38) and in a NaN's payload (a NaN stays NaN).
#pragma once

#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <cstdint>

#include "group_norm_loops.h"

// GCC 12's AVX-512 intrinsics pass an undefined register as the unused merge source of the zero-extension; inlined
// into a loop it draws a false -Wmaybe-uninitialized (as in winograd_bf16.cpp).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define CMFAST_GN_BF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,fma")))
#define CMFAST_GN_BF16_INLINE __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,fma"), \
                                             always_inline)) inline

namespace cmfast {
namespace {

// one_plus_exp_neg (group_norm_loops.h) on 16 lanes, each step the scalar code's own (its FMAs as the compiler
// contracts them there).
CMFAST_GN_BF16_INLINE __m512 one_plus_exp_neg16(__m512 y) {
  const __m512i bits = _mm512_castps_si512(y);
  const __m512i magnitude = _mm512_min_epu32(_mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff)),
                                             _mm512_set1_epi32(0x42ae0000));  // 87.0f
  y = _mm512_castsi512_ps(_mm512_or_si512(magnitude, _mm512_and_si512(bits, _mm512_set1_epi32(int(0x80000000u)))));
  const __m512 k = _mm512_fmadd_ps(y, _mm512_set1_ps(-1.44269504088896341f), _mm512_set1_ps(12582912.0f));
  const __m512 n = _mm512_sub_ps(k, _mm512_set1_ps(12582912.0f));
  __m512 r = _mm512_fnmsub_ps(n, _mm512_set1_ps(0.693359375f), y);  // -y - n * ln2_hi
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(8.312519639730453e-3f), r, _mm512_set1_ps(4.1890114545822144e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6667114198207855e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.99992311000824e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512i scaled = _mm512_add_epi32(_mm512_castps_si512(p), _mm512_slli_epi32(_mm512_castps_si512(k), 23));
  return _mm512_add_ps(_mm512_set1_ps(1.0f), _mm512_castsi512_ps(scaled));
}

template <bool SILU>
CMFAST_GN_BF16_INLINE __m512 epilogue16(__m512 y) {
  return SILU ? _mm512_div_ps(y, one_plus_exp_neg16(y)) : y;
}

// 16 bf16 from p to fp32 (exact).
CMFAST_GN_BF16_INLINE __m512 widen16(const uint16_t* p) {
  const __m512i bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
}

// 32 values to bf16 at p, rounded to nearest even.
CMFAST_GN_BF16_INLINE void store32(uint16_t* p, __m512 low, __m512 high) {
  _mm512_storeu_si512(p, (__m512i)_mm512_cvtne2ps_pbh(high, low));
}

CMFAST_GN_BF16_INLINE float scalar_affine(float x, float mean, float a, float d) { return (x - mean) * a + d; }

template <bool SILU>
CMFAST_GN_BF16_INLINE uint16_t scalar_value(uint16_t x, float mean, float a, float d) {
  const float y = scalar_affine(c10::detail::f32_from_bits(x), mean, a, d);
  return c10::BFloat16(SILU ? y / one_plus_exp_neg(y) : y).x;
}

// The next wave's (or group's) `count` values at next + offset towards the cache, where there is a next.
CMFAST_GN_BF16_INLINE void prefetch_values(const c10::BFloat16* next, int64_t offset, int64_t count) {
  if (next == nullptr) return;
  const char* line = reinterpret_cast<const char*>(next + offset);
  for (int64_t b = 0; b < count * 2; b += 64) __builtin_prefetch(line + b);
}

// out[i] = epilogue((x[i] - mean_i) * a_i + d_i) for 32 values: (m0, a0, d0) the parameters of values 0-15,
// (m1, a1, d1) those of values 16-31.
template <bool SILU>
CMFAST_GN_BF16_INLINE void affine32(const uint16_t* x, uint16_t* out, __m512 m0, __m512 m1, __m512 a0, __m512 a1,
                                    __m512 d0, __m512 d1) {
  const __m512 low = _mm512_fmadd_ps(_mm512_sub_ps(widen16(x), m0), a0, d0);
  const __m512 high = _mm512_fmadd_ps(_mm512_sub_ps(widen16(x + 16), m1), a1, d1);
  store32(out, epilogue16<SILU>(low), epilogue16<SILU>(high));
}

// affine_rows for bf16: rows of C channels (channels_last), channel c's mean[c], a[c], d[c].
template <bool SILU>
CMFAST_GN_BF16 void affine_rows_bf16(const c10::BFloat16* x_, c10::BFloat16* out_, int64_t rows, int64_t C,
                                     const float* __restrict__ mean, const float* __restrict__ a,
                                     const float* __restrict__ d, const c10::BFloat16* next) {
  const auto* x = reinterpret_cast<const uint16_t*>(x_);
  auto* out = reinterpret_cast<uint16_t*>(out_);
  for (int64_t p = 0; p < rows; ++p) {
    prefetch_values(next, p * C, C);
    const uint16_t* xr = x + p * C;
    uint16_t* orow = out + p * C;
    int64_t c = 0;
    for (; c + 32 <= C; c += 32) {
      affine32<SILU>(xr + c, orow + c, _mm512_loadu_ps(mean + c), _mm512_loadu_ps(mean + c + 16),
                     _mm512_loadu_ps(a + c), _mm512_loadu_ps(a + c + 16), _mm512_loadu_ps(d + c),
                     _mm512_loadu_ps(d + c + 16));
    }
    for (; c < C; ++c) orow[c] = scalar_value<SILU>(xr[c], mean[c], a[c], d[c]);
  }
}

// affine_channels for bf16: a group's channels k of n contiguous values each, one mean, channel k's a[k], d[k].
template <bool SILU>
CMFAST_GN_BF16 void affine_channels_bf16(const c10::BFloat16* x_, c10::BFloat16* out_, int64_t channels, int64_t n,
                                         float mean, const float* __restrict__ a, const float* __restrict__ d,
                                         const c10::BFloat16* next) {
  const auto* x = reinterpret_cast<const uint16_t*>(x_);
  auto* out = reinterpret_cast<uint16_t*>(out_);
  const __m512 m = _mm512_set1_ps(mean);
  for (int64_t k = 0; k < channels; ++k) {
    prefetch_values(next, k * n, n);
    const uint16_t* xk = x + k * n;
    uint16_t* ok = out + k * n;
    const __m512 ak = _mm512_set1_ps(a[k]), dk = _mm512_set1_ps(d[k]);
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) affine32<SILU>(xk + i, ok + i, m, m, ak, ak, dk, dk);
    for (; i < n; ++i) ok[i] = scalar_value<SILU>(xk[i], mean, a[k], d[k]);
  }
}

}  // namespace
}  // namespace cmfast

#pragma GCC diagnostic pop
