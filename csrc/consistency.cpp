// The consistency op's compiled kernels: the CPU kernel here, the CUDA kernel in kernels/consistency.cu,
// both registered as cmfast_C::consistency_{epilogue,prologue}. The public op (cmfast/ops/consistency.py)
// validates, allocates the outputs and picks a backend; these ops only fill the outputs.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "../kernels/scalings.h"
#include "common.h"

#ifdef CMFAST_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../kernels/consistency.cuh"
#endif

namespace cmfast {
namespace {

constexpr int64_t kGrain = 1 << 15;  // elements per parallel task: ~100 KB of traffic, well above the fork cost

// Calls fn(b, begin, end) for every per-sample piece of the flat range [begin, end) of a [batch, n] array.
template <typename Fn>
void for_each_sample_piece(int64_t batch, int64_t n, Fn fn) {
  if (n == 0) return;
  at::parallel_for(0, batch * n, kGrain, [&](int64_t begin, int64_t end) {
    while (begin < end) {
      const int64_t b = begin / n;
      const int64_t stop = std::min(end, (b + 1) * n);
      fn(b, begin, stop);
      begin = stop;
    }
  });
}

// The per-sample inner loops. CLAMP is a template parameter so the loop body has no branch, and the loops
// are cloned for AVX2 and the baseline ISA (picked at load time), so a portable build still vectorises wide.
template <typename T, bool CLAMP>
__attribute__((target_clones("avx2", "default"))) void epilogue_piece(const T* x, const T* f, T* out, int64_t len,
                                                                      float c_skip, float c_out) {
  for (int64_t i = 0; i < len; ++i) {
    const float v = c_skip * static_cast<float>(x[i]) + c_out * static_cast<float>(f[i]);
    out[i] = static_cast<T>(CLAMP ? clamp_unit(v) : v);
  }
}

template <typename T>
__attribute__((target_clones("avx2", "default"))) void scale_piece(const T* x, T* out, int64_t len, float c) {
  for (int64_t i = 0; i < len; ++i) out[i] = static_cast<T>(c * static_cast<float>(x[i]));
}

template <typename T>
void epilogue_cpu(const T* x, const T* f, const float* sigma, T* out, int64_t batch, int64_t n, float sigma_data,
                  float sigma_min, bool clamp) {
  for_each_sample_piece(batch, n, [&](int64_t b, int64_t begin, int64_t end) {
    const Scalings c = consistency_scalings(sigma[b], sigma_data, sigma_min);
    auto piece = clamp ? epilogue_piece<T, true> : epilogue_piece<T, false>;
    piece(x + begin, f + begin, out + begin, end - begin, c.skip, c.out);
  });
}

template <typename T>
void prologue_cpu(const T* x, const float* sigma, T* out, float* t_in, int64_t batch, int64_t n, float sigma_data) {
  for (int64_t b = 0; b < batch; ++b) t_in[b] = time_input(sigma[b]);
  for_each_sample_piece(batch, n, [&](int64_t b, int64_t begin, int64_t end) {
    scale_piece(x + begin, out + begin, end - begin, consistency_scalings(sigma[b], sigma_data, 0.0f).in);
  });
}

void consistency_epilogue_cpu(const at::Tensor& x, const at::Tensor& model_output, const at::Tensor& sigma,
                              double sigma_data, double sigma_min, bool clamp, const at::Tensor& out) {
  check_flat(model_output, x, "model_output");
  check_flat(out, x, "out");
  check_per_sample(sigma, x, "sigma");
  dispatch_float(x.scalar_type(), "consistency_epilogue", [&](auto t) {
    using T = decltype(t);
    epilogue_cpu<T>(x.const_data_ptr<T>(), model_output.const_data_ptr<T>(), sigma.const_data_ptr<float>(),
                    out.mutable_data_ptr<T>(), batch_of(x), x.numel() / std::max<int64_t>(batch_of(x), 1),
                    float(sigma_data), float(sigma_min), clamp);
  });
}

void consistency_prologue_cpu(const at::Tensor& x, const at::Tensor& sigma, double sigma_data, const at::Tensor& out,
                              const at::Tensor& t_in) {
  check_flat(out, x, "out");
  check_per_sample(sigma, x, "sigma");
  check_per_sample(t_in, x, "t_in");
  dispatch_float(x.scalar_type(), "consistency_prologue", [&](auto t) {
    using T = decltype(t);
    prologue_cpu<T>(x.const_data_ptr<T>(), sigma.const_data_ptr<float>(), out.mutable_data_ptr<T>(),
                    t_in.mutable_data_ptr<float>(), batch_of(x), x.numel() / std::max<int64_t>(batch_of(x), 1),
                    float(sigma_data));
  });
}

#ifdef CMFAST_WITH_CUDA
void consistency_epilogue_gpu(const at::Tensor& x, const at::Tensor& model_output, const at::Tensor& sigma,
                              double sigma_data, double sigma_min, bool clamp, const at::Tensor& out) {
  check_flat(model_output, x, "model_output");
  check_flat(out, x, "out");
  check_per_sample(sigma, x, "sigma");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t batch = batch_of(x);
  check_launch(consistency_epilogue_cuda(kernel_dtype(x), x.const_data_ptr(), model_output.const_data_ptr(),
                                       sigma.const_data_ptr<float>(), out.mutable_data_ptr(), batch,
                                       x.numel() / std::max<int64_t>(batch, 1), float(sigma_data),
                                       float(sigma_min), clamp, c10::cuda::getCurrentCUDAStream()),
             "consistency_epilogue");
}

void consistency_prologue_gpu(const at::Tensor& x, const at::Tensor& sigma, double sigma_data, const at::Tensor& out,
                              const at::Tensor& t_in) {
  check_flat(out, x, "out");
  check_per_sample(sigma, x, "sigma");
  check_per_sample(t_in, x, "t_in");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t batch = batch_of(x);
  check_launch(consistency_prologue_cuda(kernel_dtype(x), x.const_data_ptr(), sigma.const_data_ptr<float>(),
                                       out.mutable_data_ptr(), t_in.mutable_data_ptr<float>(), batch,
                                       x.numel() / std::max<int64_t>(batch, 1), float(sigma_data),
                                       c10::cuda::getCurrentCUDAStream()),
             "consistency_prologue");
}
#endif

}  // namespace
}  // namespace cmfast

TORCH_LIBRARY_FRAGMENT(cmfast_C, m) {
  m.def(
      "consistency_epilogue(Tensor x, Tensor model_output, Tensor sigma, float sigma_data, float sigma_min, "
      "bool clamp, Tensor(a!) out) -> ()");
  m.def("consistency_prologue(Tensor x, Tensor sigma, float sigma_data, Tensor(a!) out, Tensor(b!) t_in) -> ()");
}

TORCH_LIBRARY_IMPL(cmfast_C, CPU, m) {
  m.impl("consistency_epilogue", &cmfast::consistency_epilogue_cpu);
  m.impl("consistency_prologue", &cmfast::consistency_prologue_cpu);
}

#ifdef CMFAST_WITH_CUDA
TORCH_LIBRARY_IMPL(cmfast_C, CUDA, m) {
  m.impl("consistency_epilogue", &cmfast::consistency_epilogue_gpu);
  m.impl("consistency_prologue", &cmfast::consistency_prologue_gpu);
}
#endif
