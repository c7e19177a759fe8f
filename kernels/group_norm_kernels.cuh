// The CUDA group_norm kernels, device code only: group_norm.cu (their one includer) describes them at its top, reads
// the device, plans and launches them.
#pragma once
#include <cooperative_groups.h>

#include "group_norm.cuh"
#include "group_norm_math.h"

namespace cmfast {
namespace group_norm_kernels {

using namespace group_norm_tuning;  // the launch constants, shared with the plan (group_norm_plan.h)
constexpr int kWarps = kThreads / 32;

struct Params {
  const void* x;
  void* out;
  const float* weight;
  const float* bias;
  const float* scale;
  const float* shift;
  float* workspace;  // two-stage: Moments of (group, split), 3 floats each
  int64_t channels;
  int64_t spatial;
  int64_t groups;
  int64_t group_channels;
  uint32_t packets;  // per group
  uint32_t run;      // packets per contiguous run: spatial / VEC, or group_channels / VEC (channels_last)
  int splits;
  float eps;
  bool silu;
};

// Where packet q of group bg lives: its element offset and its (first) channel.
template <int VEC, bool CL>
struct GroupLayout {
  int64_t base;  // offset of the group's first element
  int64_t first_channel;

  __device__ GroupLayout(const Params& p, int64_t bg) {
    const int64_t b = bg / p.groups;
    first_channel = bg % p.groups * p.group_channels;
    base = CL ? b * p.spatial * p.channels + first_channel : bg * p.group_channels * p.spatial;
  }

  __device__ __forceinline__ void locate(const Params& p, uint32_t q, int64_t& offset, int64_t& channel) const {
    const uint32_t r = q / p.run;  // contiguous: the channel in the group; channels_last: the pixel
    const uint32_t k = q - r * p.run;
    if constexpr (CL) {
      offset = base + int64_t(r) * p.channels + int64_t(k) * VEC;
      channel = first_channel + int64_t(k) * VEC;
    } else {
      offset = base + int64_t(q) * VEC;
      channel = first_channel + r;
    }
  }
};

// SiLU with the fast exp and the fast division (MUFU reciprocal and a multiply, 2 ulp): the IEEE division is ~10
// instructions an element, which puts a half-type epilogue near the FP32 pipes' limit at DRAM speed. Past
// |1 + exp(-y)| > 2^126 (y < -87.3) the quotient is 0, SiLU's limit there anyway.
__device__ __forceinline__ float silu(float y) { return __fdividef(y, 1.0f + __expf(-y)); }

// One packet through the epilogue. Contiguous: one channel for the packet; channels_last: VEC channels.
template <typename T, int VEC, bool CL>
__device__ __forceinline__ Packed<T, VEC> normalise(const Params& p, const Packed<T, VEC>& in, int64_t b,
                                                   int64_t channel, float mean, float rstd) {
  Packed<T, VEC> out;
  Affine f = channel_affine(rstd, p.weight, p.bias, p.scale, p.shift, channel, b * p.channels + channel);
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    if (CL && k > 0) {
      f = channel_affine(rstd, p.weight, p.bias, p.scale, p.shift, channel + k, b * p.channels + channel + k);
    }
    const float y = (to_float(in.v[k]) - mean) * f.a + f.d;
    out.v[k] = from_float<T>(p.silu ? silu(y) : y);
  }
  return out;
}

__device__ __forceinline__ Moments shuffle_down(Moments m, int offset) {
  return {__shfl_down_sync(0xffffffffu, m.n, offset), __shfl_down_sync(0xffffffffu, m.mean, offset),
          __shfl_down_sync(0xffffffffu, m.m2, offset)};
}

// The merged Moments of the warp, in lane 0.
__device__ __forceinline__ Moments warp_merge(Moments m) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) m = merge(m, shuffle_down(m, offset));
  return m;
}

// The merged Moments of the block, in thread 0.
__device__ __forceinline__ Moments block_merge(Moments m) {
  __shared__ Moments warps[kWarps];
  m = warp_merge(m);
  if (threadIdx.x % 32 == 0) warps[threadIdx.x / 32] = m;
  __syncthreads();
  if (threadIdx.x < 32) m = warp_merge(threadIdx.x < kWarps ? warps[threadIdx.x] : Moments{0.0f, 0.0f, 0.0f});
  return m;
}

// The total of v over a block of THREADS threads, in every thread.
template <int THREADS = kThreads>
__device__ __forceinline__ float block_sum(float v) {
  constexpr int kBlockWarps = THREADS / 32;
  __shared__ float warps[kBlockWarps];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) warps[threadIdx.x / 32] = v;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int w = 0; w < kBlockWarps; ++w) total += warps[w];
  __syncthreads();  // warps[] may be reused by the next call
  return total;
}

// f(i, offset, channel) for each packet i < ITEMS of this thread that lies in [begin, end) (unrolled: i is a
// constant in each copy, so arrays indexed by it stay in registers).
template <int ITEMS, typename Layout, typename F>
__device__ __forceinline__ void for_each_held(const Layout& layout, const Params& p, uint32_t begin, uint32_t end,
                                              F&& f) {
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const uint32_t q = begin + threadIdx.x + i * kThreads;
    if (q < end) {
      int64_t offset, channel;
      layout.locate(p, q, offset, channel);
      f(i, offset, channel);
    }
  }
}

// This block's packets [begin, end) of group bg, held in registers: their sum, the group mean, their squared
// deviations from it, then normalised and written. `group_total(v, slot)` turns the block's total v (slot 0: of
// the values, 1: of the squared deviations) into the group's: the identity when the block has the whole group.
template <typename T, int VEC, bool CL, int ITEMS, typename GroupTotal>
__device__ __forceinline__ void normalise_held(const Params& p, int64_t bg, uint32_t begin, uint32_t end,
                                               GroupTotal group_total) {
  using Pack = Packed<T, VEC>;
  const GroupLayout<VEC, CL> layout(p, bg);
  const T* x = static_cast<const T*>(p.x);
  Pack v[ITEMS];
  float sum = 0.0f;
  for_each_held<ITEMS>(layout, p, begin, end, [&](int i, int64_t offset, int64_t) {
    v[i] = *reinterpret_cast<const Pack*>(x + offset);
#pragma unroll
    for (int k = 0; k < VEC; ++k) sum += to_float(v[i].v[k]);
  });
  const float n = float(p.packets) * VEC;
  const float mean = group_total(block_sum(sum), 0) / n;
  float squares = 0.0f;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    if (begin + threadIdx.x + i * kThreads < end) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float d = to_float(v[i].v[k]) - mean;
        squares += d * d;
      }
    }
  }
  const float rstd = inv_std({n, mean, group_total(block_sum(squares), 1)}, p.eps);
  T* out = static_cast<T*>(p.out);
  const int64_t b = bg / p.groups;
  for_each_held<ITEMS>(layout, p, begin, end, [&](int i, int64_t offset, int64_t channel) {
    *reinterpret_cast<Pack*>(out + offset) = normalise<T, VEC, CL>(p, v[i], b, channel, mean, rstd);
  });
}

template <typename T, int VEC, bool CL, int ITEMS>
__global__ void __launch_bounds__(kThreads, 1) group_norm_fused_kernel(Params p) {
  normalise_held<T, VEC, CL, ITEMS>(p, blockIdx.x, 0, p.packets, [](float total, int) { return total; });
}

// One block per group, the group in dynamic shared memory (plan.shared_bytes): loaded once with the sum taken on
// the way, squared deviations from the cached copy, then normalised from it. Same statistics as the fused kernel.
template <typename T, int VEC, bool CL>
__global__ void __launch_bounds__(kSharedThreads, 1) group_norm_shared_kernel(Params p) {
  using Pack = Packed<T, VEC>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  Pack* cache = reinterpret_cast<Pack*>(shared_bytes);
  const int64_t bg = blockIdx.x;
  const GroupLayout<VEC, CL> layout(p, bg);
  const T* x = static_cast<const T*>(p.x);
  float sum = 0.0f;
  for (uint32_t first = threadIdx.x; first < p.packets; first += kSharedLoads * kSharedThreads) {
    Pack v[kSharedLoads];  // all loads issued before the first use: that many in flight per thread
#pragma unroll
    for (int u = 0; u < kSharedLoads; ++u) {
      const uint32_t q = first + u * kSharedThreads;
      if (q < p.packets) {
        int64_t offset, channel;
        layout.locate(p, q, offset, channel);
        v[u] = *reinterpret_cast<const Pack*>(x + offset);
      }
    }
#pragma unroll
    for (int u = 0; u < kSharedLoads; ++u) {
      const uint32_t q = first + u * kSharedThreads;
      if (q < p.packets) {
        cache[q] = v[u];
#pragma unroll
        for (int k = 0; k < VEC; ++k) sum += to_float(v[u].v[k]);
      }
    }
  }
  const float n = float(p.packets) * VEC;
  const float mean = block_sum<kSharedThreads>(sum) / n;  // its __syncthreads also publishes cache[]
  float squares = 0.0f;
  for (uint32_t q = threadIdx.x; q < p.packets; q += kSharedThreads) {
    const Pack v = cache[q];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float d = to_float(v.v[k]) - mean;
      squares += d * d;
    }
  }
  const float rstd = inv_std({n, mean, block_sum<kSharedThreads>(squares)}, p.eps);
  T* out = static_cast<T*>(p.out);
  const int64_t b = bg / p.groups;
  for (uint32_t q = threadIdx.x; q < p.packets; q += kSharedThreads) {
    int64_t offset, channel;
    layout.locate(p, q, offset, channel);
    *reinterpret_cast<Pack*>(out + offset) = normalise<T, VEC, CL>(p, cache[q], b, channel, mean, rstd);
  }
}

// A cluster of p.splits blocks per group (sm_90+): block `rank` holds its share of the packets (as split_range);
// each block total is read by every block of the cluster from every other one's shared memory, in rank order
// (identical statistics in all).
template <typename T, int VEC, bool CL, int ITEMS>
__global__ void __launch_bounds__(kThreads, 1) group_norm_cluster_kernel(Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  const cg::cluster_group cluster = cg::this_cluster();
  __shared__ float block_totals[2];  // this block's total of the values, then of the squared deviations
  const int splits = p.splits;
  auto group_total = [&](float total, int slot) {
    if (threadIdx.x == 0) block_totals[slot] = total;
    cluster.sync();
    float sum = 0.0f;
    for (int r = 0; r < splits; ++r) sum += *cluster.map_shared_rank(&block_totals[slot], r);
    if (slot == 1) cluster.sync();  // all reads done: every block may finish and exit
    return sum;
  };
  uint32_t begin, end;
  split_range(p.packets, splits, int(cluster.block_rank()), begin, end);
  normalise_held<T, VEC, CL, ITEMS>(p, blockIdx.x / splits, begin, end, group_total);
#else
  __trap();  // this build has no cluster code for this GPU: never planned (device_limits), loud if it were
#endif
}

// Two-stage, first stage: block (group bg, split s) writes the Moments of its packets.
template <typename T, int VEC, bool CL>
__global__ void __launch_bounds__(kThreads) group_norm_stats_kernel(Params p) {
  using Pack = Packed<T, VEC>;
  const int64_t bg = blockIdx.x;
  const GroupLayout<VEC, CL> layout(p, bg);
  const T* x = static_cast<const T*>(p.x);
  uint32_t begin, end;
  split_range(p.packets, p.splits, int(blockIdx.y), begin, end);
  Moments m{0.0f, 0.0f, 0.0f};
  for (uint32_t q = begin + threadIdx.x; q < end; q += kThreads) {
    int64_t offset, channel;
    layout.locate(p, q, offset, channel);
    const Pack v = *reinterpret_cast<const Pack*>(x + offset);
    float sum = 0.0f;
#pragma unroll
    for (int k = 0; k < VEC; ++k) sum += to_float(v.v[k]);
    const float mean = sum * (1.0f / VEC);
    float m2 = 0.0f;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float d = to_float(v.v[k]) - mean;
      m2 += d * d;
    }
    m = merge(m, {float(VEC), mean, m2});
  }
  m = block_merge(m);
  if (threadIdx.x == 0) {
    float* w = p.workspace + (bg * p.splits + blockIdx.y) * 3;
    w[0] = m.n;
    w[1] = m.mean;
    w[2] = m.m2;
  }
}

// Two-stage, second stage: block (group bg, split s) merges the group's partial Moments, normalises its packets.
template <typename T, int VEC, bool CL>
__global__ void __launch_bounds__(kThreads) group_norm_apply_kernel(Params p) {
  using Pack = Packed<T, VEC>;
  const int64_t bg = blockIdx.x;
  __shared__ float stats[2];
  if (threadIdx.x < 32) {
    Moments m{0.0f, 0.0f, 0.0f};
    for (int s = threadIdx.x; s < p.splits; s += 32) {
      const float* w = p.workspace + (bg * p.splits + s) * 3;
      m = merge(m, {w[0], w[1], w[2]});
    }
    m = warp_merge(m);
    if (threadIdx.x == 0) {
      stats[0] = m.mean;
      stats[1] = inv_std(m, p.eps);
    }
  }
  __syncthreads();
  const float mean = stats[0], rstd = stats[1];
  const GroupLayout<VEC, CL> layout(p, bg);
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  const int64_t b = bg / p.groups;
  uint32_t begin, end;
  split_range(p.packets, p.splits, int(blockIdx.y), begin, end);
  for (uint32_t q = begin + threadIdx.x; q < end; q += kThreads) {
    int64_t offset, channel;
    layout.locate(p, q, offset, channel);
    const Pack v = *reinterpret_cast<const Pack*>(x + offset);
    *reinterpret_cast<Pack*>(out + offset) = normalise<T, VEC, CL>(p, v, b, channel, mean, rstd);
  }
}

}  // namespace group_norm_kernels
}  // namespace cmfast
