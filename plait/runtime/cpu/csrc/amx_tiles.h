// What both AMX kernels share (linear_amx.cpp, attention_amx.cpp): the tile configuration (tiles 0-7,
// each 16 rows of 64 bytes: 16 float32 sums, or 32 bfloat16 values a row), the split of float32 values
// into bfloat16 hi and lo parts, and the three-pass step of a 32 x 32 block. Include after the file's
// `#pragma GCC target` naming avx512bf16, amx-tile and amx-bf16.
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

// 16 values rounded to bfloat16 (to nearest even), each in the low half of a 32-bit lane, and back.
inline __m512i bf16_bits(__m512 v) { return _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)); }
inline __m512 from_bf16_bits(__m512i b) { return _mm512_castsi512_ps(_mm512_slli_epi32(b, 16)); }

// 16 values as their bfloat16 parts: hi = bf16(v), lo = bf16(v - hi) (16 significant bits together).
inline void split16(__m512 v, __m512i& hi, __m512i& lo) {
    hi = bf16_bits(v);
    lo = bf16_bits(_mm512_sub_ps(v, from_bf16_bits(hi)));
}

// 16 such lanes stored as 16 contiguous bfloat16 values.
inline void store_bf16(uint16_t* dst, __m512i bits) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(bits));
}

// C += A B for the 2 x 2 tiles of a 32 x 32 block: sums 0-3, A rows in tiles 4-5, B columns in 6-7.
inline void products_2x2() {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
}

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
        products_2x2();
    }
    _tile_loadd(6, b_hi, 64);
    _tile_loadd(7, b_hi + kTileValues, 64);
    products_2x2();
    if (kExact) {
        _tile_loadd(4, a_lo, lda);
        _tile_loadd(5, a_lo + a_second, lda);
        products_2x2();
    }
}

}  // namespace plait::amx
