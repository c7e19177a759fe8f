// How the CUDA group_norm (kernels/group_norm.cu) runs a call: the kernel, the packet width, the blocks per group,
// the shared memory and the workspace, as a pure function of the shape, the pointers' alignment and the device's
// limits. Plain host C++ (no CUDA runtime, no torch): the CPU build binds it too (cmfast._C.group_norm_cuda_plan),
// so tests check the plans for the GPUs a machine does not have.
#pragma once
#include <stdint.h>

#include <algorithm>

#include "host_device.h"

namespace cmfast {
namespace group_norm_tuning {

constexpr int kThreads = 256;
constexpr int kSmallItems = 4;    // fused kernel: packets per thread for groups up to 1024 packets
constexpr int kLargeItems = 16;   // ... up to 4096 packets (16K fp32 / 32K fp16 elements; 64 data registers)
constexpr int kSharedThreads = 1024;  // shared kernel: one block per SM (its shared memory), so the most threads
constexpr int kSharedLoads = 4;       // ... and 4 packets in flight per thread: 64 KB a block
constexpr int kSharedReserve = 1024;  // ... the opt-in limit less this: block_sum's few floats come on top
constexpr int kMaxCluster = 8;    // cluster kernel: blocks per group at most (the portable cluster size)
constexpr int kMaxSplits = 32;    // two-stage: blocks per group at most
constexpr int kMinSplitPackets = 2 * kThreads;  // ... and at least two packets per thread in each

}  // namespace group_norm_tuning

struct GroupNormShape {
  int64_t batch;
  int64_t channels;
  int64_t spatial;  // product of the spatial sizes (1 when there are none)
  int64_t groups;
  bool channels_last;
};

// What a plan needs of a device; the defaults are the estimates used when it cannot be asked.
struct DeviceLimits {
  int sms = 108;
  int shared_optin = 48 * 1024;  // dynamic shared memory a block may opt in to
  int major = 8;                 // compute capability: clusters from 9
};

// One block per group that keeps the group in registers (items > 0) or in shared memory (shared_bytes > 0), a
// cluster of `splits` blocks per group that keep it in registers (cluster, items > 0), or `splits` blocks per group
// in two stages (partial statistics to a workspace of workspace_floats fp32, then normalise).
struct GroupNormLaunch {
  int vec = 0;    // elements per load/store (16 bytes when the layout and pointers allow); 0: shape not supported
  int items = 0;  // packets each thread keeps in registers, or 0
  int splits = 1;
  int64_t workspace_floats = 0;
  int64_t shared_bytes = 0;  // the shared-memory kernel's dynamic shared memory, or 0
  bool cluster = false;      // the cluster kernel (sm_90+)

  const char* kernel() const {
    if (vec == 0) return "unsupported";
    if (cluster) return "cluster";
    if (items > 0) return "fused";
    return shared_bytes > 0 ? "shared" : "two-stage";
  }
};

// Packets [begin, end) of block `s` of the `splits` that share a group of `packets`: equal runs, the last shorter
// (or empty). s * chunk < packets + splits < 2^32 for packets < 2^31.
CMFAST_HD void split_range(uint32_t packets, int splits, int s, uint32_t& begin, uint32_t& end) {
  const uint32_t chunk = (packets + uint32_t(splits) - 1) / uint32_t(splits);
  begin = uint32_t(s) * chunk < packets ? uint32_t(s) * chunk : packets;
  end = begin + chunk < packets ? begin + chunk : packets;
}

// The plan of a call. `alignment`: the largest power of two up to 16 that divides both x's and out's addresses.
inline GroupNormLaunch plan_group_norm(const GroupNormShape& shape, int element_bytes, int alignment,
                                       const DeviceLimits& limits, bool clusters) {
  using namespace group_norm_tuning;
  GroupNormLaunch plan;
  if (shape.groups <= 0 || shape.channels % shape.groups != 0) return plan;
  const int64_t group_channels = shape.channels / shape.groups;
  const int64_t n = group_channels * shape.spatial;
  const int64_t groups_total = shape.batch * shape.groups;
  if (n <= 0 || n > INT32_MAX || groups_total <= 0 || groups_total > INT32_MAX) return plan;
  // VEC: the widest packet that stays inside a run and is aligned; only these three are compiled.
  const int64_t run = shape.channels_last ? group_channels : shape.spatial;
  for (int vec : {16 / element_bytes, 2, 1}) {
    if (run % vec == 0 && alignment % (vec * element_bytes) == 0) {
      plan.vec = vec;
      break;
    }
  }
  if (plan.vec == 0) return plan;  // alignment below one element
  const int64_t packets = n / plan.vec;
  // Blocks per group: enough for two blocks per SM, when the groups alone are too few.
  const int64_t wanted = 2 * groups_total >= limits.sms ? 1 : (2 * int64_t(limits.sms) + groups_total - 1) / groups_total;
  plan.splits = int(std::max<int64_t>(1, std::min<int64_t>({wanted, kMaxSplits, packets / kMinSplitPackets})));
  // One block per group reads it once, when it fits in registers.
  if (plan.splits == 1 && packets <= int64_t(kThreads) * kLargeItems) {
    plan.items = packets <= int64_t(kThreads) * kSmallItems ? kSmallItems : kLargeItems;
    return plan;
  }
  // Too few groups, on sm_90+: a cluster per group, when its share fits each block's registers.
  if (plan.splits > 1 && limits.major >= 9 && clusters) {
    const int blocks = std::min(plan.splits, kMaxCluster);
    const int64_t share = (packets + blocks - 1) / blocks;
    if (share <= int64_t(kThreads) * kLargeItems) {
      plan.splits = blocks;
      plan.cluster = true;
      plan.items = share <= int64_t(kThreads) * kSmallItems ? kSmallItems : kLargeItems;
      return plan;
    }
  }
  // Else in shared memory, when a block may have that much.
  if (plan.splits == 1 && n * element_bytes <= limits.shared_optin - kSharedReserve) {
    plan.shared_bytes = n * element_bytes;
    return plan;
  }
  plan.workspace_floats = groups_total * plan.splits * 3;
  return plan;
}

}  // namespace cmfast
