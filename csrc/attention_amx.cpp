// The CPU attention kernel for bfloat16 tensors on CPUs with AMX (Intel Sapphire Rapids and later): the same
// packing, online softmax and rounding as the AVX512_BF16 kernel (attention_bf16.cpp), its two products done by
// tile matrix multiplies (tdpbf16ps: bf16 pairs, fp32 accumulation) instead of vector dot products. The packed
// layouts are already what the tiles read: K's rows (a key's channels), Q's pairs of channels ([D/2][queries]
// words), V's rows (a channel's keys) and P's pairs of keys ([keys/2][queries] words). Needs a head dim that is
// a multiple of 32 (a tile's row: 32 bf16); the keys are padded to 32.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#define CMFAST_ISA "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,amx-tile,amx-bf16"
#include "attention_loops.h"

#include "amx.h"
#include "attention_bf16_dot.h"

namespace cmfast {
namespace {

// Both products in 32x32 blocks of tiles (amx.h's multiply_2x2).
struct AmxDot : Bf16Dot {
  static constexpr bool kTiles = true;
  static constexpr int kKeyStep = 32;

  CMFAST_KERNEL static void begin_thread() { configure_tiles(); }
  CMFAST_KERNEL static void end_thread() { _tile_release(); }

  // s[key][query] = S^T for keys [j0, j0 + keys) and queries [i0, i0 + kQ): 32 keys x 32 queries a step, over
  // the channels 32 at a time.
  template <class H>
  CMFAST_KERNEL static void scores(const H& h, int64_t j0, int64_t keys, int64_t i0, float* s) {
    const int64_t k_stride = h.D * 2, q_stride = h.q_row * 2;  // bytes
    for (int64_t j = 0; j < keys; j += 32) {
      zero_2x2();
      for (int64_t d = 0; d < h.D; d += 32) {
        multiply_2x2(h.k + (j0 + j) * h.D + d, h.k + (j0 + j + 16) * h.D + d, k_stride,
                     h.q + d / 2 * h.q_row + i0 * 2, h.q + d / 2 * h.q_row + (i0 + 16) * 2, q_stride);
      }
      store_2x2(s + j * kQ, kQ);
    }
  }

  // o[channel][query] = o alpha + V P^T over keys [j0, j0 + keys): 32 channels x 32 queries a step, over the keys
  // 32 at a time (16 pairs of P's words a tile row).
  template <class H>
  CMFAST_KERNEL static void accumulate(const H& h, int64_t j0, int64_t keys, const uint16_t* p, const float* alpha,
                                       float* o) {
    const __m512 a0 = _mm512_loadu_ps(alpha), a1 = _mm512_loadu_ps(alpha + 16);
    for (int64_t d = 0; d < h.D; ++d) {
      _mm512_storeu_ps(o + d * kQ, _mm512_mul_ps(_mm512_loadu_ps(o + d * kQ), a0));
      _mm512_storeu_ps(o + d * kQ + 16, _mm512_mul_ps(_mm512_loadu_ps(o + d * kQ + 16), a1));
    }
    const int64_t v_stride = h.k_pad * 2, p_stride = kQ * 2 * 2;  // bytes
    for (int64_t d = 0; d < h.D; d += 32) {
      float* out = o + d * kQ;
      load_2x2(out, kQ);
      for (int64_t j = 0; j < keys; j += 32) {
        multiply_2x2(h.v + d * h.k_pad + j0 + j, h.v + (d + 16) * h.k_pad + j0 + j, v_stride, p + j * kQ,
                     p + j * kQ + 32, p_stride);
      }
      store_2x2(out, kQ);
    }
  }
};

}  // namespace

void attention_cpu_amx(const AttentionProblem& problem) {
  TORCH_CHECK(problem.dtype == at::kBFloat16 && problem.head_dim % 32 == 0,
              "attention_cpu_amx: expected bfloat16 tensors and a head_dim that is a multiple of 32");
  TORCH_CHECK(cpu_runs_amx_bf16(), "attention_cpu_amx: this CPU (or OS) does not run AMX-BF16");
  attend<AmxDot, uint16_t, c10::BFloat16>(problem);
}

}  // namespace cmfast
