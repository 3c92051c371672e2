// The tile configuration both AMX kernels use (linear_amx.cpp, attention_amx.cpp): tiles 0-7, each
// 16 rows of 64 bytes (16 float32 sums, or 32 bfloat16 values a row). Include after the file's
// `#pragma GCC target` naming amx-tile.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace plait::amx {

struct alignas(64) TileConfig {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

// Loads this thread's tile configuration (per thread state; `_tile_release` drops it).
inline void load_tile_config() {
    TileConfig cfg;
    std::memset(&cfg, 0, sizeof(cfg));
    cfg.palette_id = 1;
    for (int t = 0; t < 8; ++t) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    // The compiler does not see `ldtilecfg` read the structure and may drop the stores above.
    asm volatile("" : : "r"(&cfg) : "memory");
    _tile_loadconfig(&cfg);
}

}  // namespace plait::amx
