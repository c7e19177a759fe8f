// CMFAST_HD marks small arithmetic helpers that the CPU kernels (g++) and the CUDA kernels (nvcc) share.
#pragma once

#if defined(__CUDACC__)
#define CMFAST_HD __host__ __device__ __forceinline__
#else
#define CMFAST_HD inline
#endif
