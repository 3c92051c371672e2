// Products of many rows on Intel AMX (the tile matrix unit of Xeons since Sapphire Rapids).
//
// A prefill or a large batch multiplies x [M, K] by the weight [N, K] with M in the tens to
// thousands: compute-bound, where the vector units' float32 multiply-adds are the limit. AMX's
// `TDPBF16PS` multiplies bfloat16 pairs into float32 sums at about sixteen times their rate. A plain
// bfloat16 product rounds x and w to 8 significant bits, which is enough to change greedy outputs, so
// the products here split both into two bfloat16 parts, v = hi + lo (hi = bf16(v), lo = bf16(v - hi):
// 16 significant bits), and sum the three larger partial products, xh wh + xl wh + xh wl. The part
// left out, xl wl, is below 2^-16 of each product: as close to the float32 product as the int16
// decode products, at a third of AMX's rate.
//
// The weight is packed once, at load (`pack` on the Python side): for each 32 output columns and
// each 32 inputs, four 16 x 16-pair tiles (hi and lo, two column halves) in AMX's pair-interleaved
// layout, 4 KiB together. x is split per call into two bfloat16 matrices padded to 32 rows.
#include "amx_config.h"
#if PLAIT_HAVE_AMX
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstring>

#include "team.h"

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")

#include "amx_tiles.h"

namespace plait::amx {
namespace {

constexpr int kRows = 32;       // x rows per block: two A tiles
constexpr int kCols = 32;       // output columns per block: two B tiles
constexpr int kStep = 32;       // inputs per tile product (16 bfloat16 pairs)
constexpr int64_t kAhead = 2;    // steps ahead a block asks for its weight tiles (few rows)
// Tiles 0-3 hold a block's 32 x 32 float32 sums, 4-5 x rows (16 each), 6-7 weight columns (16 each).

// Row r of x as its two bfloat16 parts (zeros for the padding rows r >= M), in tile order: per block
// of 32 rows and step of 32 inputs one 2 KiB piece (two A tiles of 16 rows x 64 bytes), so that a
// tile load reads 1 KiB in a row rather than 16 rows a whole row of x apart.
void split_rows(const float* x, int64_t M, int64_t K, int64_t r, uint16_t* hi, uint16_t* lo) {
    const int64_t steps = K / kStep;
    const int64_t base = (r / kRows) * steps * kRows * kStep + (r % kRows) * kStep;
    for (int64_t k = 0; k < K; k += 16) {  // K is a multiple of 32
        const int64_t at = base + (k / kStep) * kRows * kStep + k % kStep;
        const __m512 f = r < M ? _mm512_loadu_ps(x + r * K + k) : _mm512_setzero_ps();
        if (!lo) {
            store_bf16(hi + at, bf16_bits(f));
            continue;
        }
        __m512i h, l;
        split16(f, h, l);
        store_bf16(hi + at, h);
        store_bf16(lo + at, l);
    }
}

// The 32 x 32 block of sums of x's row block at hi/lo (split_rows' order) and packed column block
// `b` (its K / 32 steps of 4 tiles, or 2 for a weight packed without its lo part), stored at `sums`
// (rows `ld` floats apart).
template <bool kExact>
void block(const uint16_t* hi, const uint16_t* lo, int64_t K, const uint16_t* b, float* sums, int64_t ld, bool prefetch) {
    constexpr int64_t kPiece = kRows * kStep;  // x's values per row block and step
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    constexpr int64_t kStepElems = (kExact ? 4 : 2) * kTileValues;
    for (int64_t k = 0; k < K; k += kStep, b += kStepElems, hi += kPiece, lo += kPiece) {
        // the weight tiles kAhead steps on, a line per 32 values (streamed from memory when few rows reuse them)
        if (prefetch)
            for (int64_t e = 0; e < kStepElems; e += 32) _mm_prefetch(reinterpret_cast<const char*>(b + kAhead * kStepElems + e), _MM_HINT_T0);
        tile_step<kExact>(hi, lo, 64, b, b + 2 * kTileValues, 16 * kStep);
    }
    const int64_t ldb = ld * 4;
    _tile_stored(0, sums, ldb);
    _tile_stored(1, sums + 16, ldb);
    _tile_stored(2, sums + 16 * ld, ldb);
    _tile_stored(3, sums + 16 * ld + 16, ldb);
}

// rows x cols of a block's sums (kCols floats a row) into y, plus the bias. Vector stores: the tiles
// store into this small buffer, which stays in L1, and the copy's writes to y (rarely in cache: a
// prefill's y is megabytes) overlap the next block's products, where tile stores into y stall them.
void copy_out(const float* sums, int64_t rows, int64_t cols, const float* bias, float* out, int64_t ldy) {
    const __mmask16 m0 = cols >= 16 ? __mmask16(0xffff) : __mmask16((1u << cols) - 1);
    const __mmask16 m1 = cols >= 32 ? __mmask16(0xffff) : cols > 16 ? __mmask16((1u << (cols - 16)) - 1) : __mmask16(0);
    const __m512 b0 = bias ? _mm512_maskz_loadu_ps(m0, bias) : _mm512_setzero_ps();
    const __m512 b1 = bias ? _mm512_maskz_loadu_ps(m1, bias + 16) : _mm512_setzero_ps();
    for (int64_t i = 0; i < rows; ++i) {
        _mm512_mask_storeu_ps(out + i * ldy, m0, _mm512_add_ps(_mm512_load_ps(sums + i * kCols), b0));
        _mm512_mask_storeu_ps(out + i * ldy + 16, m1, _mm512_add_ps(_mm512_load_ps(sums + i * kCols + 16), b1));
    }
}

constexpr int64_t kSplitRowsBytes = int64_t(3) << 19;  // x's parts above this (1.5 MiB): threads split the rows

}  // namespace

void linear_team(const float* x, int64_t M, int64_t K, const uint16_t* packed, int64_t N, const float* bias, float* y,
                 int64_t ldy, TeamScratch& ts, bool exact) {
    const int64_t m_pad = (M + kRows - 1) / kRows * kRows;
#pragma omp single
    ts.amx_x.resize(size_t((exact ? 2 : 1) * m_pad * K));
    uint16_t* hi = ts.amx_x.data();
    uint16_t* lo = hi + m_pad * K;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < m_pad; ++r) split_rows(x, M, K, r, hi, exact ? lo : nullptr);
    load_tile_config();
    const int64_t col_blocks = (N + kCols - 1) / kCols, row_blocks = m_pad / kRows;
    const int64_t b_block = (K / kStep) * (exact ? 4 : 2) * kTileValues;  // packed values per column block
    alignas(64) float sums[kRows * kCols];
    auto run = [&](int64_t nb, int64_t mb, bool prefetch) {
        const int64_t m0 = mb * kRows, n0 = nb * kCols;
        const uint16_t* b = packed + nb * b_block;
        (exact ? block<true> : block<false>)(hi + m0 * K, lo + m0 * K, K, b, sums, kCols, prefetch);
        copy_out(sums, std::min<int64_t>(kRows, M - m0), std::min<int64_t>(kCols, N - n0), bias ? bias + n0 : nullptr,
                 y + m0 * ldy + n0, ldy);
    };
    if (row_blocks <= 2) {
        // decode-sized batches: each weight tile used once or twice, asked for ahead from memory
#pragma omp for schedule(static) collapse(2)
        for (int64_t nb = 0; nb < col_blocks; ++nb)
            for (int64_t mb = 0; mb < row_blocks; ++mb) run(nb, mb, true);
    } else {
        // Each thread a rectangle of blocks, column blocks outermost: it keeps a column block's weight
        // tiles in cache while it runs down its rows, whose parts stay in its L2. When x's parts would
        // not fit there, the threads split the rows (and each reads every weight), else the columns.
        const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
        const bool split_rows_between = nt > 1 && row_blocks >= 4 * nt && int64_t(ts.amx_x.size()) * 2 > kSplitRowsBytes;
        const int64_t parts_of = split_rows_between ? row_blocks : col_blocks;
        const int64_t first = parts_of * t / nt, last = parts_of * (t + 1) / nt;
        const int64_t nb0 = split_rows_between ? 0 : first, nb1 = split_rows_between ? col_blocks : last;
        const int64_t mb0 = split_rows_between ? first : 0, mb1 = split_rows_between ? last : row_blocks;
        for (int64_t nb = nb0; nb < nb1; ++nb)
            for (int64_t mb = mb0; mb < mb1; ++mb) run(nb, mb, false);
#pragma omp barrier
    }
    _tile_release();
}

void linear(const float* x, int64_t M, int64_t K, const uint16_t* packed, int64_t N, const float* bias, float* y,
            int64_t ldy, int nthreads, bool exact) {
    TeamScratch ts;
#pragma omp parallel num_threads(nthreads)
    linear_team(x, M, K, packed, N, bias, y, ldy, ts, exact);
}

}  // namespace plait::amx

#else  // no AMX intrinsics in this compiler: the module reports no AMX, so nothing calls these
#include <cstdlib>

#include "team.h"

namespace plait::amx {
void linear_team(const float*, int64_t, int64_t, const uint16_t*, int64_t, const float*, float*, int64_t, TeamScratch&,
                 bool) {
    std::abort();
}
void linear(const float*, int64_t, int64_t, const uint16_t*, int64_t, const float*, float*, int64_t, int, bool) {
    std::abort();
}
}  // namespace plait::amx
#endif
