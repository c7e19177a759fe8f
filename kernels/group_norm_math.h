// The group_norm op's arithmetic, shared by the CPU kernel (csrc/group_norm.cpp) and the CUDA kernels
// (kernels/group_norm.cu) so the formulas exist once. Plain host/device fp32; no torch, no CUDA runtime.
#pragma once
#include <math.h>
#include <stdint.h>

#include "host_device.h"

namespace cmfast {

// The statistics of a set of values: count, mean and the sum of squared deviations from the mean (M2).
// Sets are combined with Chan et al.'s update, which never subtracts two large sums, so fp32 stays accurate
// however many values there are (a plain fp32 sum of squares would not: groups reach 98k elements).
struct Moments {
  float n;
  float mean;
  float m2;
};

CMFAST_HD Moments merge(Moments a, Moments b) {
  const float n = a.n + b.n;
  const float wb = n > 0.0f ? b.n / n : 0.0f;  // empty + empty stays empty
  const float delta = b.mean - a.mean;
  return {n, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.n * wb};
}

// 1 / sqrt(biased variance + eps), as torch's GroupNorm.
CMFAST_HD float inv_std(Moments m, float eps) { return 1.0f / sqrtf(m.m2 / m.n + eps); }

// y = (x - mean) * a + d is the whole per-channel epilogue: ((x - mean) * rstd * weight + bias) * (1 + scale) + shift.
// (Subtracting the mean first keeps fp32 accurate when a group's spread is small against its mean.)
// weight/bias are indexed by channel c, scale/shift by bc = b * C + c; any pointer may be null (absent).
struct Affine {
  float a;
  float d;
};

CMFAST_HD Affine channel_affine(float rstd, const float* weight, const float* bias, const float* scale,
                                const float* shift, int64_t c, int64_t bc) {
  float a = weight ? rstd * weight[c] : rstd;
  float d = bias ? bias[c] : 0.0f;
  if (scale) {
    const float s = 1.0f + scale[bc];
    a *= s;
    d *= s;
  }
  if (shift) d += shift[bc];
  return {a, d};
}

}  // namespace cmfast
