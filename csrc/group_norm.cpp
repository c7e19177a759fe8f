// The group_norm op's compiled kernels: the CPU kernel here (its inner loops in group_norm_loops.h), the CUDA
// kernels in kernels/group_norm.cu, both registered as cmfast_C::group_norm, which only fills a given `out`. The
// public op (cmfast/ops/group_norm.py) validates and picks a backend; its eager calls then go through
// cmfast::group_norm (bottom of this file, bound in module.cpp), which lays x out (contiguous, or 4-d
// channels_last), allocates `out` like it and runs the kernel.
//
// Each (sample, group) gets fp32 Moments (count, mean, M2) from blocks that are each read twice while cached
// (sum, then squared deviations from the block's mean) and merged with Chan's update, then every channel is
// one affine map y = (x - mean) * a + d (GroupNorm, weight/bias and scale/shift folded together), then SiLU.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "../kernels/group_norm_math.h"
#include "common.h"
#include "cpu_features.h"
#include "group_norm_bf16.h"

#ifdef CMFAST_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../kernels/group_norm.cuh"
#endif

namespace cmfast {
namespace {

constexpr int64_t kGrain = 1 << 14;       // channels_last: elements per thread at least (two passes, two forks)
constexpr int64_t kWaveBytes = 1 << 20;   // channels_last: samples per wave, in bytes of x: x and out in the caches
constexpr int64_t kGroupGrain = 1 << 13;  // contiguous: elements per task (one pass: 2 threads pay from ~16K)
constexpr int64_t kBlock = 4096;     // contiguous: elements per statistics block (16 KB fp32, read twice from L1)
constexpr int64_t kTile = 8192;      // channels_last: elements per statistics tile (whole pixels, read twice)

// ---- the two layouts --------------------------------------------------------------------------------------

struct Problem {
  int64_t batch, channels, spatial, groups;
  const float* weight;
  const float* bias;
  const float* scale;
  const float* shift;
  float eps;
  bool silu;
};

// Contiguous (batch, C, spatial): group (b, g) is one run of C/G * spatial elements; one task per group.
template <typename T>
void group_norm_nchw(const T* x, T* out, const Problem& p) {
  const int64_t cg = p.channels / p.groups, n = cg * p.spatial;
  auto affine = p.silu ? affine_channels<T, true> : affine_channels<T, false>;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (cpu_runs_avx512_bf16()) affine = p.silu ? affine_channels_bf16<true> : affine_channels_bf16<false>;
  }
  at::parallel_for(0, p.batch * p.groups, std::max<int64_t>(1, kGroupGrain / n), [&](int64_t begin, int64_t end) {
    std::vector<float> block(std::is_same_v<T, float> ? 0 : kBlock);  // fp16/bf16 blocks widened to fp32
    std::vector<float> coef(2 * cg);                                    // the group's per-channel a, then d
    for (int64_t bg = begin; bg < end; ++bg) {
      const T* xg = x + bg * n;
      Moments m{0.0f, 0.0f, 0.0f};
      for (int64_t i = 0; i < n; i += kBlock) {
        const int64_t len = std::min(kBlock, n - i);
        const float* v;
        if constexpr (std::is_same_v<T, float>) {
          v = xg + i;
        } else {
          widen(xg + i, block.data(), len);
          v = block.data();
        }
        const float mean = sum_of(v, len) / static_cast<float>(len);
        m = merge(m, {static_cast<float>(len), mean, squared_deviations(v, len, mean)});
      }
      const float rstd = inv_std(m, p.eps);
      const int64_t b = bg / p.groups;
      for (int64_t c = bg % p.groups * cg, k = 0; k < cg; ++c, ++k) {
        const Affine f = channel_affine(rstd, p.weight, p.bias, p.scale, p.shift, c, b * p.channels + c);
        coef[k] = f.a;
        coef[cg + k] = f.d;
      }
      affine(xg, out + bg * n, cg, p.spatial, m.mean, coef.data(), coef.data() + cg, bg + 1 < end ? xg + n : nullptr);
    }
  });
}

// Channels_last (batch, H*W, C): a group's channels are strided by C, so every pass reads whole pixels and keeps
// per-channel sums. Samples go in waves that fit the caches (kWaveBytes; at least one sample). A wave's pixels are
// cut into one run per thread: each run's statistics, tile by tile, per (sample, group), the next tile prefetched;
// the runs' Moments merged into per-channel coefficients; then each run normalised by the thread that read it (the
// same run index: parallel_for over `runs` <= threads gives thread t run t in both passes) while it prefetches its
// run of the next wave. So the data comes from DRAM once, and the next wave's reads overlap this one's arithmetic.
template <typename T>
void group_norm_nhwc(const T* x, T* out, const Problem& p) {
  const int64_t C = p.channels, G = p.groups, cg = C / G, hw = p.spatial;
  const int64_t tile = std::max<int64_t>(1, kTile / C);  // pixels per statistics tile
  const int64_t wave = std::clamp<int64_t>(kWaveBytes / (hw * C * int64_t(sizeof(T))), 1, p.batch);  // samples
  const int64_t threads = at::get_num_threads();
  std::vector<Moments> parts(threads * wave * G);  // per (run, sample of the wave, group)
  std::vector<float> coef(3 * wave * C);           // per (sample of the wave, channel): its group's mean, a, d
  float *mean = coef.data(), *a = mean + wave * C, *d = a + wave * C;
  auto affine = p.silu ? affine_rows<T, true> : affine_rows<T, false>;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (cpu_runs_avx512_bf16()) affine = p.silu ? affine_rows_bf16<true> : affine_rows_bf16<false>;
  }
  for (int64_t b0 = 0; b0 < p.batch; b0 += wave) {
    const int64_t samples = std::min(wave, p.batch - b0), rows = samples * hw;
    const int64_t next_rows = std::min(wave, p.batch - b0 - samples) * hw;  // the next wave's
    const int64_t run = std::max((rows + threads - 1) / threads, (kGrain + C - 1) / C);  // rows a run
    const int64_t runs = (rows + run - 1) / run;
    const T* xw = x + b0 * hw * C;
    T* ow = out + b0 * hw * C;
    std::fill(parts.begin(), parts.end(), Moments{0.0f, 0.0f, 0.0f});
    at::parallel_for(0, runs, 1, [&](int64_t first, int64_t last) {
      std::vector<float> scratch(3 * C);  // per channel: sums, its group's tile mean, squared deviations
      float *sums = scratch.data(), *means = sums + C, *sq = means + C;
      for (int64_t r = first; r < last; ++r) {
        const int64_t end = std::min(rows, (r + 1) * run);
        for (int64_t q = r * run; q < end;) {
          const int64_t s = q / hw, n = std::min({tile, end - q, (s + 1) * hw - q});  // one sample's pixels
          const T* xt = xw + q * C;
          const char* ahead = reinterpret_cast<const char*>(xt + n * C);  // the run's next tile
          for (int64_t b = 0; b < std::min(tile, end - q - n) * C * int64_t(sizeof(T)); b += 64) {
            __builtin_prefetch(ahead + b);
          }
          const float count = static_cast<float>(n * cg);
          std::fill(sums, sums + C, 0.0f);
          std::fill(sq, sq + C, 0.0f);
          column_sums(xt, n, C, sums);
          for (int64_t g = 0; g < G; ++g) {
            std::fill(means + g * cg, means + (g + 1) * cg, total(sums + g * cg, cg) / count);
          }
          column_squared_deviations(xt, n, C, means, sq);
          Moments* m = &parts[(r * wave + s) * G];
          for (int64_t g = 0; g < G; ++g) m[g] = merge(m[g], {count, means[g * cg], total(sq + g * cg, cg)});
          q += n;
        }
      }
    });
    for (int64_t s = 0; s < samples; ++s)
      for (int64_t g = 0; g < G; ++g) {
        Moments m{0.0f, 0.0f, 0.0f};
        for (int64_t r = 0; r < runs; ++r) m = merge(m, parts[(r * wave + s) * G + g]);
        const float rstd = inv_std(m, p.eps);
        for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
          const Affine f = channel_affine(rstd, p.weight, p.bias, p.scale, p.shift, c, (b0 + s) * C + c);
          mean[s * C + c] = m.mean;
          a[s * C + c] = f.a;
          d[s * C + c] = f.d;
        }
      }
    at::parallel_for(0, runs, 1, [&](int64_t first, int64_t last) {
      for (int64_t r = first; r < last; ++r) {
        for (int64_t q = r * run, end = std::min(rows, (r + 1) * run); q < end;) {  // a sample at a time
          const int64_t s = q / hw, stop = std::min(end, (s + 1) * hw);
          affine(xw + q * C, ow + q * C, stop - q, C, mean + s * C, a + s * C, d + s * C,
                 stop <= next_rows ? xw + (rows + q) * C : nullptr);
          q = stop;
        }
      }
    });
  }
}

// ---- the op -----------------------------------------------------------------------------------------------

// x as the kernels take it: 4-d channels_last stays so, anything else is made contiguous.
at::Tensor kernel_layout(const at::Tensor& x) {
  return x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast) ? x : x.contiguous();
}

// Checks the kernel contract (see cmfast/ops/group_norm.py) and returns the problem; channels_last says which
// layout x has (a tensor that is both, e.g. 1x1 spatial, counts as contiguous).
Problem check_problem(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                      const std::optional<at::Tensor>& shift, int64_t num_groups, double eps, bool silu,
                      const at::Tensor& out, bool& channels_last) {
  TORCH_CHECK(x.dim() >= 2, "group_norm: x: expected (batch, C, *spatial), got shape ", x.sizes());
  check_flat(out, x, "group_norm: out");
  channels_last = !x.is_contiguous();
  TORCH_CHECK(!channels_last || (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)),
              "group_norm: x: expected a contiguous or a 4-d channels_last tensor");
  const int64_t batch = x.size(0), channels = x.size(1);
  TORCH_CHECK(num_groups > 0 && channels % num_groups == 0, "group_norm: num_groups: expected a positive divisor of ",
              channels, ", got ", num_groups);
  const float* w = optional_f32(weight, {channels}, x, "group_norm: weight");
  const float* bi = optional_f32(bias, {channels}, x, "group_norm: bias");
  const float* s = optional_f32(scale, {batch, channels}, x, "group_norm: scale");
  const float* sh = optional_f32(shift, {batch, channels}, x, "group_norm: shift");
  const int64_t spatial = x.numel() / std::max<int64_t>(batch * channels, 1);
  return {batch, channels, spatial, num_groups, w, bi, s, sh, static_cast<float>(eps), silu};
}

#ifdef CMFAST_WITH_CUDA
void group_norm_gpu(const at::Tensor& x, const Problem& p, bool channels_last, const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(x.device());
  const GroupNormShape shape{p.batch, p.channels, p.spatial, p.groups, channels_last};
  const GroupNormPlan plan = group_norm_cuda_plan(kernel_dtype(x), shape, x.const_data_ptr(), out.data_ptr());
  TORCH_CHECK(plan.vec > 0, "group_norm: groups of ", p.channels / p.groups * p.spatial,
              " elements are beyond the CUDA kernels (2^31 - 1 at most)");
  at::Tensor workspace;  // the two-stage path's partial statistics
  if (plan.workspace_floats > 0) workspace = at::empty({plan.workspace_floats}, x.options().dtype(at::kFloat));
  check_launch(group_norm_cuda(plan, shape, x.const_data_ptr(), p.weight, p.bias, p.scale, p.shift, out.data_ptr(),
                               workspace.defined() ? workspace.mutable_data_ptr<float>() : nullptr, p.eps, p.silu,
                               c10::cuda::getCurrentCUDAStream()),
               "group_norm");
}
#endif

// The op on either device: its checks, then the kernels of x's device (registered for CPU and CUDA).
void group_norm_out(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                    const std::optional<at::Tensor>& shift, int64_t num_groups, double eps, bool silu,
                    const at::Tensor& out) {
  bool channels_last = false;
  const Problem p = check_problem(x, weight, bias, scale, shift, num_groups, eps, silu, out, channels_last);
  if (x.numel() == 0) return;
#ifdef CMFAST_WITH_CUDA
  if (x.is_cuda()) return group_norm_gpu(x, p, channels_last, out);
#endif
  TORCH_CHECK(x.is_cpu(), "group_norm: no compiled kernel for device ", x.device());
  dispatch_float(x.scalar_type(), "group_norm", [&](auto t) {
    using T = decltype(t);
    const T* xp = x.const_data_ptr<T>();
    T* op = out.mutable_data_ptr<T>();
    channels_last ? group_norm_nhwc(xp, op, p) : group_norm_nchw(xp, op, p);
  });
}

}  // namespace

#ifdef CMFAST_WITH_CUDA
std::string group_norm_cuda_path(const at::Tensor& x, int64_t num_groups) {
  TORCH_CHECK(x.is_cuda() && x.dim() >= 2, "group_norm_cuda_path: expected a CUDA tensor (batch, C, ...)");
  const at::Tensor xk = kernel_layout(x);
  const c10::cuda::CUDAGuard guard(xk.device());
  const GroupNormShape shape{xk.size(0), xk.size(1), xk.numel() / std::max<int64_t>(xk.size(0) * xk.size(1), 1),
                             num_groups, !xk.is_contiguous()};
  const GroupNormPlan plan = group_norm_cuda_plan(kernel_dtype(xk), shape, xk.const_data_ptr(), xk.const_data_ptr());
  return plan.kernel();
}
#endif

// The whole eager call after the public op's checks: x in a kernel layout, a fresh `out` like it, the parameters
// as contiguous fp32, the kernel of x's device. Bound in module.cpp; one call from Python instead of a dozen.
at::Tensor group_norm(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                      const std::optional<at::Tensor>& shift, int64_t num_groups, double eps, bool silu) {
  const at::Tensor xk = kernel_layout(x);
  at::Tensor out = at::empty_like(xk);
  auto f32 = [](const std::optional<at::Tensor>& t) -> std::optional<at::Tensor> {
    if (!t.has_value() || !t->defined() || (t->scalar_type() == at::kFloat && t->is_contiguous())) return t;
    return t->to(at::kFloat).contiguous();
  };
  group_norm_out(xk, f32(weight), f32(bias), f32(scale), f32(shift), num_groups, eps, silu, out);
  return out;
}

}  // namespace cmfast

TORCH_LIBRARY_FRAGMENT(cmfast_C, m) {
  m.def(
      "group_norm(Tensor x, Tensor? weight, Tensor? bias, Tensor? scale, Tensor? shift, int num_groups, float eps, "
      "bool silu, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(cmfast_C, CPU, m) { m.impl("group_norm", &cmfast::group_norm_out); }

#ifdef CMFAST_WITH_CUDA
TORCH_LIBRARY_IMPL(cmfast_C, CUDA, m) { m.impl("group_norm", &cmfast::group_norm_out); }
#endif
