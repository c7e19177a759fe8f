// The consistency-model preconditioning (docs/model.md section 3), shared by the CPU and CUDA kernels so the
// formulas exist once in C++. Plain host/device arithmetic in fp32; no torch, no CUDA runtime.
#pragma once
#include <math.h>

#include "host_device.h"

namespace cmfast {

struct Scalings {
  float skip;  // c_skip(sigma)
  float out;   // c_out(sigma)
  float in;    // c_in(sigma)
};

// sigma_min = eps for consistency models; sigma_min = 0 gives the EDM teacher's scalings.
// The operation order matches the pure-PyTorch reference (cmfast/ops/consistency.py).
CMFAST_HD Scalings consistency_scalings(float sigma, float sigma_data, float sigma_min) {
  const float sd2 = sigma_data * sigma_data;
  const float d = sigma - sigma_min;
  const float r = sqrtf(sigma * sigma + sd2);
  return {sd2 / (d * d + sd2), d * sigma_data / r, 1.0f / r};
}

// The network's time input: 1000 * 0.25 * ln(sigma + 1e-44).
CMFAST_HD float time_input(float sigma) { return 250.0f * logf(sigma + 1e-44f); }

// Clamp to [-1, 1]; NaN passes through, as with torch.clamp.
CMFAST_HD float clamp_unit(float v) { return v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v); }

}  // namespace cmfast
