// The consistency op on the GPU: a per-sample affine map of one or two tensors, memory bound.
// One grid row (blockIdx.y) per sample computes its scalings once; threads stream 16-byte packets.
#include <algorithm>

#include "consistency.cuh"
#include "scalings.h"

namespace cmfast {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocksPerSample = 1024;  // enough to fill any current GPU even at batch 1
constexpr int kMaxGridY = 65535;           // CUDA's limit on gridDim.y; larger batches loop

// EPILOGUE: out = skip * x + out * f (clamped). Otherwise (prologue): out = in * x, and t_in[b].
template <typename T, int VEC, bool EPILOGUE>
__global__ void __launch_bounds__(kThreads)
    consistency_kernel(const T* __restrict__ x, const T* __restrict__ f, const float* __restrict__ sigma,
                       T* __restrict__ out, float* __restrict__ t_in, int64_t batch, int64_t n, float sigma_data,
                       float sigma_min, bool clamp) {
  using Pack = Packed<T, VEC>;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const float s = sigma[b];
    const Scalings c = consistency_scalings(s, sigma_data, sigma_min);
    if (!EPILOGUE && blockIdx.x == 0 && threadIdx.x == 0) t_in[b] = time_input(s);
    const int64_t base = b * n;
    const int64_t stride = int64_t(gridDim.x) * kThreads * VEC;
    for (int64_t i = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * VEC; i < n; i += stride) {
      // n % VEC == 0 whenever VEC > 1 (the launcher checks), so a packet never straddles samples.
      const Pack xv = *reinterpret_cast<const Pack*>(x + base + i);
      Pack ov;
      if constexpr (EPILOGUE) {
        const Pack fv = *reinterpret_cast<const Pack*>(f + base + i);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          float v = c.skip * to_float(xv.v[k]) + c.out * to_float(fv.v[k]);
          ov.v[k] = from_float<T>(clamp ? clamp_unit(v) : v);
        }
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) ov.v[k] = from_float<T>(c.in * to_float(xv.v[k]));
      }
      *reinterpret_cast<Pack*>(out + base + i) = ov;
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, bool EPILOGUE>
cudaError_t launch(const void* x, const void* f, const float* sigma, void* out, float* t_in, int64_t batch,
                   int64_t n, float sigma_data, float sigma_min, bool clamp, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = n % kVec == 0 && aligned16(x) && aligned16(out) && (!EPILOGUE || aligned16(f));
  const int per_block = kThreads * (vec ? kVec : 1);
  const dim3 grid(unsigned(std::max<int64_t>(1, std::min<int64_t>((n + per_block - 1) / per_block,
                                                                     kMaxBlocksPerSample))),
                  unsigned(std::min<int64_t>(batch, kMaxGridY)));
  auto kernel = vec ? consistency_kernel<T, kVec, EPILOGUE> : consistency_kernel<T, 1, EPILOGUE>;
  kernel<<<grid, kThreads, 0, stream>>>(static_cast<const T*>(x), static_cast<const T*>(f), sigma,
                                        static_cast<T*>(out), t_in, batch, n, sigma_data, sigma_min, clamp);
  return cudaGetLastError();
}

}  // namespace

cudaError_t consistency_epilogue_cuda(DType dtype, const void* x, const void* model_output, const float* sigma,
                                      void* out, int64_t batch, int64_t n, float sigma_data, float sigma_min,
                                      bool clamp, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto t) {
    return launch<decltype(t), true>(x, model_output, sigma, out, nullptr, batch, n, sigma_data, sigma_min, clamp,
                                     stream);
  });
}

cudaError_t consistency_prologue_cuda(DType dtype, const void* x, const float* sigma, void* out, float* t_in,
                                      int64_t batch, int64_t n, float sigma_data, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto t) {
    return launch<decltype(t), false>(x, nullptr, sigma, out, t_in, batch, n, sigma_data, 0.0f, false, stream);
  });
}

}  // namespace cmfast
