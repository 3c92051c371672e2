// What both AMX kernels share (linear_amx.cpp, attention_amx.cpp): the tile configuration (tiles 0-7,
// each 16 rows of 64 bytes: 16 float32 sums, or 32 bfloat16 values a row) and the three-pass step of a
// 32 x 32 block. Include after the file's `#pragma GCC target` naming amx-tile and amx-bf16.
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

constexpr int64_t kTileValues = 512;  // bfloat16 values in a tile (16 rows of 64 bytes)

// One step of 32 inputs of a 32 x 32 block's products into tiles 0-3 (C += A B), through tiles 4-5 (A)
// and 6-7 (B): a_hi / a_lo two A tiles each (16 rows `lda` bytes apart, the second `a_second` values
// after the first), b_hi / b_lo two B tiles each (1 KiB apiece, one after the other). Three passes over
// the hi and lo parts (kExact: xh wh + xh wl + xl wh), or the hi parts alone (bfloat16 products).
template <bool kExact>
inline void tile_step(const uint16_t* a_hi, const uint16_t* a_lo, int64_t lda, const uint16_t* b_hi,
                  const uint16_t* b_lo, int64_t a_second) {
    _tile_loadd(4, a_hi, lda);
    _tile_loadd(5, a_hi + a_second, lda);
    if (kExact) {
        _tile_loadd(6, b_lo, 64);
        _tile_loadd(7, b_lo + kTileValues, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_loadd(6, b_hi, 64);
    _tile_loadd(7, b_hi + kTileValues, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
    if (kExact) {
        _tile_loadd(4, a_lo, lda);
        _tile_loadd(5, a_lo + a_second, lda);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
}

}  // namespace plait::amx
