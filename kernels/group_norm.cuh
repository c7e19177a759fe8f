// CUDA launchers of the `group_norm` op: raw pointers, sizes and a stream; no torch.
// x and out are (batch, C, spatial) contiguous, or (batch, spatial, C) when channels_last (4-d NHWC); group g
// of a sample is channels [g * C/G, (g+1) * C/G). weight/bias are fp32 (C,), scale/shift fp32 (batch, C); any of
// them may be null. Statistics and arithmetic in fp32; out in x's dtype.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "dtypes.cuh"
#include "group_norm_plan.h"

namespace cmfast {

// The launch plan (kernels/group_norm_plan.h) for x's dtype on the current device: it depends on the shape, the
// pointers' alignment and the device (SM count, shared memory, compute capability); the caller allocates
// workspace_floats fp32 on the device.
struct GroupNormPlan : GroupNormLaunch {
  DType dtype = DType::f32;
};

GroupNormPlan group_norm_cuda_plan(DType dtype, const GroupNormShape& shape, const void* x, const void* out);

// out = (GroupNorm(x) * weight + bias) * (1 + scale) + shift, then SiLU if `silu`, as planned; workspace holds the
// plan's workspace_floats.
cudaError_t group_norm_cuda(const GroupNormPlan& plan, const GroupNormShape& shape, const void* x,
                            const float* weight, const float* bias, const float* scale, const float* shift, void* out,
                            float* workspace, float eps, bool silu, cudaStream_t stream);

}  // namespace cmfast
