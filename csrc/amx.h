// What the AMX kernels (attention_amx.cpp, winograd_bf16.cpp) share: whether this process may run them
// (cpu_features.h), and the one tile configuration they all use (eight tiles of 16 rows of 64 bytes: 16x32 bf16
// operands, 16x16 fp32 accumulators).
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "cpu_features.h"

namespace cmfast {
namespace {

constexpr int kTileRows = 16;   // rows of every tile
constexpr int kTileBytes = 64;  // bytes of a tile row: 32 bf16 or 16 fp32

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Loads the configuration into this thread's tile registers (release them with _tile_release()).
__attribute__((target("amx-tile"), always_inline)) inline void configure_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = kTileBytes;
    config.rows[t] = kTileRows;
  }
  // GCC 12's _tile_loadconfig tells the compiler it reads 8 bytes of the config, which let it drop the stores
  // above: a barrier keeps them.
  asm volatile("" : : "r"(&config) : "memory");
  _tile_loadconfig(&config);
}

#define CMFAST_AMX_TILE_INLINE __attribute__((target("amx-tile,amx-bf16"), always_inline)) inline

// One step of a 32x32 fp32 block held in tiles 0-3 (0: rows 0-15 x columns 0-15, 1: rows 0-15 x 16-31, 2: rows
// 16-31 x 0-15, 3: rows 16-31 x 16-31): block += A B, with A's two 16-row tiles of 32 bf16 at a0 and a1 and B's two
// 16-column tiles of 16 bf16 pairs at b0 and b1 (strides in bytes). Tiles 4-5 hold A, 6-7 hold B.
CMFAST_AMX_TILE_INLINE void multiply_2x2(const void* a0, const void* a1, int64_t a_stride, const void* b0,
                                         const void* b1, int64_t b_stride) {
  _tile_loadd(6, b0, b_stride);
  _tile_loadd(7, b1, b_stride);
  _tile_loadd(4, a0, a_stride);
  _tile_dpbf16ps(0, 4, 6);
  _tile_dpbf16ps(1, 4, 7);
  _tile_loadd(5, a1, a_stride);
  _tile_dpbf16ps(2, 5, 6);
  _tile_dpbf16ps(3, 5, 7);
}

// The 32x32 block in tiles 0-3 from / to row-major fp32 c with `stride` floats between rows.
CMFAST_AMX_TILE_INLINE void load_2x2(const float* c, int64_t stride) {
  _tile_loadd(0, c, stride * 4);
  _tile_loadd(1, c + 16, stride * 4);
  _tile_loadd(2, c + 16 * stride, stride * 4);
  _tile_loadd(3, c + 16 * stride + 16, stride * 4);
}
CMFAST_AMX_TILE_INLINE void store_2x2(float* c, int64_t stride) {
  _tile_stored(0, c, stride * 4);
  _tile_stored(1, c + 16, stride * 4);
  _tile_stored(2, c + 16 * stride, stride * 4);
  _tile_stored(3, c + 16 * stride + 16, stride * 4);
}
CMFAST_AMX_TILE_INLINE void zero_2x2() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

}  // namespace
}  // namespace cmfast
