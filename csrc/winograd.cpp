// The transforms of the Winograd F(2x2, 3x3) convolution (Lavin and Gray, "Fast Algorithms for Convolutional
// Neural Networks", 2016), for the U-Net's 3x3 convolutions (stride 1, padding 1) on the CPU in fp32,
// channels_last. The input is cut
// into 2x2 output tiles, each read as the 4x4 input patch around it; the patch becomes 16 numbers per channel
// (V = B^T d B), the 16 products with the transformed filters (U = G g G^T) are 16 matrix products done by torch
// (bmm), and each tile's 16 results fold back into its 2x2 outputs (Y = A^T M A). That is 16 multiplications per
// channel pair where the direct convolution does 36. bf16 is winograd_amx.cpp's: all three steps in one op.
// cmfast/models/winograd.py holds the filter transform, the loop over chunks of tiles and a pure-torch reference.
//
// Both ops work on the tiles [tile_begin, tile_begin + V.size(1)) of the image, numbered n-major, then row, then
// column, so a caller can run the image in chunks whose transformed values stay in cache between the three steps.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "common.h"
#include "winograd_geometry.h"

namespace cmfast {
namespace {

constexpr int64_t kLanes = 16;      // channels per block: one AVX-512 register of floats
constexpr int64_t kTileGrain = 8;   // tiles per parallel task

// The 4x4 patch of one tile for `len` channels from c, into d[16][kLanes] (zeros outside the image), then
// V = B^T d B into v[16][kLanes]. Inlined into one clone per ISA below.
__attribute__((always_inline)) inline void input_block_of(const float* const* rows, int64_t c, int64_t len, float* out,
                                                          int64_t out_stride) {
  float d[16][kLanes];
  for (int k = 0; k < 16; ++k) {
    if (rows[k] == nullptr) {
      std::fill(d[k], d[k] + kLanes, 0.0f);
    } else {
      for (int64_t l = 0; l < len; ++l) d[k][l] = rows[k][c + l];
      std::fill(d[k] + len, d[k] + kLanes, 0.0f);
    }
  }
  float t[16][kLanes];
  for (int j = 0; j < 4; ++j) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const float d0 = d[j][l], d1 = d[4 + j][l], d2 = d[8 + j][l], d3 = d[12 + j][l];
      t[j][l] = d0 - d2;
      t[4 + j][l] = d1 + d2;
      t[8 + j][l] = d2 - d1;
      t[12 + j][l] = d1 - d3;
    }
  }
  for (int a = 0; a < 4; ++a) {
    float* v0 = out + (4 * a + 0) * out_stride + c;
    float* v1 = out + (4 * a + 1) * out_stride + c;
    float* v2 = out + (4 * a + 2) * out_stride + c;
    float* v3 = out + (4 * a + 3) * out_stride + c;
    const float* r = t[4 * a];
    for (int64_t l = 0; l < len; ++l) {
      const float t0 = r[l], t1 = r[kLanes + l], t2 = r[2 * kLanes + l], t3 = r[3 * kLanes + l];
      v0[l] = t0 - t2;
      v1[l] = t1 + t2;
      v2[l] = t2 - t1;
      v3[l] = t1 - t3;
    }
  }
}

// All channels of one tile: whole blocks with the width known at compile time (unrolled, vectorised), then the rest.
__attribute__((always_inline)) inline void input_tile_of(const float* const* rows, int64_t channels, float* out,
                                                         int64_t out_stride) {
  int64_t c = 0;
  for (; c + kLanes <= channels; c += kLanes) input_block_of(rows, c, kLanes, out, out_stride);
  if (c < channels) input_block_of(rows, c, channels - c, out, out_stride);
}

// One tile's 16 products m (each at m + k * m_stride + c) folded into its 2x2 outputs Y = A^T M A, plus bias and
// the residual `add`, for `len` channels from c. pixels[4] / adds[4]: the outputs (nullptr outside the image).
__attribute__((always_inline)) inline void output_block_of(const float* m, int64_t m_stride, int64_t c, int64_t len,
                                                           const float* bias, float* const* pixels,
                                                           const float* const* adds) {
  float s[8][kLanes];  // s[r * 4 + b] = sum_a A^T[r][a] m[a][b]
  for (int b = 0; b < 4; ++b) {
    const float* m0 = m + (0 + b) * m_stride + c;
    const float* m1 = m + (4 + b) * m_stride + c;
    const float* m2 = m + (8 + b) * m_stride + c;
    const float* m3 = m + (12 + b) * m_stride + c;
    for (int64_t l = 0; l < len; ++l) {
      s[b][l] = m0[l] + m1[l] + m2[l];
      s[4 + b][l] = m1[l] - m2[l] - m3[l];
    }
  }
  for (int r = 0; r < 2; ++r) {
    const float* q = s[4 * r];
    float y0[kLanes], y1[kLanes];
    for (int64_t l = 0; l < len; ++l) {
      const float beta = bias == nullptr ? 0.0f : bias[c + l];
      y0[l] = q[l] + q[kLanes + l] + q[2 * kLanes + l] + beta;
      y1[l] = q[kLanes + l] - q[2 * kLanes + l] - q[3 * kLanes + l] + beta;
    }
    const float* ys[2] = {y0, y1};
    for (int col = 0; col < 2; ++col) {
      float* p = pixels[2 * r + col];
      if (p == nullptr) continue;
      const float* add = adds[2 * r + col];
      const float* y = ys[col];
      if (add == nullptr) {
        for (int64_t l = 0; l < len; ++l) p[c + l] = y[l];
      } else {
        for (int64_t l = 0; l < len; ++l) p[c + l] = y[l] + add[c + l];
      }
    }
  }
}

__attribute__((always_inline)) inline void output_tile_of(const float* m, int64_t m_stride, int64_t channels,
                                                          const float* bias, float* const* pixels,
                                                          const float* const* adds) {
  int64_t c = 0;
  for (; c + kLanes <= channels; c += kLanes) output_block_of(m, m_stride, c, kLanes, bias, pixels, adds);
  if (c < channels) output_block_of(m, m_stride, c, channels - c, bias, pixels, adds);
}

#define CMFAST_WINOGRAD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
CMFAST_WINOGRAD_CLONES void input_tile(const float* const* rows, int64_t channels, float* out, int64_t out_stride) {
  input_tile_of(rows, channels, out, out_stride);
}

CMFAST_WINOGRAD_CLONES void output_tile(const float* m, int64_t m_stride, int64_t channels, const float* bias,
                                        float* const* pixels, const float* const* adds) {
  output_tile_of(m, m_stride, channels, bias, pixels, adds);
}
#undef CMFAST_WINOGRAD_CLONES

// x, y, add: (N, C, H, W) float32 channels_last on the CPU.
void check_image(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 4, name, ": expected a 4-d float32 CPU tensor");
  TORCH_CHECK(t.is_contiguous(at::MemoryFormat::ChannelsLast), name, ": expected channels_last");
}

// v or m: contiguous float32 (16, tiles, channels).
int64_t check_transformed(const at::Tensor& t, const at::Tensor& image, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 3 && t.size(0) == 16 &&
                  t.size(2) == image.size(1), name, ": must be contiguous float32 (16, tiles, channels)");
  return t.size(1);
}

void input_tiles(const at::Tensor& x, int64_t tile_begin, const at::Tensor& v) {
  const Geometry g = geometry_of(x.size(0), x.size(2), x.size(3));
  const int64_t channels = x.size(1), count = v.size(1);
  const float* src = x.const_data_ptr<float>();
  float* dst = v.data_ptr<float>();
  const int64_t stride = count * channels;  // between the 16 values of one tile
  at::parallel_for(0, count, kTileGrain, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      const float* rows[16];
      g.patch(src, channels, tile_begin + i, rows);
      input_tile(rows, channels, dst + i * channels, stride);
    }
  });
}

void winograd_input(const at::Tensor& x, int64_t tile_begin, const at::Tensor& v) {
  check_image(x, "winograd_input: x");
  const int64_t count = check_transformed(v, x, "winograd_input: v");
  TORCH_CHECK(tile_begin >= 0 && tile_begin + count <= geometry_of(x.size(0), x.size(2), x.size(3)).tiles(), "winograd_input: tiles out of range");
  input_tiles(x, tile_begin, v);
}

void output_tiles(const at::Tensor& m, const float* beta, const std::optional<at::Tensor>& add, int64_t tile_begin,
                  const at::Tensor& y) {
  const Geometry g = geometry_of(y.size(0), y.size(2), y.size(3));
  const int64_t channels = y.size(1), count = m.size(1);
  const float* residual = add.has_value() && add->defined() ? add->const_data_ptr<float>() : nullptr;
  const float* src = m.const_data_ptr<float>();
  float* dst = y.data_ptr<float>();
  const int64_t stride = count * channels;
  at::parallel_for(0, count, kTileGrain, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      float* pixels[4];
      const float* adds[4];
      g.outputs(dst, residual, channels, tile_begin + i, pixels, adds);
      output_tile(src + i * channels, stride, channels, beta, pixels, adds);
    }
  });
}

void winograd_output(const at::Tensor& m, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& add,
                     int64_t tile_begin, const at::Tensor& y) {
  check_image(y, "winograd_output: y");
  const int64_t count = check_transformed(m, y, "winograd_output: m");
  TORCH_CHECK(tile_begin >= 0 && tile_begin + count <= geometry_of(y.size(0), y.size(2), y.size(3)).tiles(), "winograd_output: tiles out of range");
  const float* beta = optional_f32(bias, {y.size(1)}, y, "winograd_output: bias");
  if (add.has_value() && add->defined()) {
    check_image(*add, "winograd_output: add");
    TORCH_CHECK(add->sizes() == y.sizes(), "winograd_output: add must have the shape of y");
  }
  output_tiles(m, beta, add, tile_begin, y);
}

}  // namespace
}  // namespace cmfast

TORCH_LIBRARY_FRAGMENT(cmfast_C, m) {
  m.def("winograd_input(Tensor x, int tile_begin, Tensor(a!) v) -> ()");
  m.def("winograd_output(Tensor m, Tensor? bias, Tensor? add, int tile_begin, Tensor(a!) y) -> ()");
}

TORCH_LIBRARY_IMPL(cmfast_C, CPU, m) {
  m.impl("winograd_input", &cmfast::winograd_input);
  m.impl("winograd_output", &cmfast::winograd_output);
}
