// The CPU attention kernel in fp32 arithmetic (AVX-512 FMAs): float32 tensors, and float16 / bfloat16 ones
// widened to fp32 as they are packed (exactly) and rounded once, at the output.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#define CMFAST_ISA "avx512f,avx512bw,avx512dq,avx512vl"
#include "attention_loops.h"

namespace cmfast {
namespace {

struct F32Dot {
  static constexpr bool kTiles = false;
  static constexpr int kKeyStep = 16;
  static constexpr int kExpDegree = 6;  // exp2_nonpositive's polynomial
  static void begin_thread() {}
  static void end_thread() {}  // the products by vector FMAs (rows_times_block)
  using Element = float;
  using Vec = __m512;
  static constexpr int kPerWord = 1;
  CMFAST_INLINE static __m512 load(const float* p) { return _mm512_loadu_ps(p); }
  CMFAST_INLINE static __m512 broadcast(const float* p) { return _mm512_set1_ps(*p); }
  CMFAST_INLINE static __m512 fma(__m512 acc, __m512 a, __m512 b) { return _mm512_fmadd_ps(a, b, acc); }
  // The probabilities of keys j and j + 1: rows of kQ queries.
  CMFAST_INLINE static void put_probabilities(float* p, __m512 e0, __m512 e1) {
    _mm512_storeu_ps(p, e0);
    _mm512_storeu_ps(p + kQ, e1);
  }
  template <typename S>
  CMFAST_KERNEL static void pack_q(const S* src, int64_t cs, int64_t ts, int64_t D, int64_t T, float* dst,
                                   int64_t q_pad) {
    pack_tokens_last(src, cs, ts, D, T, dst, q_pad, D);
  }
};

}  // namespace

void attention_cpu_f32(const AttentionProblem& problem) {
  switch (problem.dtype) {
    case at::kFloat: return attend<F32Dot, float, float>(problem);
    case at::kHalf: return attend<F32Dot, c10::Half, c10::Half>(problem);
    case at::kBFloat16: return attend<F32Dot, c10::BFloat16, c10::BFloat16>(problem);
    default: TORCH_CHECK(false, "attention: unsupported dtype ", problem.dtype);
  }
}

}  // namespace cmfast
