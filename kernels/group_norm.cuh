// CUDA launchers of the `group_norm` op: raw pointers, sizes and a stream; no torch.
// x and out are (batch, C, spatial) contiguous, or (batch, spatial, C) when channels_last (4-d NHWC); group g
// of a sample is channels [g * C/G, (g+1) * C/G). weight/bias are fp32 (C,), scale/shift fp32 (batch, C); any of
// them may be null. Statistics and arithmetic in fp32; out in x's dtype.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "dtypes.cuh"

namespace cmfast {

struct GroupNormShape {
  int64_t batch;
  int64_t channels;
  int64_t spatial;  // product of the spatial sizes (1 when there are none)
  int64_t groups;
  bool channels_last;
};

// How a call runs: one block per group that keeps the group in registers (items > 0) or in shared memory
// (shared_bytes > 0), a cluster of `splits` blocks per group that keep it in registers (cluster, items > 0), or
// `splits` blocks per group in two stages (partial statistics to `workspace`, then normalise). Depends on the
// shape, the pointers' alignment and the current device (SM count, shared memory, compute capability); the caller
// allocates workspace_floats fp32 on the device.
struct GroupNormPlan {
  DType dtype;
  int vec;    // elements per load/store (16 bytes when the layout and pointers allow); 0: shape not supported
  int items;  // packets each thread keeps in registers (single-pass kernel), or 0
  int splits;
  int64_t workspace_floats;
  int64_t shared_bytes;  // the shared-memory kernel's dynamic shared memory, or 0
  bool cluster;          // the cluster kernel (sm_90+)
};

GroupNormPlan group_norm_cuda_plan(DType dtype, const GroupNormShape& shape, const void* x, const void* out);

// out = (GroupNorm(x) * weight + bias) * (1 + scale) + shift, then SiLU if `silu`, as planned; workspace holds the
// plan's workspace_floats.
cudaError_t group_norm_cuda(const GroupNormPlan& plan, const GroupNormShape& shape, const void* x,
                            const float* weight, const float* bias, const float* scale, const float* shift, void* out,
                            float* workspace, float eps, bool silu, cudaStream_t stream);

}  // namespace cmfast
