// What the AMX kernels (attention_amx.cpp, winograd_amx.cpp) share: whether this process may run them, and the
// one tile configuration they all use (eight tiles of 16 rows of 64 bytes: 16x32 bf16 operands, 16x16 fp32
// accumulators).
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace cmfast {

// AMX-TILE and AMX-BF16 on this CPU, and the OS's permission to use them (asked for once).
bool cpu_runs_amx_bf16();

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

}  // namespace
}  // namespace cmfast
