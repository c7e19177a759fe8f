// The CPU attention kernel for bfloat16 tensors with AVX512_BF16: each dot product lane takes a pair of bf16
// values (vdpbf16ps, fp32 accumulation), twice the fp32 FMA rate. The operands stay in bf16 as packed; the
// probabilities are rounded to bf16 before the second product, as flash attention does; softmax in fp32.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#define CMFAST_ISA "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16"
#include "attention_loops.h"

#include "attention_bf16_dot.h"

namespace cmfast {

void attention_cpu_bf16(const AttentionProblem& problem) {
  TORCH_CHECK(problem.dtype == at::kBFloat16 && problem.head_dim % 2 == 0,
              "attention_cpu_bf16: expected bfloat16 tensors and an even head_dim");
  attend<Bf16Dot, uint16_t, c10::BFloat16>(problem);
}

}  // namespace cmfast
