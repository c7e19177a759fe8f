// The CPU attention kernels' entry points: attention.cpp (the op) checks the tensors and picks one by dtype and
// CPU; attention_f32.cpp, attention_bf16.cpp and attention_amx.cpp compile them for their ISA.
#pragma once
#include <c10/core/ScalarType.h>

#include <cstdint>

namespace cmfast {

// The op's tensors: qkv (batch, 3 * heads * head_dim, tokens) and out (batch, heads * head_dim, tokens), element
// (b, c, t) at b * batch_stride + c * channel_stride + t * token_stride (NCHW: token_stride 1; channels_last:
// channel_stride 1); both of `dtype`.
struct AttentionProblem {
  const void* qkv;
  void* out;
  c10::ScalarType dtype;
  int64_t batch, heads, head_dim, tokens;
  int64_t qkv_batch_stride, qkv_channel_stride, qkv_token_stride;
  int64_t out_batch_stride, out_channel_stride, out_token_stride;
};

// fp32 arithmetic for float32, float16 and bfloat16 tensors; needs AVX-512 (F, BW, DQ, VL).
void attention_cpu_f32(const AttentionProblem& problem);
// bfloat16 tensors with AVX512_BF16 dot products (probabilities rounded to bfloat16 before the second product, as
// flash attention does); needs an even head_dim and AVX-512 (F, BW, DQ, VL, BF16).
void attention_cpu_bf16(const AttentionProblem& problem);
// bfloat16 tensors with AMX tile products (the bf16 kernel's packing, softmax and rounding); needs a head_dim that
// is a multiple of 32 and cpu_runs_amx_bf16().
void attention_cpu_amx(const AttentionProblem& problem);

}  // namespace cmfast
