// The bf16 pair dot product of the CPU attention kernels (attention_bf16.cpp; attention_amx.cpp packs and rounds
// the same way): each includer defines CMFAST_ISA and includes attention_loops.h first.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace cmfast {
namespace {

// Two bf16 values (their bits), low then high: a dot product lane's word.
struct Bf16Pair {
  uint16_t lo, hi;
};

struct Bf16Dot {
  static constexpr bool kTiles = false;
  static constexpr int kKeyStep = 16;
  static constexpr int kExpDegree = 4;  // exp2_nonpositive's polynomial
  static void begin_thread() {}
  static void end_thread() {}  // the products by vector dot products (rows_times_block)
  using Element = uint16_t;  // bf16 bits
  using Vec = __m512bh;
  static constexpr int kPerWord = 2;
  CMFAST_INLINE static __m512bh load(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
  CMFAST_INLINE static __m512bh broadcast(const uint16_t* p) {
    int32_t word;
    std::memcpy(&word, p, sizeof(word));
    return (__m512bh)_mm512_set1_epi32(word);
  }
  CMFAST_INLINE static __m512 fma(__m512 acc, __m512bh a, __m512bh b) { return _mm512_dpbf16_ps(acc, a, b); }
  // The probabilities of keys j and j + 1, rounded to bf16 and interleaved: query i's word is (p_j, p_j+1).
  CMFAST_INLINE static void put_probabilities(uint16_t* p, __m512 e0, __m512 e1) {
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                                22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i halves = (__m512i)_mm512_cvtne2ps_pbh(e1, e0);  // e0's 16 values, then e1's
    _mm512_storeu_si512(p, _mm512_permutexvar_epi16(interleave, halves));
  }
  // dst word (w, i) = (x(2w, i), x(2w + 1, i)): pairs of a query's channels, zero for T <= i < q_pad.
  CMFAST_KERNEL static void pack_q(const uint16_t* src, int64_t cs, int64_t ts, int64_t D, int64_t T, uint16_t* dst,
                                   int64_t q_pad) {
    Bf16Pair* words = reinterpret_cast<Bf16Pair*>(dst);
    if (ts == 1) {  // NCHW: rows of tokens, two at a time
      for (int64_t w = 0; w < D / 2; ++w)
        for (int64_t i = 0; i < T; ++i) words[w * q_pad + i] = {src[2 * w * cs + i], src[(2 * w + 1) * cs + i]};
    } else {  // channels_last: a token's channel pairs are a row of words
      transpose(reinterpret_cast<const Bf16Pair*>(src), ts / 2, T, D / 2, words, q_pad);
    }
    zero_columns(words, q_pad, D / 2, T, q_pad);
  }
};

}  // namespace
}  // namespace cmfast
