// The group_norm op on the GPU: GroupNorm statistics per (sample, group), then one affine map per channel
// (weight/bias and scale/shift folded in, kernels/group_norm_math.h) and an optional SiLU. Memory bound. The
// kernels are in group_norm_kernels.cuh; this file reads the device, plans (group_norm_plan.h) and launches.
//
// A group is read as packets of VEC elements (16-byte loads where the layout and pointers allow). Contiguous:
// the group is one run of C/G * spatial elements, and a packet lies in one channel. Channels_last: the group is
// `spatial` runs of C/G channels, C apart, and a packet holds VEC consecutive channels of one pixel.
//   fused kernel:      one block per group holds its packets in registers: read once, exact two-pass statistics.
//   shared kernel:     groups too large for registers but within a block's shared memory (fp16 768x64x64 groups are
//                      196 KB: H100 blocks may have 227 KB) are held there instead: still read once from DRAM.
//   cluster kernel:    too few groups to fill the GPU (batch 1 has 32) on sm_90+: a cluster of up to 8 blocks per
//                      group, each holding its share in registers, statistics merged through distributed shared
//                      memory: one launch, read once, no workspace.
//   two-stage kernels: when the group does not fit, or there are too few groups to fill the GPU (batch 1 has 32),
//                      `splits` blocks per group write partial Moments to the workspace, then as many blocks merge
//                      them (in the same order: identical statistics) and normalise their slice.

#include <cstdlib>
#include <string>
#include <vector>

#include "group_norm.cuh"
#include "group_norm_kernels.cuh"

namespace cmfast {
namespace {

using namespace group_norm_tuning;  // the launch constants, shared with the plan (group_norm_plan.h)
using namespace group_norm_kernels;

// Launches the cluster kernel: groups_total clusters of plan.splits blocks.
template <typename T, int VEC, bool CL, int ITEMS>
cudaError_t launch_clusters(const GroupNormPlan& plan, const Params& p, int64_t groups_total, cudaStream_t stream) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(unsigned(groups_total * plan.splits));
  config.blockDim = dim3(kThreads);
  config.stream = stream;
  cudaLaunchAttribute cluster;
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = unsigned(plan.splits);
  cluster.val.clusterDim.y = 1;
  cluster.val.clusterDim.z = 1;
  config.attrs = &cluster;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, group_norm_cluster_kernel<T, VEC, CL, ITEMS>, p);
}

// The current device's limits, read once per device and thread (attribute queries are driver calls, and a batch-1
// call is all host time); the estimates of DeviceLimits when they cannot be read. `major` says 8 when this build has
// no cluster code for the device (an "8.0+PTX" build run on an H100: the cluster kernel would be compiled empty).
DeviceLimits device_limits() {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0) {
    cudaGetLastError();  // clear this failure: the estimates serve
    return {};
  }
  static thread_local std::vector<DeviceLimits> known;  // by device; sms == 0: not read yet
  if (size_t(device) >= known.size()) known.resize(size_t(device) + 1, DeviceLimits{0, 0, 0});
  DeviceLimits& limits = known[size_t(device)];
  if (limits.sms == 0) {
    DeviceLimits read;
    bool failed = false;
    auto attribute = [&](cudaDeviceAttr which, int& into) {
      int value = 0;
      if (cudaDeviceGetAttribute(&value, which, device) == cudaSuccess && value > 0) {
        into = value;
      } else {
        failed = true;
      }
    };
    attribute(cudaDevAttrMultiProcessorCount, read.sms);
    attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, read.shared_optin);
    attribute(cudaDevAttrComputeCapabilityMajor, read.major);
    if (read.major >= 9) {
      cudaFuncAttributes cluster_code = {};
      const cudaError_t err =
          cudaFuncGetAttributes(&cluster_code, group_norm_cluster_kernel<float, 4, false, kSmallItems>);
      if (err != cudaSuccess || cluster_code.ptxVersion < 90) {
        failed = failed || err != cudaSuccess;
        read.major = 8;
      }
    }
    if (failed) cudaGetLastError();  // clear only what these queries left: the estimates serve
    limits = read;
  }
  return limits;
}

// CMFAST_GROUP_NORM_CLUSTER=0 (read once) keeps batch 1 on the two-stage kernels: to compare the two on one
// GPU, or where clusters cannot be scheduled.
bool clusters_enabled() {
  static const bool enabled = [] {
    const char* value = std::getenv("CMFAST_GROUP_NORM_CLUSTER");
    return value == nullptr || std::string(value) != "0";
  }();
  return enabled;
}

template <typename T, int VEC, bool CL>
cudaError_t launch(const GroupNormPlan& plan, const Params& p, int64_t groups_total, cudaStream_t stream) {
  const dim3 grid(unsigned(groups_total), unsigned(plan.splits));
  if (plan.cluster) {
    const cudaError_t err = plan.items == kSmallItems
                                ? launch_clusters<T, VEC, CL, kSmallItems>(plan, p, groups_total, stream)
                                : launch_clusters<T, VEC, CL, kLargeItems>(plan, p, groups_total, stream);
    if (err != cudaSuccess) return err;
  } else if (plan.items == kSmallItems) {
    group_norm_fused_kernel<T, VEC, CL, kSmallItems><<<grid, kThreads, 0, stream>>>(p);
  } else if (plan.items == kLargeItems) {
    group_norm_fused_kernel<T, VEC, CL, kLargeItems><<<grid, kThreads, 0, stream>>>(p);
  } else if (plan.shared_bytes > 0) {
    // The most the plan ever asks for on this device (not this call's size): host threads launching at once all
    // set the same value, so none can shrink the limit under another's launch.
    auto kernel = group_norm_shared_kernel<T, VEC, CL>;
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 device_limits().shared_optin - kSharedReserve);
    if (err != cudaSuccess) return err;
    kernel<<<grid, kSharedThreads, plan.shared_bytes, stream>>>(p);
  } else {
    group_norm_stats_kernel<T, VEC, CL><<<grid, kThreads, 0, stream>>>(p);
    group_norm_apply_kernel<T, VEC, CL><<<grid, kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T, bool CL>
cudaError_t launch_vec(const GroupNormPlan& plan, const Params& p, int64_t groups_total, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  switch (plan.vec) {
    case kVec: return launch<T, kVec, CL>(plan, p, groups_total, stream);
    case 2: return launch<T, 2, CL>(plan, p, groups_total, stream);
    case 1: return launch<T, 1, CL>(plan, p, groups_total, stream);
  }
  return cudaErrorInvalidValue;
}

int dtype_bytes(DType dtype) { return dtype == DType::f32 ? 4 : 2; }

// The largest power of two up to 16 that divides both addresses.
int common_alignment(const void* x, const void* out) {
  const uintptr_t bits = reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(out);
  int alignment = 16;
  while (alignment > 1 && bits % alignment != 0) alignment /= 2;
  return alignment;
}

}  // namespace

GroupNormPlan group_norm_cuda_plan(DType dtype, const GroupNormShape& shape, const void* x, const void* out) {
  GroupNormPlan plan;
  static_cast<GroupNormLaunch&>(plan) =
      plan_group_norm(shape, dtype_bytes(dtype), common_alignment(x, out), device_limits(), clusters_enabled());
  plan.dtype = dtype;
  return plan;
}

cudaError_t group_norm_cuda(const GroupNormPlan& plan, const GroupNormShape& shape, const void* x,
                            const float* weight, const float* bias, const float* scale, const float* shift, void* out,
                            float* workspace, float eps, bool silu, cudaStream_t stream) {
  if (plan.vec == 0) return cudaErrorInvalidValue;
  if (plan.workspace_floats > 0 && workspace == nullptr) return cudaErrorInvalidValue;
  Params p;
  p.x = x;
  p.out = out;
  p.weight = weight;
  p.bias = bias;
  p.scale = scale;
  p.shift = shift;
  p.workspace = workspace;
  p.channels = shape.channels;
  p.spatial = shape.spatial;
  p.groups = shape.groups;
  p.group_channels = shape.channels / shape.groups;
  p.packets = uint32_t(p.group_channels * shape.spatial / plan.vec);
  p.run = uint32_t((shape.channels_last ? p.group_channels : shape.spatial) / plan.vec);
  p.splits = plan.splits;
  p.eps = eps;
  p.silu = silu;
  const int64_t groups_total = shape.batch * shape.groups;
  return dispatch_dtype(plan.dtype, [&](auto t) {
    using T = decltype(t);
    return shape.channels_last ? launch_vec<T, true>(plan, p, groups_total, stream)
                               : launch_vec<T, false>(plan, p, groups_total, stream);
  });
}

}  // namespace cmfast
