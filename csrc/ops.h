// The ops' eager entry points, bound as functions of cmfast._C (module.cpp). The registered torch ops
// (TORCH_LIBRARY in each csrc/<op>.cpp) remain what torch.compile and the backend probe see.
#pragma once
#include <ATen/core/Tensor.h>

#include <map>
#include <optional>
#include <string>
#include <vector>

namespace cmfast {

at::Tensor group_norm(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                      const std::optional<at::Tensor>& shift, int64_t num_groups, double eps, bool silu);

// out[n, k, r] = src[n, r, k] for contiguous CPU tensors src (N, R, K) and out (N, K, R) (csrc/attention.cpp): the
// attention op's transposes around SDPA in the NCHW layout.
void transpose_last2(const at::Tensor& src, const at::Tensor& out);

// The attention op's CPU kernels this CPU runs ("f32": AVX-512; "bf16": AVX512_BF16 too), and one of them run by
// name (for tests and benchmarks; the registered op picks bf16 for bfloat16 tensors where it can).
std::vector<std::string> attention_cpu_kernels();
void attention_cpu(const at::Tensor& qkv, int64_t num_heads, const at::Tensor& out, const std::string& kernel);

// The bf16 Winograd op's engines this CPU runs, fastest first ("amx": AMX tile multiplies; "dot": AVX512_BF16 dot
// products); the op (winograd_bf16) is told which to run.
std::vector<std::string> winograd_bf16_engines();

// Reusing the CPU memory of large tensors (csrc/cpu_memory.cpp): a scope in which this library's allocator stands in
// for torch's CPU allocator (entered again by any thread: counted; true when it stands in), its freed large blocks
// kept up to cap_bytes; trim frees the kept blocks; stats for tests and `cmfast info`.
bool cpu_memory_enter(int64_t cap_bytes);
void cpu_memory_exit();
void cpu_memory_trim();
std::map<std::string, int64_t> cpu_memory_stats();

#ifdef CMFAST_WITH_CUDA
// Which CUDA kernel group_norm would run for x on its device: fused, shared, cluster, two-stage (for tests and
// for reading benchmarks).
std::string group_norm_cuda_path(const at::Tensor& x, int64_t num_groups);
#endif

}  // namespace cmfast
