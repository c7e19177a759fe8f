// The attention op's CPU side: the kernel (attention_loops.h, compiled for AVX-512 by attention_f32.cpp and, with
// AVX512_BF16 dot products, attention_bf16.cpp), registered where the CPU runs it; and the batched transposing
// copy the torch backend needs around SDPA in the NCHW layout (the packed qkv holds each head as a (D, T) block
// with T contiguous; SDPA wants (T, D) rows): torch's copy_ does such a strided copy element by element (~2.7 GB/s
// on a 2-core Zen 4 at T = 1024), this one tile by tile, many times that.
#include <ATen/Parallel.h>
#include <c10/util/StringUtil.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "attention_cpu.h"
#include "common.h"
#include "cpu_features.h"
#include "ops.h"
#include "tiles.h"

namespace cmfast {
namespace {

constexpr int64_t kGrain = 1 << 14;  // elements per parallel task at least

// out[n, k, r] = src[n, r, k] for contiguous src (N, R, K) and out (N, K, R); T: an unsigned type of the element's
// size (a copy moves bits). Tasks: row tiles of the N matrices.
template <typename T>
void transpose_batch(const T* src, T* out, int64_t N, int64_t R, int64_t K) {
  const int64_t row_tiles = (R + kTile - 1) / kTile;
  const int64_t grain = std::max<int64_t>(1, kGrain / (kTile * K));
  at::parallel_for(0, N * row_tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / row_tiles, r0 = t % row_tiles * kTile;
      transpose(src + n * R * K + r0 * K, K, std::min(kTile, R - r0), K, out + n * R * K + r0, R);
    }
  });
}

// The problem of contiguous or channels_last (4-d) qkv and out, checked.
AttentionProblem problem_of(const at::Tensor& qkv, int64_t num_heads, const at::Tensor& out) {
  TORCH_CHECK(qkv.device().is_cpu() && out.device().is_cpu(), "attention: expected CPU tensors");
  TORCH_CHECK(qkv.dim() >= 3, "attention: qkv: expected (batch, 3C, *spatial), got ", qkv.sizes());
  const int64_t batch = qkv.size(0), channels = qkv.size(1) / 3;
  TORCH_CHECK(num_heads > 0 && qkv.size(1) % (3 * num_heads) == 0, "attention: num_heads ", num_heads,
              " does not divide C = ", channels);
  std::vector<int64_t> out_shape = qkv.sizes().vec();
  out_shape[1] = channels;
  TORCH_CHECK(out.sizes() == at::IntArrayRef(out_shape), "attention: out: expected shape ", out_shape, ", got ",
              out.sizes());
  TORCH_CHECK(out.scalar_type() == qkv.scalar_type(), "attention: out: expected dtype ", qkv.scalar_type());
  const bool contiguous = qkv.is_contiguous() && out.is_contiguous();
  const bool channels_last = qkv.dim() == 4 && qkv.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                             out.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(contiguous || channels_last, "attention: expected qkv and out both contiguous or both channels_last");
  const int64_t tokens = batch > 0 && channels > 0 ? out.numel() / (batch * channels) : 0;
  // The canonical strides (a size-1 dimension's own stride may be anything).
  const int64_t qkv_channel = contiguous ? tokens : 1, qkv_token = contiguous ? 1 : 3 * channels;
  const int64_t out_channel = contiguous ? tokens : 1, out_token = contiguous ? 1 : channels;
  return {qkv.const_data_ptr(), out.mutable_data_ptr(), qkv.scalar_type(), batch, num_heads, channels / num_heads,
          tokens, 3 * channels * tokens, qkv_channel, qkv_token, channels * tokens, out_channel, out_token};
}

void check_dtype(const AttentionProblem& problem) {
  TORCH_CHECK(problem.dtype == at::kFloat || problem.dtype == at::kHalf || problem.dtype == at::kBFloat16,
              "attention: unsupported dtype ", problem.dtype);
}

void run_attention(const AttentionProblem& problem, const std::string& kernel) {
  if (problem.batch == 0 || problem.tokens == 0 || problem.head_dim == 0) return;
  if (kernel == "amx") return attention_cpu_amx(problem);
  if (kernel == "bf16") return attention_cpu_bf16(problem);
  attention_cpu_f32(problem);
}

// The kernels that take this problem: f32 for every dtype, bf16 and amx for bfloat16 with the head dims they need.
bool takes(const std::string& kernel, const AttentionProblem& problem) {
  const bool bf16 = problem.dtype == at::kBFloat16;
  if (kernel == "bf16") return bf16 && problem.head_dim % 2 == 0;
  if (kernel == "amx") return bf16 && problem.head_dim % 32 == 0;
  return true;
}

// The registered CPU kernel: AMX tile products, else bf16 dot products, where the dtype, head dim and CPU allow
// them, else fp32 arithmetic.
void attention_op(const at::Tensor& qkv, int64_t num_heads, const at::Tensor& out) {
  const AttentionProblem problem = problem_of(qkv, num_heads, out);
  check_dtype(problem);
  std::string kernel = "f32";
  for (const std::string& k : attention_cpu_kernels())
    if (k != "f32" && takes(k, problem)) kernel = k;  // the list runs from the slowest to the fastest
  run_attention(problem, kernel);
}

}  // namespace

void transpose_last2(const at::Tensor& src, const at::Tensor& out) {
  TORCH_CHECK(src.device().is_cpu() && out.device().is_cpu(), "transpose_last2: expected CPU tensors");
  TORCH_CHECK(src.dim() == 3 && src.is_contiguous(), "transpose_last2: src: expected a contiguous (N, R, K) tensor");
  TORCH_CHECK(out.dim() == 3 && out.is_contiguous() && out.size(0) == src.size(0) && out.size(1) == src.size(2) &&
                  out.size(2) == src.size(1) && out.scalar_type() == src.scalar_type(),
              "transpose_last2: out: expected a contiguous (N, K, R) tensor of src's dtype, got ", out.sizes(),
              " for src ", src.sizes());
  TORCH_CHECK(src.data_ptr() != out.data_ptr() || src.numel() == 0, "transpose_last2: out must not be src");
  const int64_t N = src.size(0), R = src.size(1), K = src.size(2);
  switch (src.element_size()) {
    case 2:
      return transpose_batch(static_cast<const uint16_t*>(src.const_data_ptr()),
                             static_cast<uint16_t*>(out.mutable_data_ptr()), N, R, K);
    case 4:
      return transpose_batch(static_cast<const uint32_t*>(src.const_data_ptr()),
                             static_cast<uint32_t*>(out.mutable_data_ptr()), N, R, K);
    case 8:
      return transpose_batch(static_cast<const uint64_t*>(src.const_data_ptr()),
                             static_cast<uint64_t*>(out.mutable_data_ptr()), N, R, K);
  }
  TORCH_CHECK(false, "transpose_last2: unsupported element size ", src.element_size());
}

std::vector<std::string> attention_cpu_kernels() {
  std::vector<std::string> kernels;
  if (cpu_runs_avx512()) kernels.push_back("f32");
  if (cpu_runs_avx512_bf16()) kernels.push_back("bf16");
  if (cpu_runs_avx512_bf16() && cpu_runs_amx_bf16()) kernels.push_back("amx");
  return kernels;
}

void attention_cpu(const at::Tensor& qkv, int64_t num_heads, const at::Tensor& out, const std::string& kernel) {
  const AttentionProblem problem = problem_of(qkv, num_heads, out);
  const std::vector<std::string> runs = attention_cpu_kernels();
  TORCH_CHECK(std::find(runs.begin(), runs.end(), kernel) != runs.end(), "attention_cpu: this CPU cannot run the ",
              kernel, " kernel (it runs: ", c10::Join(", ", runs), ")");
  check_dtype(problem);
  TORCH_CHECK(takes(kernel, problem), "attention_cpu: the ", kernel, " kernel takes bfloat16 tensors with a head dim ",
              kernel == "amx" ? "that is a multiple of 32" : "that is even");
  run_attention(problem, kernel);
}

}  // namespace cmfast

TORCH_LIBRARY_FRAGMENT(cmfast_C, m) { m.def("attention(Tensor qkv, int num_heads, Tensor(a!) out) -> ()"); }

// Registered only where the CPU has AVX-512: elsewhere the op's torch backend serves.
TORCH_LIBRARY_IMPL(cmfast_C, CPU, m) {
  if (cmfast::cpu_runs_avx512()) m.impl("attention", &cmfast::attention_op);
}
