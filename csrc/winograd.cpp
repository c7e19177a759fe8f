// The transforms of the Winograd F(2x2, 3x3) convolution (Lavin and Gray, "Fast Algorithms for Convolutional
// Neural Networks", 2016), for the U-Net's 3x3 convolutions (stride 1, padding 1) on the CPU in fp32,
// channels_last. The input is cut
// into 2x2 output tiles, each read as the 4x4 input patch around it; the patch becomes 16 numbers per channel
// (V = B^T d B), the 16 products with the transformed filters (U = G g G^T) are 16 matrix products done by torch
// (bmm), and each tile's 16 results fold back into its 2x2 outputs (Y = A^T M A). That is 16 multiplications per
// channel pair where the direct convolution does 36. bf16 is winograd_bf16.cpp's: all three steps in one op.
// winograd_filters computes U for either (the layouts the fp32 and bf16 products read);
// cmfast/models/winograd.py holds the loop over chunks of tiles and a pure-torch reference of every step.
//
// Both ops work on the tiles [tile_begin, tile_begin + V.size(1)) of the image, numbered n-major, then row, then
// column, so a caller can run the image in chunks whose transformed values stay in cache between the three steps.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "common.h"
#include "convert.h"
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

// U = G g G^T of one 3x3 filter g (row-major) into u[16] (row-major 4x4), in double: each entry is a sum of at most
// nine filter values times 1, 1/2 or 1/4, exact in double for any filter whose values span less than 2^25 in
// magnitude; rounded once to float by the caller (then to bf16: the roundings torch's conversion from double makes).
inline void filter_transform(const double* g, double* u) {
  double t[12];  // G g: 4 rows of 3
  for (int l = 0; l < 3; ++l) {
    const double a = g[l], b = g[3 + l], c = g[6 + l];
    t[l] = a;
    t[3 + l] = 0.5 * (a + b + c);
    t[6 + l] = 0.5 * (a - b + c);
    t[9 + l] = c;
  }
  for (int k = 0; k < 4; ++k) {
    const double a = t[3 * k], b = t[3 * k + 1], c = t[3 * k + 2];
    u[4 * k] = a;
    u[4 * k + 1] = 0.5 * (a + b + c);
    u[4 * k + 2] = 0.5 * (a - b + c);
    u[4 * k + 3] = c;
  }
}

// U of every filter into u: fp32 (16, in, out); bf16 the products' B operands (out / 32, 16, in / 2, 32, 2). A task
// takes a block of 32 outputs by 16 inputs: it reads their filters (in runs of 16 inputs for channels_last weights,
// of 16 whole filters for contiguous ones), transforms them, and stores each entry k's block in runs of 32 outputs
// (fp32) or as 512 consecutive elements (bf16). 20-50 ms for a 768x1536 weight on 2 Sapphire Rapids cores.
template <typename T>
void filters_of(const at::Tensor& weight, const at::Tensor& u) {
  constexpr int64_t kOut = 32, kIn = 16;
  const int64_t out = weight.size(0), in = weight.size(1);
  const int64_t so = weight.stride(0), si = weight.stride(1), sh = weight.stride(2), sw = weight.stride(3);
  const int64_t out_blocks = (out + kOut - 1) / kOut, in_blocks = (in + kIn - 1) / kIn;
  const T* w = weight.const_data_ptr<T>();
  T* dst = u.data_ptr<T>();
  at::parallel_for(0, out_blocks * in_blocks, 1, [&](int64_t first, int64_t last) {
    double g[9], t[16];
    float block[16][kIn][kOut];
    for (int64_t task = first; task < last; ++task) {
      const int64_t o0 = task / in_blocks * kOut, i0 = task % in_blocks * kIn;
      const int64_t olen = std::min(kOut, out - o0), ilen = std::min(kIn, in - i0);
      for (int64_t ol = 0; ol < olen; ++ol) {
        for (int64_t il = 0; il < ilen; ++il) {
          const T* f = w + (o0 + ol) * so + (i0 + il) * si;
          for (int r = 0; r < 3; ++r) {
            for (int c = 0; c < 3; ++c) g[3 * r + c] = to_f32(f[r * sh + c * sw]);
          }
          filter_transform(g, t);
          for (int k = 0; k < 16; ++k) block[k][il][ol] = static_cast<float>(t[k]);
        }
      }
      for (int k = 0; k < 16; ++k) {
        for (int64_t il = 0; il < ilen; ++il) {
          const int64_t i = i0 + il;
          if constexpr (std::is_same_v<T, c10::BFloat16>) {  // out % 32 == 0 and in even: whole blocks, whole pairs
            T* d = dst + ((o0 / kOut * 16 + k) * (in / 2) + i / 2) * 2 * kOut + i % 2;
            for (int64_t ol = 0; ol < kOut; ++ol) d[2 * ol] = from_f32<T>(block[k][il][ol]);
          } else {
            T* d = dst + (k * in + i) * out + o0;
            for (int64_t ol = 0; ol < olen; ++ol) d[ol] = block[k][il][ol];
          }
        }
      }
    }
  });
}

void winograd_filters(const at::Tensor& weight, const at::Tensor& u) {
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3,
              "winograd_filters: weight must be a CPU tensor of shape (out, in, 3, 3)");
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16,
              "winograd_filters: weight must be float32 or bfloat16");
  TORCH_CHECK(u.scalar_type() == weight.scalar_type() && u.device().is_cpu() && u.is_contiguous(),
              "winograd_filters: u must be a contiguous CPU tensor of the weight's dtype");
  const int64_t out = weight.size(0), in = weight.size(1);
  if (weight.scalar_type() == at::kFloat) {
    TORCH_CHECK(u.sizes() == at::IntArrayRef({16, in, out}), "winograd_filters: u must have shape (16, in, out)");
    filters_of<float>(weight, u);
  } else {
    TORCH_CHECK(in % 2 == 0 && out % 32 == 0, "winograd_filters: bf16 needs an even in and out a multiple of 32");
    TORCH_CHECK(u.sizes() == at::IntArrayRef({out / 32, 16, in / 2, 32, 2}),
                "winograd_filters: u must have shape (out / 32, 16, in / 2, 32, 2)");
    filters_of<c10::BFloat16>(weight, u);
  }
}

}  // namespace
}  // namespace cmfast

TORCH_LIBRARY_FRAGMENT(cmfast_C, m) {
  m.def("winograd_input(Tensor x, int tile_begin, Tensor(a!) v) -> ()");
  m.def("winograd_output(Tensor m, Tensor? bias, Tensor? add, int tile_begin, Tensor(a!) y) -> ()");
  m.def("winograd_filters(Tensor weight, Tensor(a!) u) -> ()");
}

TORCH_LIBRARY_IMPL(cmfast_C, CPU, m) {
  m.impl("winograd_input", &cmfast::winograd_input);
  m.impl("winograd_output", &cmfast::winograd_output);
  m.impl("winograd_filters", &cmfast::winograd_filters);
}
