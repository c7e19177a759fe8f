// CUDA launchers of the `consistency` op: raw pointers, sizes and a stream; no torch.
// Tensors are dense with the batch dimension outermost: sample b owns elements [b*n, (b+1)*n).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "dtypes.cuh"

namespace cmfast {

// out = c_skip(sigma_b) * x + c_out(sigma_b) * model_output, optionally clamped to [-1, 1].
cudaError_t consistency_epilogue_cuda(DType dtype, const void* x, const void* model_output, const float* sigma,
                                      void* out, int64_t batch, int64_t n, float sigma_data, float sigma_min,
                                      bool clamp, cudaStream_t stream);

// out = c_in(sigma_b) * x and t_in[b] = 250 * ln(sigma_b).
cudaError_t consistency_prologue_cuda(DType dtype, const void* x, const float* sigma, void* out, float* t_in,
                                      int64_t batch, int64_t n, float sigma_data, cudaStream_t stream);

}  // namespace cmfast
