// The image's 2x2 output tiles for Winograd's F(2x2, 3x3) convolution (winograd.cpp, winograd_amx.cpp): which
// input pixels a tile reads and which output pixels it writes.
#pragma once
#include <cstdint>

namespace cmfast {
namespace {

// The image's 2x2 output tiles, numbered n-major, then row, then column; images (N, C, H, W) channels_last.
struct Geometry {
  int64_t batch, height, width, tiles_h, tiles_w;
  int64_t tiles() const { return batch * tiles_h * tiles_w; }

  // The pixels of the tile's 4x4 input patch (nullptr outside the image: zero padding).
  template <typename T>
  void patch(const T* x, int64_t channels, int64_t tile, const T** rows) const {
    const int64_t n = tile / (tiles_h * tiles_w), ty = tile / tiles_w % tiles_h, tx = tile % tiles_w;
    for (int a = 0; a < 4; ++a) {
      for (int b = 0; b < 4; ++b) {
        const int64_t row = 2 * ty - 1 + a, col = 2 * tx - 1 + b;
        const bool inside = row >= 0 && row < height && col >= 0 && col < width;
        rows[4 * a + b] = inside ? x + ((n * height + row) * width + col) * channels : nullptr;
      }
    }
  }

  // The tile's 2x2 output pixels in y and in the residual (nullptr outside the image, or without a residual).
  template <typename T>
  void outputs(T* y, const T* residual, int64_t channels, int64_t tile, T** pixels, const T** adds) const {
    const int64_t n = tile / (tiles_h * tiles_w), ty = tile / tiles_w % tiles_h, tx = tile % tiles_w;
    for (int r = 0; r < 2; ++r) {
      for (int col = 0; col < 2; ++col) {
        const int64_t row = 2 * ty + r, column = 2 * tx + col;
        const bool inside = row < height && column < width;
        const int64_t offset = ((n * height + row) * width + column) * channels;
        pixels[2 * r + col] = inside ? y + offset : nullptr;
        adds[2 * r + col] = inside && residual != nullptr ? residual + offset : nullptr;
      }
    }
  }
};

inline Geometry geometry_of(int64_t batch, int64_t height, int64_t width) {
  return {batch, height, width, (height + 1) / 2, (width + 1) / 2};
}

}  // namespace
}  // namespace cmfast
