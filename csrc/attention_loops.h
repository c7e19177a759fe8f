// The CPU attention kernel, generic over its dot product (Dot: fp32 FMAs in attention_f32.cpp, AVX512_BF16 pair
// dot products in attention_bf16.cpp). Each includer defines CMFAST_ISA, the target its loops compile for, and its
// Dot: Element (the packed operands' type), kPerWord (elements per dot-product lane: 1, or a bf16 pair), Vec,
// load(16 lanes' words), broadcast(one word), fma(acc, a, b), put_probabilities, pack_q; kKeyStep (keys padded to a
// multiple of it), begin_thread/end_thread (a worker thread's set-up), and kTiles: when true, Dot computes both
// products itself (scores, accumulate: AMX tiles in attention_amx.cpp) instead of rows_times_block.
//
// Per (sample, head) the operands are packed once, zero padded, into what the loops stream (in elements):
//   q [D / kPerWord][q_pad * kPerWord]  queries along the rows, pairs of channels in a word (q_pad: T to kQ)
//   k [k_pad][D]                        a key's channels in a row (k_pad: T to kKeyStep)
//   v [d_pad][k_pad]                    a channel's keys in a row, pairs of keys in a word (d_pad: D to kRows)
// A task is kQ queries of one head, over chunks of kKeys keys: scores S^T = K Q into [key][query] (16 queries a
// vector), an online softmax along the keys (vertical in the vectors, no shuffles), P^T in Dot's words, then
// O^T = O^T alpha + V P^T into [channel][query]: the output's (channel, token) layout. S, P and O stay in L1/L2.
#pragma once
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>

#include "attention_cpu.h"
#include "tiles.h"

// GCC 12's AVX-512 intrinsics pass _mm512_undefined_ps() (a self-initialised variable) as the unused merge source of
// max, roundscale and scalef; inlined into a loop it draws a false -Wmaybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define CMFAST_KERNEL __attribute__((target(CMFAST_ISA)))
#define CMFAST_INLINE __attribute__((target(CMFAST_ISA), always_inline)) inline

namespace cmfast {
namespace {

constexpr int kQ = 32;      // queries a task: two vectors of 16 lanes
constexpr int kRows = 8;    // keys (scores) or channels (output) a microkernel step: 16 accumulators
constexpr int kKeys = 256;  // keys a chunk: S is 32 KB, P 16-32 KB

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// 2^x for x <= 0 in fp32 lanes: 2^n p(f) with n = round(x), f in [-1/2, 1/2], p the Taylor polynomial of degree
// Degree: 6 (relative error < 2e-7, for fp32 outputs), or 4 (< 5e-5, where the probabilities are rounded to bf16,
// 2e-3 apart, and the sum uses the same values); x below -127 gives 2^-127, nothing in a softmax that holds a 1.
template <int Degree>
CMFAST_INLINE __m512 exp2_nonpositive(__m512 x) {
  static_assert(Degree == 4 || Degree == 6, "exp2_nonpositive: degree 4 or 6");
  x = _mm512_max_ps(x, _mm512_set1_ps(-127.f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p;
  if constexpr (Degree == 6) {
    p = _mm512_set1_ps(1.5403530e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
  } else {
    p = _mm512_set1_ps(9.6181291e-3f);
  }
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// ---- packing ----------------------------------------------------------------------------------------------

// dst[d][t] = x(d, t) for d < D, t < T, zeros for T <= t < t_pad and D <= d < d_pad; x(d, t) = src[d * cs + t * ts].
template <typename E, typename S>
CMFAST_KERNEL void pack_tokens_last(const S* src, int64_t cs, int64_t ts, int64_t D, int64_t T, E* dst,
                                    int64_t t_pad, int64_t d_pad) {
  if (ts == 1) {
    copy_rows(src, cs, D, T, dst, t_pad);  // NCHW: a channel's tokens are a row
  } else {
    transpose(src, ts, T, D, dst, t_pad);  // channels_last: a token's channels are a row
  }
  zero_columns(dst, t_pad, D, T, t_pad);
  zero_columns(dst + D * t_pad, t_pad, d_pad - D, 0, t_pad);
}

// dst[t][d] = x(d, t) for t < T, zero rows for T <= t < t_pad.
template <typename E, typename S>
CMFAST_KERNEL void pack_tokens_first(const S* src, int64_t cs, int64_t ts, int64_t D, int64_t T, E* dst,
                                     int64_t t_pad) {
  if (cs == 1) {
    copy_rows(src, ts, T, D, dst, D);
  } else {
    transpose(src, cs, D, T, dst, D);
  }
  zero_columns(dst + T * D, D, t_pad - T, 0, D);
}

// ---- one task: kQ queries of a head ------------------------------------------------------------------------

// out[r][0, kQ) = out[r][.] scale[.] (or 0 when scale is null) + sum over words w < words of a(r, w) b(w, .) for
// kRows rows r: a(r, w) the word at a + r * a_row + w * kPerWord (broadcast), b(w, .) the kQ lanes' words at
// b + w * b_row. Both products: scores (a: keys' rows of k, b: q; no scale) and O^T (a: channels' rows of v, b: P).
template <class Dot>
CMFAST_KERNEL void rows_times_block(const typename Dot::Element* a, int64_t a_row, const typename Dot::Element* b,
                                    int64_t b_row, int64_t words, const float* scale, float* out) {
  constexpr int per = Dot::kPerWord;
  __m512 acc[kRows][2];
  const __m512 s0 = scale ? _mm512_loadu_ps(scale) : _mm512_setzero_ps();
  const __m512 s1 = scale ? _mm512_loadu_ps(scale + 16) : _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
    acc[r][0] = scale ? _mm512_mul_ps(_mm512_loadu_ps(out + r * kQ), s0) : s0;
    acc[r][1] = scale ? _mm512_mul_ps(_mm512_loadu_ps(out + r * kQ + 16), s1) : s1;
  }
  for (int64_t w = 0; w < words; ++w) {
    const typename Dot::Vec b0 = Dot::load(b + w * b_row), b1 = Dot::load(b + w * b_row + 16 * per);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const typename Dot::Vec x = Dot::broadcast(a + r * a_row + w * per);
      acc[r][0] = Dot::fma(acc[r][0], x, b0);
      acc[r][1] = Dot::fma(acc[r][1], x, b1);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
    _mm512_storeu_ps(out + r * kQ, acc[r][0]);
    _mm512_storeu_ps(out + r * kQ + 16, acc[r][1]);
  }
}

// The online softmax over a chunk's scores s[key][query] (raw dot products; c = log2(e) / sqrt(D)), `valid` of
// its `keys` real: the running maximum m and sum l updated, alpha = the factor that rescales what came before,
// the probabilities into p (Dot's layout: keys j and j + 1 at p + j * kQ).
template <class Dot>
CMFAST_KERNEL void softmax(const float* s, int64_t keys, int64_t valid, float c, float* m, float* l, float* alpha,
                           typename Dot::Element* p) {
  const __m512 cv = _mm512_set1_ps(c);
  for (int h = 0; h < kQ; h += 16) {
    const __m512 m_old = _mm512_loadu_ps(m + h);
    __m512 m_new = m_old;
    for (int64_t j = 0; j < valid; ++j) m_new = _mm512_max_ps(m_new, _mm512_loadu_ps(s + j * kQ + h));
    const __m512 a = exp2_nonpositive<6>(_mm512_mul_ps(_mm512_sub_ps(m_old, m_new), cv));
    const __m512 shift = _mm512_mul_ps(m_new, cv);
    __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps();
    for (int64_t j = 0; j < keys; j += 2) {
      __m512 e0 = exp2_nonpositive<Dot::kExpDegree>(_mm512_fmsub_ps(_mm512_loadu_ps(s + j * kQ + h), cv, shift));
      __m512 e1 = exp2_nonpositive<Dot::kExpDegree>(_mm512_fmsub_ps(_mm512_loadu_ps(s + (j + 1) * kQ + h), cv, shift));
      if (j >= valid) e0 = _mm512_setzero_ps();
      if (j + 1 >= valid) e1 = _mm512_setzero_ps();
      sum0 = _mm512_add_ps(sum0, e0);
      sum1 = _mm512_add_ps(sum1, e1);
      Dot::put_probabilities(p + j * kQ + h * Dot::kPerWord, e0, e1);
    }
    _mm512_storeu_ps(m + h, m_new);
    _mm512_storeu_ps(alpha + h, a);
    _mm512_storeu_ps(l + h, _mm512_fmadd_ps(_mm512_loadu_ps(l + h), a, _mm512_add_ps(sum0, sum1)));
  }
}

// out(d, t) = o[d][t] / l[t] for d < D, t < n; out(d, t) at dst[d * cs + t * ts].
template <typename S>
CMFAST_KERNEL void store_output(float* o, const float* l, int64_t D, int64_t n, S* dst, int64_t cs, int64_t ts) {
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 r0 = _mm512_div_ps(one, _mm512_loadu_ps(l)), r1 = _mm512_div_ps(one, _mm512_loadu_ps(l + 16));
  for (int64_t d = 0; d < D; ++d) {
    _mm512_storeu_ps(o + d * kQ, _mm512_mul_ps(_mm512_loadu_ps(o + d * kQ), r0));
    _mm512_storeu_ps(o + d * kQ + 16, _mm512_mul_ps(_mm512_loadu_ps(o + d * kQ + 16), r1));
  }
  if (ts == 1) {
    copy_rows(o, kQ, D, n, dst, cs);
  } else {
    transpose(o, kQ, D, n, dst, ts);
  }
}

// A head's packed operands and sizes (elements).
template <class Dot>
struct Head {
  const typename Dot::Element *q, *k, *v;
  int64_t D, T, q_row, k_pad, d_pad;
};

// What a thread works in: a chunk's scores and probabilities, the task's O^T and softmax state.
template <class Dot>
struct Workspace {
  explicit Workspace(int64_t d_pad)
      : s(new float[kKeys * kQ]), p(new typename Dot::Element[kKeys * kQ]), o(new float[d_pad * kQ]) {}
  std::unique_ptr<float[]> s;
  std::unique_ptr<typename Dot::Element[]> p;
  std::unique_ptr<float[]> o;
  float m[kQ], l[kQ], alpha[kQ];
};

// O^T (unnormalised, into w.o) and the softmax sums (w.l) of queries [i0, i0 + kQ) of a head.
template <class Dot>
CMFAST_KERNEL void attend_queries(const Head<Dot>& h, int64_t i0, float c, Workspace<Dot>& w) {
  constexpr int per = Dot::kPerWord;
  for (int64_t i = 0; i < h.d_pad * kQ; ++i) w.o[i] = 0.f;
  for (int i = 0; i < kQ; ++i) {
    w.m[i] = -INFINITY;
    w.l[i] = 0.f;
  }
  for (int64_t j0 = 0; j0 < h.k_pad; j0 += kKeys) {
    const int64_t keys = std::min<int64_t>(kKeys, h.k_pad - j0);
    if constexpr (Dot::kTiles) {
      Dot::scores(h, j0, keys, i0, w.s.get());
    } else {
      for (int64_t j = 0; j < keys; j += kRows)  // S^T for kRows keys at a time
        rows_times_block<Dot>(h.k + (j0 + j) * h.D, h.D, h.q + i0 * per, h.q_row, h.D / per, nullptr,
                              w.s.get() + j * kQ);
    }
    softmax<Dot>(w.s.get(), keys, std::min(keys, h.T - j0), c, w.m, w.l, w.alpha, w.p.get());
    if constexpr (Dot::kTiles) {
      Dot::accumulate(h, j0, keys, w.p.get(), w.alpha, w.o.get());
    } else {
      for (int64_t d = 0; d < h.d_pad; d += kRows)  // O^T for kRows channels at a time
        rows_times_block<Dot>(h.v + d * h.k_pad + j0, h.k_pad, w.p.get(), kQ * per, keys / per, w.alpha,
                              w.o.get() + d * kQ);
    }
  }
}

// ---- the whole op ----------------------------------------------------------------------------------------

// Packs every (sample, head) (tasks: its q, k, v), then runs every (sample, head, kQ queries) task. In: the
// storage type as the packers read it; Out: the output's.
template <class Dot, typename In, typename Out>
void attend(const AttentionProblem& pr) {
  using E = typename Dot::Element;
  const int64_t D = pr.head_dim, T = pr.tokens, C = pr.heads * D, heads = pr.batch * pr.heads;
  const int64_t q_pad = round_up(T, kQ), k_pad = round_up(T, Dot::kKeyStep), d_pad = round_up(D, kRows);
  const int64_t q_size = D * q_pad, k_size = k_pad * D, v_size = d_pad * k_pad, head_size = q_size + k_size + v_size;
  std::unique_ptr<E[]> packed(new E[heads * head_size]);
  const In* qkv = static_cast<const In*>(pr.qkv);
  const int64_t cs = pr.qkv_channel_stride, ts = pr.qkv_token_stride;
  at::parallel_for(0, 3 * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / 3, part = task % 3;
      const In* src = qkv + bh / pr.heads * pr.qkv_batch_stride + (part * C + bh % pr.heads * D) * cs;
      E* dst = packed.get() + bh * head_size;
      if (part == 0) Dot::pack_q(src, cs, ts, D, T, dst, q_pad);
      if (part == 1) pack_tokens_first(src, cs, ts, D, T, dst + q_size, k_pad);
      if (part == 2) pack_tokens_last(src, cs, ts, D, T, dst + q_size + k_size, k_pad, d_pad);
    }
  });
  const int64_t blocks = q_pad / kQ;
  const float c = static_cast<float>(1.4426950408889634 / std::sqrt(static_cast<double>(D)));
  Out* out = static_cast<Out*>(pr.out);
  at::parallel_for(0, heads * blocks, 1, [&](int64_t begin, int64_t end) {
    Workspace<Dot> w(d_pad);
    Dot::begin_thread();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks, i0 = task % blocks * kQ;
      const E* base = packed.get() + bh * head_size;
      const Head<Dot> h{base, base + q_size, base + q_size + k_size, D, T, q_pad * Dot::kPerWord, k_pad, d_pad};
      attend_queries<Dot>(h, i0, c, w);
      Out* dst = out + bh / pr.heads * pr.out_batch_stride + bh % pr.heads * D * pr.out_channel_stride +
                 i0 * pr.out_token_stride;
      store_output(w.o.get(), w.l, D, std::min<int64_t>(kQ, T - i0), dst, pr.out_channel_stride, pr.out_token_stride);
    }
    Dot::end_thread();
  });
}

}  // namespace
}  // namespace cmfast
