// Decode-sized products (a batch of 4 to 64 rows) of block weights (Q4_1, Q8_0) on AMX's int8 tiles.
//
// A decode step of a few dozen requests multiplies each weight by few rows: the step is bound by
// reading the weights. The bfloat16 tiles (linear_amx.cpp) read their packing, 4 bytes a weight; the
// stored Q4_1 blocks are 0.75 bytes a weight, and their 4-bit codes are exact integers. So here x
// is rounded to int16 per block of 32 values, as the decode products of a few rows do (an error of
// at most 2^-16 of the block's largest value; linear_avx2.cpp), split into a signed high byte and an
// unsigned low byte (X = 256 Xh + Xl), and the two byte products with the codes run on the tiles:
// per block the sum of 32 code products is exact in int32, then scaled by the block's d and x's
// scale, as the few-row kernels do; the offset term adds m times the block's float sum of x.
//
// The weight is repacked once, at load (`amx_int8_pack` on the Python side): per 16 output columns
// and block of 32 inputs, the codes in the B tile's layout (4 consecutive inputs of a column side by
// side), then the 16 columns' d and m as float32. Q4_1: 256 bytes of codes, each byte two of them
// (inputs 0-15 low and 16-31 high, so a vector shift and mask give two tile rows): 384 bytes, 0.75 a
// weight. Q8_0: the 512 bytes of signed codes are the tile itself (m = 0): 640 bytes.
#include "amx_config.h"
#if PLAIT_HAVE_AMX
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstring>

#include "team.h"

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16,amx-int8")

#include "amx_tiles.h"

namespace plait::amx {
namespace {

constexpr int64_t kBlock = 32;        // inputs per weight block (and per tile product here)
constexpr int64_t kGroup = 16;        // output columns per C tile
constexpr int64_t kTileRows = 16;     // x rows per A tile
// bytes per group and block: codes, then 16 d and 16 m (float32)
template <bool kQ8>
constexpr int64_t kCodeBytes = kQ8 ? 512 : 256;
template <bool kQ8>
constexpr int64_t kPackBytes = kCodeBytes<kQ8> + 128;
constexpr int64_t kATileBytes = kTileRows * kBlock;  // one A tile: 16 rows of 32 bytes
constexpr int64_t kBTileBytes = 512;  // one B tile: 8 rows of 64 bytes (16 columns x 4 inputs)

// Tiles: 0 and 1 the sums of the high and low bytes (16 rows of 16 int32), 2 and 3 x's high and low
// bytes (16 rows x 32), 4 the codes (8 rows x 16 columns x 4 inputs); 5, 6 and 7 as 0, 1 and 4 for
// every other block.
void load_int8_config() {
    TileConfig cfg;
    std::memset(&cfg, 0, sizeof(cfg));
    cfg.palette_id = 1;
    cfg.rows[0] = cfg.rows[1] = kTileRows;
    cfg.colsb[0] = cfg.colsb[1] = 64;
    cfg.rows[2] = cfg.rows[3] = kTileRows;
    cfg.colsb[2] = cfg.colsb[3] = kBlock;
    cfg.rows[4] = cfg.rows[7] = 8;
    cfg.colsb[4] = cfg.colsb[7] = 64;
    cfg.rows[5] = cfg.rows[6] = kTileRows;
    cfg.colsb[5] = cfg.colsb[6] = 64;
    asm volatile("" : : "r"(&cfg) : "memory");  // (see load_tile_config)
    _tile_loadconfig(&cfg);
}

// The largest lane and the sum of the lanes (GCC's _mm512_reduce_* warn under -Wall).
inline float lanes_max(__m512 v) {
    __m256 a = _mm256_max_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 b = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    b = _mm_max_ps(b, _mm_movehl_ps(b, b));
    return _mm_cvtss_f32(_mm_max_ss(b, _mm_movehdup_ps(b)));
}
inline float lanes_sum(__m512 v) {
    __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    b = _mm_add_ps(b, _mm_movehl_ps(b, b));
    return _mm_cvtss_f32(_mm_add_ss(b, _mm_movehdup_ps(b)));
}

// Row r's block b of x as int16 codes, the same rounding as the few-row kernels (scale = max|x| /
// 32767, code = x * (32767 / max|x|) rounded to nearest even), split into bytes at their A tiles'
// places; its scale and float sum into scales / sums [rows][blocks].
void quantize_block(const float* x, int64_t M, int64_t K, int64_t r, int64_t b, int8_t* codes, float* scales,
                    float* sums) {
    const int64_t nb = K / kBlock;
    __m512 v0 = _mm512_setzero_ps(), v1 = _mm512_setzero_ps();
    if (r < M) {
        v0 = _mm512_loadu_ps(x + r * K + b * kBlock);
        v1 = _mm512_loadu_ps(x + r * K + b * kBlock + 16);
    }
    const float max_abs = lanes_max(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const __m512 inv = _mm512_set1_ps(max_abs > 0.0f ? 32767.0f / max_abs : 0.0f);
    const __m512i c0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)), c1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
    const __m512i mask = _mm512_set1_epi32(0xFF);
    // per row tile and block: the high bytes' tile, then the low bytes'
    int8_t* hi = codes + ((r / kTileRows) * nb + b) * 2 * kATileBytes + (r % kTileRows) * kBlock;
    int8_t* lo = hi + kATileBytes;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(hi), _mm512_cvtepi32_epi8(_mm512_srai_epi32(c0, 8)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + 16), _mm512_cvtepi32_epi8(_mm512_srai_epi32(c1, 8)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(lo), _mm512_cvtepi32_epi8(_mm512_and_si512(c0, mask)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + 16), _mm512_cvtepi32_epi8(_mm512_and_si512(c1, mask)));
    scales[r * nb + b] = max_abs / 32767.0f;
    sums[r * nb + b] = lanes_sum(_mm512_add_ps(v0, v1));
}

// The group's codes of every block as B tiles (two tile rows from each 64 bytes: low, high nibbles).
void unpack_codes(const uint8_t* group, int64_t nb, uint8_t* tiles) {
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* src = group + b * kPackBytes<false>;
        uint8_t* dst = tiles + b * kBTileBytes;
        for (int i = 0; i < 4; ++i) {
            const __m512i v = _mm512_loadu_si512(src + 64 * i);
            _mm512_store_si512(dst + 64 * i, _mm512_and_si512(v, nibble));
            _mm512_store_si512(dst + 64 * (4 + i), _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble));
        }
    }
}

// A thread's share of the column groups, x already in its tiles' bytes (`codes`, `scales`, `sums`).
template <bool kQ8>
void column_groups(const int8_t* codes, const float* scales, const float* sums, int64_t M, int64_t K,
                   const uint8_t* packed, int64_t N, const float* bias, float* y, int64_t ldy) {
    constexpr int64_t kPack = kPackBytes<kQ8>;
    const int64_t nb = K / kBlock, m_pad = (M + kTileRows - 1) / kTileRows * kTileRows;
    const int64_t row_tiles = m_pad / kTileRows, groups = (N + kGroup - 1) / kGroup;
    static thread_local AlignedVector<uint8_t> tiles;
    if (!kQ8) tiles.resize(size_t(nb * kBTileBytes));
    alignas(64) int32_t c_hi[2][kTileRows * kGroup], c_lo[2][kTileRows * kGroup];
    const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t g0 = groups * t / nt, g1 = groups * (t + 1) / nt;
    for (int64_t g = g0; g < g1; ++g) {
        const uint8_t* group = packed + g * nb * kPack;
        if (g + 1 < g1)  // the next group's bytes from memory while this one computes
            for (int64_t o = 0; o < nb * kPack; o += 64)
                _mm_prefetch(reinterpret_cast<const char*>(group + nb * kPack + o), _MM_HINT_T1);
        if (!kQ8) unpack_codes(group, nb, tiles.data());
        const int64_t cols = std::min<int64_t>(kGroup, N - g * kGroup);
        const __mmask16 col_mask = cols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1);
        for (int64_t rt = 0; rt < row_tiles; ++rt) {
            __m512 acc[kTileRows];
#pragma GCC unroll 16
            for (int r = 0; r < kTileRows; ++r) acc[r] = _mm512_setzero_ps();
            const int8_t* a = codes + rt * nb * 2 * kATileBytes;
            const float* sc = scales + rt * kTileRows * nb;
            const float* sm = sums + rt * kTileRows * nb;
            // Two sets of sum tiles (0-1, 5-6) and buffers: block b's tile products run while the
            // vector units scale block b - 1's sums (each set waits for its stores to be read back).
            auto products = [&](int64_t b) {
                const int8_t* ab = a + b * 2 * kATileBytes;
                const uint8_t* bt = kQ8 ? group + b * kPack : tiles.data() + b * kBTileBytes;
                // x's high bytes are signed, its low bytes unsigned; Q8_0 codes signed, 4-bit ones not
                if (b & 1) {
                    _tile_zero(5);
                    _tile_zero(6);
                    _tile_loadd(2, ab, kBlock);
                    _tile_loadd(3, ab + kATileBytes, kBlock);
                    _tile_loadd(7, bt, 64);
                    if (kQ8) {
                        _tile_dpbssd(5, 2, 7);
                        _tile_dpbusd(6, 3, 7);
                    } else {
                        _tile_dpbsud(5, 2, 7);
                        _tile_dpbuud(6, 3, 7);
                    }
                    _tile_stored(5, c_hi[1], 64);
                    _tile_stored(6, c_lo[1], 64);
                } else {
                    _tile_zero(0);
                    _tile_zero(1);
                    _tile_loadd(2, ab, kBlock);
                    _tile_loadd(3, ab + kATileBytes, kBlock);
                    _tile_loadd(4, bt, 64);
                    if (kQ8) {
                        _tile_dpbssd(0, 2, 4);
                        _tile_dpbusd(1, 3, 4);
                    } else {
                        _tile_dpbsud(0, 2, 4);
                        _tile_dpbuud(1, 3, 4);
                    }
                    _tile_stored(0, c_hi[0], 64);
                    _tile_stored(1, c_lo[0], 64);
                }
            };
            auto scale = [&](int64_t b) {
                const int32_t* hi = c_hi[b & 1];
                const int32_t* lo = c_lo[b & 1];
                const float* consts = reinterpret_cast<const float*>(group + b * kPack + kCodeBytes<kQ8>);
                const __m512 d = _mm512_load_ps(consts), m = _mm512_load_ps(consts + kGroup);
#pragma GCC unroll 16
                for (int r = 0; r < kTileRows; ++r) {
                    const __m512i s = _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(hi + r * kGroup), 8),
                                                       _mm512_load_si512(lo + r * kGroup));
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(d, _mm512_set1_ps(sc[r * nb + b])), acc[r]);
                    if (!kQ8) acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(sm[r * nb + b]), acc[r]);
                }
            };
            products(0);
            for (int64_t b = 1; b < nb; ++b) {
                products(b);
                scale(b - 1);
            }
            scale(nb - 1);
            const __m512 bv = bias ? _mm512_maskz_loadu_ps(col_mask, bias + g * kGroup) : _mm512_setzero_ps();
            const int64_t rows = std::min<int64_t>(kTileRows, M - rt * kTileRows);
            for (int64_t r = 0; r < rows; ++r)
                _mm512_mask_storeu_ps(y + (rt * kTileRows + r) * ldy + g * kGroup, col_mask, _mm512_add_ps(acc[r], bv));
        }
    }
}

}  // namespace

void int8_linear_team(const float* x, int64_t M, int64_t K, const uint8_t* packed, int64_t N, const float* bias,
                      float* y, int64_t ldy, TeamScratch& ts, bool q8) {
    const int64_t nb = K / kBlock, m_pad = (M + kTileRows - 1) / kTileRows * kTileRows;
#pragma omp single
    {
        ts.amx_q.resize(size_t(m_pad * K * 2));
        ts.amx_q_scales.resize(size_t(2 * m_pad * nb));
    }
    int8_t* codes = ts.amx_q.data();
    float* scales = ts.amx_q_scales.data();
    float* sums = scales + m_pad * nb;
#pragma omp for schedule(static) collapse(2)
    for (int64_t r = 0; r < m_pad; ++r)
        for (int64_t b = 0; b < nb; ++b) quantize_block(x, M, K, r, b, codes, scales, sums);
    load_int8_config();
    (q8 ? column_groups<true> : column_groups<false>)(codes, scales, sums, M, K, packed, N, bias, y, ldy);
    _tile_release();
#pragma omp barrier
}

void int8_linear(const float* x, int64_t M, int64_t K, const uint8_t* packed, int64_t N, const float* bias, float* y,
                 int64_t ldy, int nthreads, bool q8) {
    TeamScratch ts;
#pragma omp parallel num_threads(nthreads)
    int8_linear_team(x, M, K, packed, N, bias, y, ldy, ts, q8);
}

}  // namespace plait::amx

#else  // no AMX intrinsics in this compiler: the module reports no AMX, so nothing calls these
#include <cstdlib>

#include "team.h"

namespace plait::amx {
void int8_linear_team(const float*, int64_t, int64_t, const uint8_t*, int64_t, const float*, float*, int64_t,
                      TeamScratch&, bool) {
    std::abort();
}
void int8_linear(const float*, int64_t, int64_t, const uint8_t*, int64_t, const float*, float*, int64_t, int, bool) {
    std::abort();
}
}  // namespace plait::amx
#endif
