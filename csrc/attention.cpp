// The attention op's CPU helper: the batched transposing copy its torch backend needs around SDPA in the NCHW
// layout. The packed qkv holds each head as a (D, T) block with T contiguous; SDPA wants (T, D) rows, and its
// (T, D) output goes back into the op's (D, T) channel layout. torch's copy_ does such a strided copy element by
// element (~2.7 GB/s on a 2-core Zen 4 at T = 1024); this one goes tile by tile (both sides in L1), many times that.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "common.h"
#include "ops.h"

namespace cmfast {
namespace {

constexpr int64_t kTile = 32;        // a 32x32 tile: 4 KB of fp32 read and 4 KB written, both in L1
constexpr int64_t kGrain = 1 << 14;  // elements per parallel task at least

// out[n, k, r] = src[n, r, k] for contiguous src (N, R, K) and out (N, K, R); T: an unsigned type of the element's
// size (a copy moves bits). A tile is read row by row into a local buffer, then written column by column: reading it
// by columns straight from src would touch rows K elements apart, which alias in L1 when K * size is 4 KB.
template <typename T>
void transpose_tiles(const T* __restrict__ src, T* __restrict__ out, int64_t N, int64_t R, int64_t K) {
  const int64_t row_tiles = (R + kTile - 1) / kTile;
  const int64_t grain = std::max<int64_t>(1, kGrain / (kTile * K));
  at::parallel_for(0, N * row_tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / row_tiles, r0 = t % row_tiles * kTile, r1 = std::min(R, r0 + kTile);
      const T* s = src + n * R * K;
      T* o = out + n * R * K;
      T tile[kTile][kTile];  // rows of src read whole into it, then written out by columns
      for (int64_t k0 = 0; k0 < K; k0 += kTile) {
        const int64_t k1 = std::min(K, k0 + kTile);
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t k = k0; k < k1; ++k) tile[r - r0][k - k0] = s[r * K + k];
        for (int64_t k = k0; k < k1; ++k)
          for (int64_t r = r0; r < r1; ++r) o[k * R + r] = tile[r - r0][k - k0];
      }
    }
  });
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
      return transpose_tiles(static_cast<const uint16_t*>(src.const_data_ptr()),
                             static_cast<uint16_t*>(out.mutable_data_ptr()), N, R, K);
    case 4:
      return transpose_tiles(static_cast<const uint32_t*>(src.const_data_ptr()),
                             static_cast<uint32_t*>(out.mutable_data_ptr()), N, R, K);
    case 8:
      return transpose_tiles(static_cast<const uint64_t*>(src.const_data_ptr()),
                             static_cast<uint64_t*>(out.mutable_data_ptr()), N, R, K);
  }
  TORCH_CHECK(false, "transpose_last2: unsupported element size ", src.element_size());
}

}  // namespace cmfast
