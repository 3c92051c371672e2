// Products of many rows (prefill, decode batches above 8 requests) with AVX-512, float32 math.
//
// On a CPU with AVX-512 but no AMX (or where AMX is turned off), these products are the bulk of a
// prefill. The AVX2 panel kernel holds 3 x 4 dot products in 8-wide registers and sums each one
// across its lanes at the end; here the 512-bit registers run the usual outer-product scheme:
// a panel of 32 weight rows is decoded from its stored format into float32, transposed to
// [K][32] (one 64-byte line per input k), and each block of up to 12 rows of x times the panel is
// 24 running sums of 16 outputs: per input k, two panel loads, 12 broadcasts of x, 24 FMAs. No
// lane sums, and two FMAs a cycle in the steady state.
//
// Threads take panels (32 output columns) dynamically; each sweeps all rows of x over its panel,
// which stays in L2 (K * 128 bytes: 72 KiB for K = 576, 192 KiB for K = 1536).
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <new>
#include <utility>

#include "kernels.h"

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")

#include "simd_avx2.h"
#include "simd_avx512.h"

namespace plait::avx512 {
namespace {

using avx2::dequant_row;
using avx512_helpers::tail_masks;
using avx512_helpers::dpwssd;
using avx512_helpers::dpwssd_broadcast;
using avx512_helpers::silu_mul;
using avx512_helpers::transpose16;

constexpr int kNR = 32;  // output columns (weight rows) per panel: two 16-float vectors
constexpr int kMR = 12;  // rows of x per block: 24 accumulators, 2 panel vectors, 1 broadcast
#ifndef PLAIT_KC
#define PLAIT_KC 256
#endif
// At most this many inputs per slice of the panel (32 KiB of it), which stays in L1 while every row of
// x passes over it; K is cut into equal slices of a multiple of 16.
constexpr int64_t kMaxKC = PLAIT_KC;

// A thread's growing float buffer on 64-byte lines. Deliberately not a std::vector: a template
// instantiated under this file's AVX-512 target could be merged by the linker with the same
// instantiation in another file and then run on CPUs without AVX-512; a type local to this file cannot.
// (The library headers come before the target pragma for that reason too, and because GCC 13 refuses
// to inline their always_inline functions into code of another target.)
struct Buffer {
    float* data = nullptr;
    size_t size = 0;
    float* get(size_t n) {
        if (n > size) {
            std::free(data);
            data = static_cast<float*>(std::aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64));
            if (!data) throw std::bad_alloc();
            size = n;
        }
        return data;
    }
    ~Buffer() { std::free(data); }
};

// Weight rows n0 .. n0 + rows (rows <= 32) as float32 in `panel` [K][32] (columns past `rows` zero),
// through `rowbuf` [16][K].
template <int FMT>
void fill_panel(const uint8_t* w, size_t stride, int64_t n0, int rows, int64_t K, float* rowbuf, float* panel) {
    for (int half = 0; half < 2; ++half) {
        const int j0 = 16 * half;
        const int nj = std::max(0, std::min(16, rows - j0));
        for (int j = 0; j < nj; ++j) dequant_row<FMT>(w + (n0 + j0 + j) * stride, K, rowbuf + j * K);
        for (int64_t k0 = 0; k0 < K; k0 += 16) {
            __m512 r[16];
            for (int j = 0; j < 16; ++j) r[j] = j < nj ? _mm512_loadu_ps(rowbuf + j * K + k0) : _mm512_setzero_ps();
            transpose16(r);
            for (int i = 0; i < 16; ++i) _mm512_store_ps(panel + (k0 + i) * kNR + j0, r[i]);
        }
    }
}

// A block's running sums of MR rows x 32 columns: zero for the first slice of K, else y's partial sums.
template <int MR>
PLAIT_INLINE void start_sums(bool first, const float* y, int64_t ldy, __mmask16 m0, __mmask16 m1, __m512 (&c0)[MR],
                             __m512 (&c1)[MR]) {
    for (int i = 0; i < MR; ++i) {
        c0[i] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m0, y + i * ldy);
        c1[i] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m1, y + i * ldy + 16);
    }
}

// The sums into y, plus `bias` (the last slice of K only; else null).
template <int MR>
PLAIT_INLINE void store_sums(const float* bias, float* y, int64_t ldy, __mmask16 m0, __mmask16 m1, __m512 (&c0)[MR],
                             __m512 (&c1)[MR]) {
    const __m512 bias0 = bias ? _mm512_maskz_loadu_ps(m0, bias) : _mm512_setzero_ps();
    const __m512 bias1 = bias ? _mm512_maskz_loadu_ps(m1, bias + 16) : _mm512_setzero_ps();
    for (int i = 0; i < MR; ++i) {
        _mm512_mask_storeu_ps(y + i * ldy, m0, bias ? _mm512_add_ps(c0[i], bias0) : c0[i]);
        _mm512_mask_storeu_ps(y + i * ldy + 16, m1, bias ? _mm512_add_ps(c1[i], bias1) : c1[i]);
    }
}

// y[i][0 .. ncols) (+)= x[i][k0 .. k1) . panel columns k0 .. k1 for MR rows of x (row stride K): the
// first slice of K starts the sums, later ones add to y; the last adds the bias.
template <int MR>
inline void panel_block(const float* x, int64_t K, int64_t k0, int64_t k1, const float* panel, const float* bias,
                        float* y, int64_t ldy, int ncols) {
    __mmask16 m0, m1;
    tail_masks(ncols, m0, m1);
    __m512 c0[MR], c1[MR];
    start_sums<MR>(k0 == 0, y, ldy, m0, m1, c0, c1);
    for (int64_t k = k0; k < k1; ++k) {
        const __m512 b0 = _mm512_load_ps(panel + k * kNR);
        const __m512 b1 = _mm512_load_ps(panel + k * kNR + 16);
        for (int i = 0; i < MR; ++i) {
            const __m512 a = _mm512_set1_ps(x[i * K + k]);
            c0[i] = _mm512_fmadd_ps(a, b0, c0[i]);
            c1[i] = _mm512_fmadd_ps(a, b1, c1[i]);
        }
    }
    store_sums<MR>(k1 == K ? bias : nullptr, y, ldy, m0, m1, c0, c1);
}

template <int... MRs>
inline void panel_rows(int mr, const float* x, int64_t K, int64_t k0, int64_t k1, const float* panel, const float* bias,
                       float* y, int64_t ldy, int ncols, std::integer_sequence<int, MRs...>) {
    ((mr == MRs + 1 ? (panel_block<MRs + 1>(x, K, k0, k1, panel, bias, y, ldy, ncols), 0) : 0), ...);
}

template <int FMT>
void panel_team(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, const float* bias, float* y,
                int64_t ldy) {
    const size_t stride = row_bytes(FMT, K);
    const int64_t num_panels = (N + kNR - 1) / kNR;
    const int64_t slices = (K + kMaxKC - 1) / kMaxKC;
    const int64_t kc = ((K + slices - 1) / slices + 15) / 16 * 16;
    static thread_local Buffer panel_buffer, row_buffer;
    float* const panel = panel_buffer.get(size_t(K * kNR));
    float* const rowbuf = row_buffer.get(size_t(16 * K));
#pragma omp for schedule(dynamic, 1)
    for (int64_t p = 0; p < num_panels; ++p) {
        const int64_t n0 = p * kNR;
        const int cols = int(std::min<int64_t>(kNR, N - n0));
        fill_panel<FMT>(w, stride, n0, cols, K, rowbuf, panel);
        const float* b = bias ? bias + n0 : nullptr;
        for (int64_t k0 = 0; k0 < K; k0 += kc) {
            const int64_t k1 = std::min<int64_t>(K, k0 + kc);
            for (int64_t m0 = 0; m0 < M; m0 += kMR) {
                const int mr = int(std::min<int64_t>(kMR, M - m0));
                panel_rows(mr, x + m0 * K, K, k0, k1, panel, b, y + m0 * ldy + n0, ldy, cols,
                           std::make_integer_sequence<int, kMR>{});
            }
        }
    }
}

// ---- Products of more rows in integers: int16 x times the stored codes on AVX-512 VNNI ----
//
// The float32 panels above run 16 multiply-adds per instruction. With x rounded to int16 per block of
// 32 values (the decode products' rounding: scale max|x| / 32767, codes rounded to nearest even) and
// the weights' codes widened to int16 (exact: 4-bit or int8), VPDPWSSD runs 32 per instruction at the
// same rate. The panel is the same 32 output columns, now as pairs of inputs: per pair of inputs p,
// 32 int32 lanes, each a column's two codes side by side, so one instruction multiplies a broadcast
// pair of x's codes with 16 columns. Per block, each row's 32 exact code products are converted to
// float and scaled by the column's d times the row's scale; the offset formats add m times the
// block's float sum of x, as the decode kernels do. That per-block scaling is the price of the
// integers: 2 vector operations (3 with an offset) per 16 multiply instructions.
//
// The scaling needs the 2 x MR float sums and 2 x MR integer sums in registers: 6 rows a block (28 of
// the 32 registers), per pair of inputs 2 panel loads and 6 broadcast loads for 12 products.

constexpr int kIntMR = 6;
constexpr int64_t kIntMaxBlocks = 16;  // blocks per slice of the panel: 32 KiB of codes

// A 4-byte load that may alias the int16 codes (two codes side by side).
typedef int32_t pair32 __attribute__((may_alias, aligned(4)));

// The largest lane of each of 16 vectors, lane i for m[i]: pairs of vectors folded into one (halves,
// then quarters, then pairs of lanes, as sum8 folds sums), 45 instructions where reducing each alone
// takes 6 and a move to a scalar register.
PLAIT_INLINE __m512 max16(const __m512 m[16]) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; ++i)  // lanes 0-7 of a[i]: m[2i]'s halves' maxima; 8-15: m[2i + 1]'s
        a[i] = _mm512_max_ps(_mm512_shuffle_f32x4(m[2 * i], m[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(m[2 * i], m[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; ++i)  // quarter q of b[i]: four partial maxima of m[4i + q]
        b[i] = _mm512_max_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; ++i)  // quarter q of c[i]: two of m[8i + q], then two of m[8i + 4 + q]
        c[i] = _mm512_max_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44), _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE));
    // lane 4q + j: the maximum of m[4j + q]
    const __m512 d = _mm512_max_ps(_mm512_shuffle_ps(c[0], c[1], 0x88), _mm512_shuffle_ps(c[0], c[1], 0xDD));
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    return _mm512_permutexvar_ps(order, d);
}

// Row r of x: codes [K] (natural order) at `levels` (32767: int16; 8191: the int14 weights' x), and per
// block its scale and (where `sums` is not null) float sum. Sixteen blocks at a time: their maxima in
// one vector, their scales and inverses by one vector division each (the same IEEE quotients as one
// block at a time, so the same codes).
inline void quantize_row(const float* x, int64_t K, int16_t* codes, float* scales, float* sums,
                         float levels = 32767.0f) {
    const int64_t nb = K / kBlock;
    const __m512 lv = _mm512_set1_ps(levels);
    for (int64_t b0 = 0; b0 < nb; b0 += 16) {
        const int n = int(std::min<int64_t>(16, nb - b0));
        const float* xb = x + b0 * kBlock;
        __m512 m[16];
        for (int i = 0; i < 16; ++i)
            m[i] = i < n ? _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(xb + i * kBlock)),
                                         _mm512_abs_ps(_mm512_loadu_ps(xb + i * kBlock + 16)))
                         : _mm512_setzero_ps();
        const __m512 max_abs = max16(m);
        const __mmask16 live = __mmask16((1u << n) - 1);
        // max_abs > 0 ? levels / max_abs : 0
        const __m512 inv = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(max_abs, _mm512_setzero_ps(), _CMP_GT_OQ), lv, max_abs);
        _mm512_mask_storeu_ps(scales + b0, live, _mm512_div_ps(max_abs, lv));
        for (int i = 0; i < n; ++i) {
            const __m512 v0 = _mm512_loadu_ps(xb + i * kBlock), v1 = _mm512_loadu_ps(xb + i * kBlock + 16);
            const __m512 s = _mm512_permutexvar_ps(_mm512_set1_epi32(i), inv);
            const __m512i c0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, s));  // round to nearest even
            const __m512i c1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, s));
            int16_t* out = codes + (b0 + i) * kBlock;
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtsepi32_epi16(c0));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16), _mm512_cvtsepi32_epi16(c1));
            if (sums) sums[b0 + i] = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
        }
    }
}

// Block b of a row's codes as 32 int16 in input order.
template <int FMT>
PLAIT_INLINE __m512i block_codes(const uint8_t* q) {
    if constexpr (avx2::is_q8<FMT>()) {
        return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
    } else {  // inputs 0..15 in the low nibbles, 16..31 in the high ones
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
        const __m128i mask = _mm_set1_epi8(0x0F);
        const __m256i nibbles = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_and_si128(raw, mask)),
                                                        _mm_and_si128(_mm_srli_epi16(raw, 4), mask), 1);
        return _mm512_cvtepu8_epi16(nibbles);
    }
}

// Weight rows n0 .. n0 + rows (rows <= 32) of a block format as the int16 panel: codes [K / 2][32] int32
// (pairs of inputs), d and m [K / 32][32] (columns past `rows` zero).
// The 4-bit formats' blocks for 16 columns (c < nj live, the rest zero) straight into the panel's pairs:
// a column's 16 bytes are 8 words, word p holding the pairs p (its bytes' low nibbles: inputs 2p, 2p + 1)
// and p + 8 (the high nibbles: inputs 16 + 2p, 17 + 2p). Two rounds of word permutes across registers
// of 4 columns each turn 16 columns x 8 words into 8 vectors of one word of every column; widened to
// 32 bits, shifts and masks give the two pairs' lanes. About half the instructions of widening each
// column to int16 and transposing 16 x 16 lanes.
PLAIT_INLINE void q4_pairs16(const uint8_t* const q[16], int nj, int32_t* out /* pair p at out[p * kNR] */) {
    __m512i z[4];
    for (int g = 0; g < 4; ++g) {
        z[g] = _mm512_setzero_si512();
        for (int c = 0; c < 4; ++c)
            if (4 * g + c < nj)
                z[g] = _mm512_mask_broadcast_i32x4(z[g], __mmask16(0xF << (4 * c)),
                                                   _mm_loadu_si128(reinterpret_cast<const __m128i*>(q[4 * g + c])));
    }
    // Round 1: from columns 0-7 (z0, z1) and 8-15 (z2, z3), words p = 4h .. 4h + 3: word r = p' * 8 + c.
    alignas(64) static const int16_t kRound1[2][32] = {
        {0, 8, 16, 24, 32, 40, 48, 56, 1, 9, 17, 25, 33, 41, 49, 57, 2, 10, 18, 26, 34, 42, 50, 58, 3, 11, 19, 27, 35, 43, 51, 59},
        {4, 12, 20, 28, 36, 44, 52, 60, 5, 13, 21, 29, 37, 45, 53, 61, 6, 14, 22, 30, 38, 46, 54, 62, 7, 15, 23, 31, 39, 47, 55, 63}};
    // Round 2: two words p of all 16 columns: word r = q * 16 + c from the first (c < 8) or second half.
    alignas(64) static const int16_t kRound2[2][32] = {
        {0, 1, 2, 3, 4, 5, 6, 7, 32, 33, 34, 35, 36, 37, 38, 39, 8, 9, 10, 11, 12, 13, 14, 15, 40, 41, 42, 43, 44, 45, 46, 47},
        {16, 17, 18, 19, 20, 21, 22, 23, 48, 49, 50, 51, 52, 53, 54, 55, 24, 25, 26, 27, 28, 29, 30, 31, 56, 57, 58, 59, 60, 61, 62, 63}};
    const __m512i mask = _mm512_set1_epi32(0x000F000F);
    for (int h = 0; h < 2; ++h) {
        const __m512i r1 = _mm512_load_si512(kRound1[h]);
        const __m512i lo = _mm512_permutex2var_epi16(z[0], r1, z[1]);  // columns 0-7, words 4h .. 4h + 3
        const __m512i hi = _mm512_permutex2var_epi16(z[2], r1, z[3]);  // columns 8-15
        for (int k = 0; k < 2; ++k) {
            const __m512i words = _mm512_permutex2var_epi16(lo, _mm512_load_si512(kRound2[k]), hi);
            for (int q2 = 0; q2 < 2; ++q2) {
                const int p = 4 * h + 2 * k + q2;
                const __m512i v = _mm512_cvtepu16_epi32(q2 == 0 ? _mm512_castsi512_si256(words)
                                                                : _mm512_extracti64x4_epi64(words, 1));
                // (v | v << 8) & mask: bits 0-3 the low byte's low nibble, bits 16-19 the high byte's
                _mm512_store_si512(out + p * kNR, _mm512_ternarylogic_epi32(v, _mm512_slli_epi32(v, 8), mask, 0xA8));
                _mm512_store_si512(out + (p + 8) * kNR, _mm512_ternarylogic_epi32(_mm512_srli_epi32(v, 4),
                                                                                  _mm512_slli_epi32(v, 4), mask, 0xA8));
            }
        }
    }
}

template <int FMT>
void fill_int16_panel(const uint8_t* w, size_t stride, int64_t n0, int rows, int64_t nb, int32_t* codes, float* d,
                      float* m) {
    if constexpr (!avx2::is_q8<FMT>()) {
        for (int half = 0; half < 2; ++half) {
            const int j0 = 16 * half;
            const int nj = std::max(0, std::min(16, rows - j0));
            for (int64_t b = 0; b < nb; ++b) {
                const uint8_t* q[16];
                for (int j = 0; j < 16; ++j) {
                    if (j < nj) {
                        float dj, mj;
                        q[j] = avx2::block_head<FMT>(w + (n0 + j0 + j) * stride, b, dj, mj);
                        d[b * kNR + j0 + j] = dj;
                        m[b * kNR + j0 + j] = mj;
                    } else {
                        q[j] = nullptr;
                        d[b * kNR + j0 + j] = m[b * kNR + j0 + j] = 0.0f;
                    }
                }
                q4_pairs16(q, nj, codes + b * 16 * kNR + j0);
            }
        }
        return;
    }
    for (int half = 0; half < 2; ++half) {
        const int j0 = 16 * half;
        const int nj = std::max(0, std::min(16, rows - j0));
        for (int64_t b = 0; b < nb; ++b) {
            __m512 r[16];
            for (int j = 0; j < 16; ++j) {
                if (j < nj) {
                    float dj, mj;
                    const uint8_t* q = avx2::block_head<FMT>(w + (n0 + j0 + j) * stride, b, dj, mj);
                    r[j] = _mm512_castsi512_ps(block_codes<FMT>(q));
                    d[b * kNR + j0 + j] = dj;
                    m[b * kNR + j0 + j] = mj;
                } else {
                    r[j] = _mm512_setzero_ps();
                    d[b * kNR + j0 + j] = m[b * kNR + j0 + j] = 0.0f;
                }
            }
            transpose16(r);  // r[p]: input pair p of the 16 columns
            for (int p = 0; p < 16; ++p) _mm512_store_ps(reinterpret_cast<float*>(codes + (b * 16 + p) * kNR + j0), r[p]);
        }
    }
}

// The exact code sums of block b for MR rows of x (codes row stride 2 half_k) and a panel's 32 columns
// (pairs of codes [K / 2][32]): s0 for columns 0-15, s1 for 16-31.
template <int MR>
PLAIT_INLINE void block_code_sums(const int16_t* xc, int64_t half_k, int64_t b, const int32_t* pc, __m512i (&s0)[MR],
                                  __m512i (&s1)[MR]) {
    for (int i = 0; i < MR; ++i) s0[i] = s1[i] = _mm512_setzero_si512();
    const pair32* xp = reinterpret_cast<const pair32*>(xc + b * kBlock);
    const int32_t* bp = pc + b * 16 * kNR;
    for (int p = 0; p < 16; ++p) {
        const __m512i w0 = _mm512_load_si512(bp + p * kNR), w1 = _mm512_load_si512(bp + p * kNR + 16);
        for (int i = 0; i < MR; ++i) {
            const __m512i a = _mm512_set1_epi32(xp[i * half_k + p]);
            s0[i] = dpwssd(s0[i], a, w0);
            s1[i] = dpwssd(s1[i], a, w1);
        }
    }
}

// y[i][0 .. ncols) = sums_in[i] + x[i] . panel columns over blocks b0 .. b1 for MR rows of x (codes row
// stride K, scales and sums row stride nb): the first slice starts from zero (sums_in unread), the
// last adds the bias.
template <int MR, bool kOffset>
inline void int16_block(const int16_t* xc, const float* xs, const float* xsum, int64_t K, int64_t nb, int64_t b0,
                        int64_t b1, const int32_t* pc, const float* pd, const float* pm, const float* bias,
                        const float* sums_in, int64_t ld_in, float* y, int64_t ldy, int ncols) {
    __mmask16 m0, m1;
    tail_masks(ncols, m0, m1);
    __m512 c0[MR], c1[MR];
    start_sums<MR>(b0 == 0, sums_in, ld_in, m0, m1, c0, c1);
    const int64_t half_k = K / 2;
    for (int64_t b = b0; b < b1; ++b) {
        __m512i s0[MR], s1[MR];
        block_code_sums<MR>(xc, half_k, b, pc, s0, s1);
        const __m512 d0 = _mm512_load_ps(pd + b * kNR), d1 = _mm512_load_ps(pd + b * kNR + 16);
        for (int i = 0; i < MR; ++i) {
            const __m512 sc = _mm512_set1_ps(xs[i * nb + b]);
            c0[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0[i]), _mm512_mul_ps(d0, sc), c0[i]);
            c1[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1[i]), _mm512_mul_ps(d1, sc), c1[i]);
        }
        if constexpr (kOffset) {
            const __m512 o0 = _mm512_load_ps(pm + b * kNR), o1 = _mm512_load_ps(pm + b * kNR + 16);
            for (int i = 0; i < MR; ++i) {
                const __m512 sum = _mm512_set1_ps(xsum[i * nb + b]);
                c0[i] = _mm512_fmadd_ps(o0, sum, c0[i]);
                c1[i] = _mm512_fmadd_ps(o1, sum, c1[i]);
            }
        }
    }
    store_sums<MR>(b1 == nb ? bias : nullptr, y, ldy, m0, m1, c0, c1);
}

template <bool kOffset, int... MRs>
inline void int16_rows(int mr, const int16_t* xc, const float* xs, const float* xsum, int64_t K, int64_t nb, int64_t b0,
                       int64_t b1, const int32_t* pc, const float* pd, const float* pm, const float* bias,
                       const float* sums_in, int64_t ld_in, float* y, int64_t ldy, int ncols,
                       std::integer_sequence<int, MRs...>) {
    ((mr == MRs + 1 ? (int16_block<MRs + 1, kOffset>(xc, xs, xsum, K, nb, b0, b1, pc, pd, pm, bias, sums_in, ld_in,
                                                     y, ldy, ncols), 0)
                    : 0),
     ...);
}

// ---- Products of more rows on int14 weights laid out once ----
//
// The int16 panels above pay for the weights' block constants on every product: per row, 16 columns
// and block, 16 VPDPWSSD and then d times x's scale multiplied and two FMAs (the scale, and m times x's
// block sum), on the pipes the products use. With the weight rows rounded once at load to 14-bit codes
// with one scale per row (output column), laid out in the panel's order (int14_panel_pack: 2 bytes a
// weight), a block's sums need one FMA (x's block scale), and the column scales come once at the end.
// x is then rounded to 14 bits per block, so that 32 products of two 14-bit codes fit an int32 sum
// (32 x 8,191^2 < 2^31). python -m plait.bench.rounding --weight-bits 14 measures this rounding on the
// default model's greedy outputs.

constexpr float kInt14Levels = 8191.0f;
// Rows a block: 10 integer and 10 float sums in registers, with the two panel loads and a broadcast. Six
// rows (24 sums) left the compiler two registers short: a sum went through register moves in the inner
// loop, and the products ran 7-16% slower on Zen 4 (512 rows, 1 and 2 threads; 4 rows as fast as 5).
constexpr int kInt14MR = 5;

// A packed panel: codes [K / 2][32] int32 (pairs of int16), then the 32 columns' scales.
inline size_t int14_panel_stride(int64_t K) { return size_t(K * kNR) * sizeof(int16_t) + kNR * sizeof(float); }

// y[i][0 .. ncols) = sums_in[i] + x[i] . panel columns over blocks b0 .. b1 for MR rows of x, unscaled
// by the columns' scales until the last slice (`last`), which also adds the bias.
template <int MR>
inline void int14_block(const int16_t* xc, const float* xs, int64_t K, int64_t nb, int64_t b0, int64_t b1,
                        const int32_t* pc, const float* col_scales, const float* bias, const float* sums_in,
                        int64_t ld_in, float* y, int64_t ldy, int ncols, bool last) {
    __mmask16 m0, m1;
    tail_masks(ncols, m0, m1);
    __m512 c0[MR], c1[MR];
    start_sums<MR>(b0 == 0, sums_in, ld_in, m0, m1, c0, c1);
    const int64_t half_k = K / 2;
    for (int64_t b = b0; b < b1; ++b) {
        __m512i s0[MR], s1[MR];
        block_code_sums<MR>(xc, half_k, b, pc, s0, s1);
        for (int i = 0; i < MR; ++i) {
            const __m512 sc = _mm512_set1_ps(xs[i * nb + b]);
            c0[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0[i]), sc, c0[i]);
            c1[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1[i]), sc, c1[i]);
        }
    }
    if (last) {
        const __m512 cs0 = _mm512_loadu_ps(col_scales), cs1 = _mm512_loadu_ps(col_scales + 16);
        for (int i = 0; i < MR; ++i) {
            c0[i] = _mm512_mul_ps(c0[i], cs0);
            c1[i] = _mm512_mul_ps(c1[i], cs1);
        }
    }
    store_sums<MR>(last ? bias : nullptr, y, ldy, m0, m1, c0, c1);
}

template <int... MRs>
inline void int14_rows(int mr, const int16_t* xc, const float* xs, int64_t K, int64_t nb, int64_t b0, int64_t b1,
                       const int32_t* pc, const float* col_scales, const float* bias, const float* sums_in,
                       int64_t ld_in, float* y, int64_t ldy, int ncols, bool last, std::integer_sequence<int, MRs...>) {
    ((mr == MRs + 1 ? (int14_block<MRs + 1>(xc, xs, K, nb, b0, b1, pc, col_scales, bias, sums_in, ld_in, y, ldy,
                                            ncols, last), 0)
                    : 0),
     ...);
}

// Weight rows n0 .. n0 + 32 (those below N) rounded to 14-bit codes, one scale a row, into a packed
// panel (columns past N zero).
template <int FMT>
void pack_int14_panel(const uint8_t* w, size_t stride, int64_t n0, int64_t N, int64_t K, float* row, uint8_t* out) {
    int32_t* pairs = reinterpret_cast<int32_t*>(out);
    float* col_scales = reinterpret_cast<float*>(out + K * kNR * sizeof(int16_t));
    for (int j = 0; j < kNR; ++j) {
        float top = 0.0f;
        if (n0 + j < N) {
            dequant_row<FMT>(w + (n0 + j) * stride, K, row);
            for (int64_t k = 0; k < K; ++k) top = std::max(top, std::fabs(row[k]));
        } else {
            std::fill(row, row + K, 0.0f);
        }
        const float inv = top > 0.0f ? kInt14Levels / top : 0.0f;  // x's rounding: codes round(w * levels / max)
        col_scales[j] = top / kInt14Levels;
        for (int64_t p = 0; p < K / 2; ++p) {
            const int32_t lo = int32_t(std::nearbyint(row[2 * p] * inv));  // to nearest even
            const int32_t hi = int32_t(std::nearbyint(row[2 * p + 1] * inv));
            pairs[p * kNR + j] = int32_t((uint32_t(hi) << 16) | (uint32_t(lo) & 0xFFFFu));
        }
    }
}

// x's rows rounded to int16 per block (codes [M][K]; per row and block its scale and float sum), then
// the products of panels of 32 weight rows with x's rows, a panel and a chunk of rows per work item.
// The rows come in chunks whose codes (at most kChunkCodeBytes) stay in a core's L2 while every panel
// passes over them: 2,048 rows of K = 576 are 2.4 MB of codes, which otherwise come from L3 once per
// panel. Work items go chunk by chunk, so both threads sweep the same chunk; a panel is filled once
// per chunk (for 512 rows of K = 576, one chunk).
constexpr int64_t kChunkCodeBytes = 768 * 1024;

// An 8-bit weight's panels in the order the int16 panel takes them, made once (int16_panel_pack): per 32
// output columns, the panel's pairs of codes as bytes ([K / 2][32][2] int8: the int16 pairs narrowed,
// exactly), then its blocks' d [K / 32][32] float32. The same 1.125 bytes a weight as the stored rows, and
// a work item widens its panel with one instruction per 16 pairs instead of transposing the rows' blocks.
inline size_t panel_stride(int64_t K) { return size_t(K * kNR) + size_t(K / kBlock * kNR) * sizeof(float); }

// Panels read ahead of the one being filled (measured on a 2-core Zen 4 with the weights in memory: 32 rows
// x 576 x 3,072 in 0.81 of the time with 2, 0.85 with 3, 0.87 with 4; 512 rows 0.97).
constexpr int64_t kPrefetchPanels = 2;

struct Int16Panels {
    int64_t M, K, nb, per_slice, chunk_rows, chunks;
    const int16_t* codes;
    const float *scales, *sums;
    int32_t* panel;  // this thread's panel (codes) and its blocks' d and m
    float *pd, *pm;

    // `with_sums`: x's block sums too (the int16 panels of formats with an offset; the int14 products
    // have none).
    Int16Panels(const float* x, int64_t M_, int64_t K_, int16_t* scratch, float levels = 32767.0f,
                bool with_sums = true)
        : M(M_), K(K_), nb(K_ / kBlock) {
        int16_t* const c = scratch;
        float* const sc = reinterpret_cast<float*>(scratch + M * K);
        float* const su = with_sums ? sc + M * nb : nullptr;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < M; ++r)
            quantize_row(x + r * K, K, c + r * K, sc + r * nb, su ? su + r * nb : nullptr, levels);
        codes = c;
        scales = sc;
        sums = su;
        const int64_t slices = (nb + kIntMaxBlocks - 1) / kIntMaxBlocks;
        per_slice = (nb + slices - 1) / slices;
        const int64_t max_rows = std::max<int64_t>(kIntMR, kChunkCodeBytes / (K * int64_t(sizeof(int16_t))));
        chunks = (M + max_rows - 1) / max_rows;
        chunk_rows = ((M + chunks - 1) / chunks + kIntMR - 1) / kIntMR * kIntMR;
        chunks = (M + chunk_rows - 1) / chunk_rows;
        static thread_local Buffer code_buffer, const_buffer;
        panel = reinterpret_cast<int32_t*>(code_buffer.get(size_t(K / 2 * kNR)));
        pd = const_buffer.get(size_t(2 * nb * kNR));
        pm = pd + nb * kNR;
    }
    bool sliced() const { return per_slice < nb; }

    // Work item `item` (of chunks x num_panels, chunk-major): its first row and panel.
    void item_at(int64_t item, int64_t num_panels, int64_t& r0, int64_t& r1, int64_t& panel_index) const {
        const int64_t chunk = item / num_panels;
        panel_index = item % num_panels;
        r0 = chunk * chunk_rows;
        r1 = std::min(M, r0 + chunk_rows);
    }

    // y[m - r0][0 .. cols) = x[m] . weight rows n0 .. n0 + cols (+ bias) for rows m of r0 .. r1, a slice
    // of K at a time. Between slices the sums wait in `kept` (rows of 32 floats from row r0; may be y
    // itself when its rows are 32 floats apart), not in y, whose rows (a whole output row apart: 12 KiB
    // for 3,072 columns) all fall into a few cache sets.
    // `ready`: an 8-bit weight's panel as int16_panel_pack lays it out, else the panel is filled from w.
    template <int FMT>
    void products(const uint8_t* w, int64_t n0, int cols, int64_t r0, int64_t r1, const float* bias, float* y,
                  int64_t ldy, float* kept, const uint8_t* ready) {
        const int32_t* codes_p = panel;
        const float *d_p = pd, *m_p = pm;
        // The weights of the panel kPrefetchPanels on into L2 (and so L3, where the other thread may take
        // it): in a decode batch each panel's weights come from memory once per step, and the fill reads
        // 16 rows a block at a time, which the hardware's prefetchers do not follow far enough ahead.
        const size_t stride = row_bytes(FMT, K);
        const char* const ahead = ready != nullptr ? reinterpret_cast<const char*>(ready) + kPrefetchPanels * panel_stride(K)
                                                   : reinterpret_cast<const char*>(w + (n0 + kPrefetchPanels * kNR) * stride);
        const size_t ahead_bytes = ready != nullptr ? panel_stride(K) : kNR * stride;
        for (size_t off = 0; off < ahead_bytes; off += 64) _mm_prefetch(ahead + off, _MM_HINT_T1);
        if (avx2::is_q8<FMT>() && !avx2::has_offset<FMT>() && ready != nullptr) {
            // the 8-bit codes widen back to the int16 pairs fill_int16_panel makes
            const int8_t* q = reinterpret_cast<const int8_t*>(ready);
            for (int64_t v = 0; v < K * kNR; v += 32)  // 32 codes: a pair of 16 columns
                _mm512_store_si512(panel + v / 2, _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + v))));
            d_p = reinterpret_cast<const float*>(ready + K * kNR);
            m_p = nullptr;  // the 8-bit formats have no offset
        } else {
            fill_int16_panel<FMT>(w, stride, n0, cols, nb, panel, pd, pm);
        }
        for (int64_t b0 = 0; b0 < nb; b0 += per_slice) {
            const int64_t b1 = std::min(nb, b0 + per_slice);
            const bool last = b1 == nb;
            for (int64_t m0 = r0, mr = 0; m0 < r1; m0 += mr) {
                // Groups of 6 rows; 7 to 9 rows left go as two groups of 4 or 5, each of which holds a
                // panel load over more products than a group of 1 to 3 would.
                const int64_t left = r1 - m0;
                mr = left > kIntMR && left < kIntMR + 4 ? (left + 1) / 2 : std::min<int64_t>(kIntMR, left);
                float* const between = kept != nullptr ? kept + (m0 - r0) * kNR : nullptr;
                int16_rows<avx2::has_offset<FMT>()>(int(mr), codes + m0 * K, scales + m0 * nb, sums + m0 * nb, K, nb, b0,
                                                    b1, codes_p, d_p, m_p, bias, between, kNR,
                                                    last ? y + (m0 - r0) * ldy : between, last ? ldy : kNR, cols,
                                                    std::make_integer_sequence<int, kIntMR>{});
            }
        }
    }

    // The same products over a panel of int14 weights laid out once (int14_panel_pack; x quantized at
    // kInt14Levels), read in place.
    void products_int14(const uint8_t* packed_panel, int cols, int64_t r0, int64_t r1, const float* bias, float* y,
                        int64_t ldy, float* kept) {
        const char* const ahead = reinterpret_cast<const char*>(packed_panel) + kPrefetchPanels * int14_panel_stride(K);
        for (size_t off = 0; off < int14_panel_stride(K); off += 64) _mm_prefetch(ahead + off, _MM_HINT_T1);
        const int32_t* codes_p = reinterpret_cast<const int32_t*>(packed_panel);
        const float* col_scales = reinterpret_cast<const float*>(packed_panel + K * kNR * sizeof(int16_t));
        for (int64_t b0 = 0; b0 < nb; b0 += per_slice) {
            const int64_t b1 = std::min(nb, b0 + per_slice);
            const bool last = b1 == nb;
            for (int64_t m0 = r0, mr = 0; m0 < r1; m0 += mr) {
                const int64_t left = r1 - m0;
                mr = left > kInt14MR && left < kInt14MR + 4 ? (left + 1) / 2 : std::min<int64_t>(kInt14MR, left);
                float* const between = kept != nullptr ? kept + (m0 - r0) * kNR : nullptr;
                int14_rows(int(mr), codes + m0 * K, scales + m0 * nb, K, nb, b0, b1, codes_p, col_scales, bias, between,
                           kNR, last ? y + (m0 - r0) * ldy : between, last ? ldy : kNR, cols, last,
                           std::make_integer_sequence<int, kInt14MR>{});
            }
        }
    }
};

// `packed` (8-bit formats): the weight's panels as int16_panel_pack lays them out, read instead of w.
template <int FMT>
void int16_panel_team(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, const float* bias, float* y,
                      int64_t ldy, int16_t* scratch, const uint8_t* packed = nullptr) {
    Int16Panels panels(x, M, K, scratch);
    static thread_local Buffer kept_buffer;
    float* const kept = panels.sliced() ? kept_buffer.get(size_t(panels.chunk_rows * kNR)) : nullptr;
    const int64_t num_panels = (N + kNR - 1) / kNR;
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < panels.chunks * num_panels; ++item) {
        int64_t r0, r1, p;
        panels.item_at(item, num_panels, r0, r1, p);
        const int64_t n0 = p * kNR;
        panels.products<FMT>(w, n0, int(std::min<int64_t>(kNR, N - n0)), r0, r1, bias ? bias + n0 : nullptr,
                             y + r0 * ldy + n0, ldy, kept, packed != nullptr ? packed + p * panel_stride(K) : nullptr);
    }
}

template <int FMT>
void pack_panels(const uint8_t* w, int64_t N, int64_t K, uint8_t* out) {
    static_assert(avx2::is_q8<FMT>() && !avx2::has_offset<FMT>());
    const size_t stride = row_bytes(FMT, K), ps = panel_stride(K);
    const int64_t nb = K / kBlock;
#pragma omp parallel
    {
        Buffer codes_buffer, const_buffer;
        int32_t* codes = reinterpret_cast<int32_t*>(codes_buffer.get(size_t(K / 2 * kNR)));
        float* dm = const_buffer.get(size_t(2 * nb * kNR));
#pragma omp for schedule(dynamic, 16)
        for (int64_t p = 0; p < (N + kNR - 1) / kNR; ++p) {
            fill_int16_panel<FMT>(w, stride, p * kNR, int(std::min<int64_t>(kNR, N - p * kNR)), nb, codes, dm,
                                  dm + nb * kNR);
            int8_t* q = reinterpret_cast<int8_t*>(out + p * ps);
            for (int64_t v = 0; v < K * kNR; v += 32)
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + v), _mm512_cvtepi16_epi8(_mm512_load_si512(codes + v / 2)));
            std::copy(dm, dm + nb * kNR, reinterpret_cast<float*>(out + p * ps + K * kNR));
        }
    }
}

// out [M, I] = silu(x gate^T) * (x up^T), gate the weight's first I rows and up the next I: per work item
// a panel of 32 gate rows and the same up rows, both into rows of 32 floats, then the activation as
// silu_mul_team computes it (the same bits), so that the [M, 2I] product is never written.
template <int FMT>
void int16_gated_panel_team(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t I, float* out,
                            int16_t* scratch) {
    Int16Panels panels(x, M, K, scratch);
    static thread_local Buffer gate_buffer, up_buffer;
    float* const gate = gate_buffer.get(size_t(panels.chunk_rows * kNR));
    float* const up = up_buffer.get(size_t(panels.chunk_rows * kNR));
    const __m256 one = _mm256_set1_ps(1.0f), neg = _mm256_set1_ps(-0.0f);
    const int64_t num_panels = (I + kNR - 1) / kNR;
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < panels.chunks * num_panels; ++item) {
        int64_t r0, r1, p;
        panels.item_at(item, num_panels, r0, r1, p);
        const int64_t n0 = p * kNR;
        const int cols = int(std::min<int64_t>(kNR, I - n0));
        panels.products<FMT>(w, n0, cols, r0, r1, nullptr, gate, kNR, gate, nullptr);
        panels.products<FMT>(w, I + n0, cols, r0, r1, nullptr, up, kNR, up, nullptr);
        for (int64_t m = r0; m < r1; ++m) {
            const float* g = gate + (m - r0) * kNR;
            const float* u = up + (m - r0) * kNR;
            float* o = out + m * I + n0;
            int j = 0;
            for (; j + 16 <= cols; j += 16) _mm512_storeu_ps(o + j, silu_mul(_mm512_loadu_ps(g + j), _mm512_loadu_ps(u + j)));
            for (; j + 8 <= cols; j += 8) {
                const __m256 gv = _mm256_loadu_ps(g + j);
                const __m256 e = avx2::exp_ps(_mm256_xor_ps(gv, neg));
                _mm256_storeu_ps(o + j, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + j)));
            }
            for (; j < cols; ++j) o[j] = g[j] / (1.0f + std::exp(-g[j])) * u[j];
        }
    }
}

template <int FMT>
void pack_int14(const uint8_t* w, int64_t N, int64_t K, uint8_t* out) {
    const size_t stride = row_bytes(FMT, K), ps = int14_panel_stride(K);
#pragma omp parallel
    {
        Buffer row_buffer;
        float* const row = row_buffer.get(size_t(K));
#pragma omp for schedule(dynamic, 8)
        for (int64_t p = 0; p < (N + kNR - 1) / kNR; ++p) pack_int14_panel<FMT>(w, stride, p * kNR, N, K, row, out + p * ps);
    }
}

}  // namespace

size_t int14_panel_bytes(int64_t N, int64_t K) { return size_t((N + kNR - 1) / kNR) * int14_panel_stride(K); }

bool int14_packs(int fmt) {
    const int base = fmt & ~kProductFlags;
    return base == kQ8_0 || base == kQ4_0 || base == kQ4_1 || base == kQ8_0F || base == kQ4_1F;
}

void int14_panel_pack(const uint8_t* w, int fmt, int64_t N, int64_t K, uint8_t* out) {
    switch (fmt & ~kProductFlags) {
        case kQ8_0: pack_int14<kQ8_0>(w, N, K, out); break;
        case kQ4_0: pack_int14<kQ4_0>(w, N, K, out); break;
        case kQ4_1: pack_int14<kQ4_1>(w, N, K, out); break;
        case kQ8_0F: pack_int14<kQ8_0F>(w, N, K, out); break;
        case kQ4_1F: pack_int14<kQ4_1F>(w, N, K, out); break;
    }
}

void int14_linear_team(const float* x, int64_t M, int64_t K, const uint8_t* packed, int64_t N, const float* bias,
                       float* y, int64_t ldy, int16_t* scratch) {
    Int16Panels panels(x, M, K, scratch, kInt14Levels, false);
    static thread_local Buffer kept_buffer;
    float* const kept = panels.sliced() ? kept_buffer.get(size_t(panels.chunk_rows * kNR)) : nullptr;
    const int64_t num_panels = (N + kNR - 1) / kNR;
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < panels.chunks * num_panels; ++item) {
        int64_t r0, r1, p;
        panels.item_at(item, num_panels, r0, r1, p);
        const int64_t n0 = p * kNR;
        panels.products_int14(packed + p * int14_panel_stride(K), int(std::min<int64_t>(kNR, N - n0)), r0, r1,
                              bias ? bias + n0 : nullptr, y + r0 * ldy + n0, ldy, kept);
    }
}

// The gated form (int16_gated_panel_team's) over a gate/up weight packed whole: with I a multiple of 32,
// the up rows' panels start at panel I / 32.
void int14_gated_linear_team(const float* x, int64_t M, int64_t K, const uint8_t* packed, int64_t I, float* out,
                             int16_t* scratch) {
    Int16Panels panels(x, M, K, scratch, kInt14Levels, false);
    static thread_local Buffer gate_buffer, up_buffer;
    float* const gate = gate_buffer.get(size_t(panels.chunk_rows * kNR));
    float* const up = up_buffer.get(size_t(panels.chunk_rows * kNR));
    const int64_t num_panels = I / kNR;
    const size_t ps = int14_panel_stride(K);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < panels.chunks * num_panels; ++item) {
        int64_t r0, r1, p;
        panels.item_at(item, num_panels, r0, r1, p);
        panels.products_int14(packed + p * ps, kNR, r0, r1, nullptr, gate, kNR, gate);
        panels.products_int14(packed + (num_panels + p) * ps, kNR, r0, r1, nullptr, up, kNR, up);
        for (int64_t m = r0; m < r1; ++m) {
            const float* g = gate + (m - r0) * kNR;
            const float* u = up + (m - r0) * kNR;
            float* o = out + m * I + p * kNR;
            for (int j = 0; j < kNR; j += 16) _mm512_storeu_ps(o + j, silu_mul(_mm512_loadu_ps(g + j), _mm512_loadu_ps(u + j)));
        }
    }
}

void panel_linear_team(const float* x, int64_t M, int64_t K, const uint8_t* w, int fmt, int64_t N, const float* bias,
                       float* y, int64_t ldy) {
    switch (fmt & ~kProductFlags) {
        case kF32: panel_team<kF32>(x, M, K, w, N, bias, y, ldy); break;
        case kBF16: panel_team<kBF16>(x, M, K, w, N, bias, y, ldy); break;
        case kF16: panel_team<kF16>(x, M, K, w, N, bias, y, ldy); break;
        case kQ8_0: panel_team<kQ8_0>(x, M, K, w, N, bias, y, ldy); break;
        case kQ4_0: panel_team<kQ4_0>(x, M, K, w, N, bias, y, ldy); break;
        case kQ4_1: panel_team<kQ4_1>(x, M, K, w, N, bias, y, ldy); break;
        case kQ8_0F: panel_team<kQ8_0F>(x, M, K, w, N, bias, y, ldy); break;
        case kQ4_1F: panel_team<kQ4_1F>(x, M, K, w, N, bias, y, ldy); break;
    }
}

bool int16_panels_take(int fmt) {
    const int base = fmt & ~kProductFlags;
    return (fmt & kInt16Panels) &&
           (base == kQ8_0 || base == kQ4_0 || base == kQ4_1 || base == kQ8_0F || base == kQ4_1F);
}

void int16_panel_linear_team(const float* x, int64_t M, int64_t K, const uint8_t* w, int fmt, int64_t N,
                             const float* bias, float* y, int64_t ldy, int16_t* scratch) {
    switch (fmt & ~kProductFlags) {
        case kQ8_0: int16_panel_team<kQ8_0>(x, M, K, w, N, bias, y, ldy, scratch); break;
        case kQ4_0: int16_panel_team<kQ4_0>(x, M, K, w, N, bias, y, ldy, scratch); break;
        case kQ4_1: int16_panel_team<kQ4_1>(x, M, K, w, N, bias, y, ldy, scratch); break;
        case kQ8_0F: int16_panel_team<kQ8_0F>(x, M, K, w, N, bias, y, ldy, scratch); break;
        case kQ4_1F: int16_panel_team<kQ4_1F>(x, M, K, w, N, bias, y, ldy, scratch); break;
    }
}

size_t int16_panel_bytes(int64_t N, int64_t K) { return size_t((N + kNR - 1) / kNR) * panel_stride(K); }

bool int16_panel_packs(int fmt) {
    const int base = fmt & ~kProductFlags;
    return base == kQ8_0 || base == kQ8_0F;
}

void int16_panel_pack(const uint8_t* w, int fmt, int64_t N, int64_t K, uint8_t* out) {
    switch (fmt & ~kProductFlags) {
        case kQ8_0: pack_panels<kQ8_0>(w, N, K, out); break;
        case kQ8_0F: pack_panels<kQ8_0F>(w, N, K, out); break;
    }
}

void int16_packed_linear_team(const float* x, int64_t M, int64_t K, const uint8_t* packed, int fmt, int64_t N,
                              const float* bias, float* y, int64_t ldy, int16_t* scratch) {
    switch (fmt & ~kProductFlags) {
        case kQ8_0: int16_panel_team<kQ8_0>(x, M, K, nullptr, N, bias, y, ldy, scratch, packed); break;
        case kQ8_0F: int16_panel_team<kQ8_0F>(x, M, K, nullptr, N, bias, y, ldy, scratch, packed); break;
    }
}

void int16_gated_panel_team(const float* x, int64_t M, int64_t K, const uint8_t* w, int fmt, int64_t I, float* out,
                            int16_t* scratch) {
    switch (fmt & ~kProductFlags) {
        case kQ8_0: int16_gated_panel_team<kQ8_0>(x, M, K, w, I, out, scratch); break;
        case kQ4_0: int16_gated_panel_team<kQ4_0>(x, M, K, w, I, out, scratch); break;
        case kQ4_1: int16_gated_panel_team<kQ4_1>(x, M, K, w, I, out, scratch); break;
        case kQ8_0F: int16_gated_panel_team<kQ8_0F>(x, M, K, w, I, out, scratch); break;
        case kQ4_1F: int16_gated_panel_team<kQ4_1F>(x, M, K, w, I, out, scratch); break;
    }
}

// ---- Decode-sized products (up to 8 rows) in integers, AVX-512 VNNI ----
//
// The AVX2 decode kernels' int16 arithmetic (x rounded per block of 32 to int16 codes with one scale,
// the same rounding; exact integer sums of code products, scaled per block by d * the row's scale in
// float), two blocks per 512-bit register: a pair of blocks' 4-bit codes (16 bytes each) split into
// low and high nibbles and widened to 32 int16 each, multiplied with x's codes by VPDPWSSD (32
// products into 16 int32 lanes per instruction; 8 lanes per block, as the AVX2 kernel's 8 partial
// sums), then converted and scaled per block. x is laid out per pair of blocks to match: codes 0..15
// of both blocks, then codes 16..31 of both.
namespace {

constexpr int kDecodeRows = 8;
constexpr int64_t kPrefetchAhead = 8;  // weight rows read ahead (kPrefetchRows in linear_avx2.cpp)

// x's rows as the kernel takes them: per row and pair of blocks 64 int16 codes and 16 float scales
// (the two blocks' scales, 8 lanes each), and per block the 8 rows' float sums (offset formats).
struct PairRows {
    const int16_t* codes;  // [M][pairs][64]
    const float* scales;   // [M][pairs][16]
    const float* sums;     // [2 * pairs][8]
    int64_t pairs;
};

struct DecodeBuffers {
    Buffer codes, scales, sums;
};

inline PairRows pair_rows(const float* x, int64_t M, int64_t K) {
    static thread_local DecodeBuffers buf;
    const int64_t nb = K / kBlock, pairs = (nb + 1) / 2;
    // int16 codes in float-sized buffers: sizes in floats
    int16_t* codes = reinterpret_cast<int16_t*>(buf.codes.get(size_t(M * pairs * 32)));
    float* scales = buf.scales.get(size_t(M * pairs * 16));
    float* sums = buf.sums.get(size_t(2 * pairs * kDecodeRows));
    std::fill(sums, sums + 2 * pairs * kDecodeRows, 0.0f);
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    for (int64_t r = 0; r < M; ++r)
        for (int64_t b = 0; b < 2 * pairs; ++b) {
            int16_t* out = codes + (r * pairs + b / 2) * 64 + (b % 2) * 16;  // codes 0..15; 16..31 are 32 further
            float* sc = scales + (r * pairs + b / 2) * 16 + (b % 2) * 8;
            if (b >= nb) {  // the odd block count's last pair: a zero block
                std::fill(out, out + 16, int16_t(0));
                std::fill(out + 32, out + 48, int16_t(0));
                std::fill(sc, sc + 8, 0.0f);
                continue;
            }
            const float* p = x + r * K + b * kBlock;
            __m256 v[4], m = _mm256_setzero_ps(), s = _mm256_setzero_ps();
            for (int i = 0; i < 4; ++i) {
                v[i] = _mm256_loadu_ps(p + 8 * i);
                m = _mm256_max_ps(m, _mm256_and_ps(v[i], abs_mask));
                s = _mm256_add_ps(s, v[i]);
            }
            sums[b * kDecodeRows + r] = avx2::hsum(s);
            const float max_abs = avx2::hmax(m);
            std::fill(sc, sc + 8, max_abs / 32767.0f);
            const __m256 inv = _mm256_set1_ps(max_abs > 0.0f ? 32767.0f / max_abs : 0.0f);
            for (int i = 0; i < 4; ++i) {
                const __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));  // round to nearest even
                const __m128i q = _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
                _mm_storeu_si128(reinterpret_cast<__m128i*>(out + (i / 2) * 32 + (i % 2) * 8), q);
            }
        }
    return {codes, scales, sums, pairs};
}

// A pair of blocks' codes as int16: lo = codes 0..15 of block b, then of block b + 1; hi = codes
// 16..31 likewise. d: the blocks' scales (8 lanes each); m: their offsets (0 without one). A block past
// the row's end (b + 1 == nb) is zero.
template <int FMT>
PLAIT_INLINE void pair_codes(const uint8_t* row, int64_t b, int64_t nb, __m512i& lo, __m512i& hi, __m512& d,
                             float& m0, float& m1) {
    float d0, d1 = 0.0f;
    m1 = 0.0f;
    const uint8_t* q0 = avx2::block_head<FMT>(row, b, d0, m0);
    const bool second = b + 1 < nb;
    const uint8_t* q1 = second ? avx2::block_head<FMT>(row, b + 1, d1, m1) : nullptr;
    d = _mm512_insertf32x8(_mm512_set1_ps(d0), _mm256_set1_ps(d1), 1);
    if constexpr (avx2::is_q8<FMT>()) {
        const __m128i a0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q0));
        const __m128i a1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q0 + 16));
        const __m128i b0 = second ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(q1)) : _mm_setzero_si128();
        const __m128i b1 = second ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(q1 + 16)) : _mm_setzero_si128();
        lo = _mm512_cvtepi8_epi16(_mm256_inserti128_si256(_mm256_castsi128_si256(a0), b0, 1));
        hi = _mm512_cvtepi8_epi16(_mm256_inserti128_si256(_mm256_castsi128_si256(a1), b1, 1));
    } else {
        const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q0));
        const __m128i c = second ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(q1)) : _mm_setzero_si128();
        const __m256i raw = _mm256_inserti128_si256(_mm256_castsi128_si256(a), c, 1);
        const __m256i mask = _mm256_set1_epi8(0x0F);
        lo = _mm512_cvtepu8_epi16(_mm256_and_si256(raw, mask));
        hi = _mm512_cvtepu8_epi16(_mm256_and_si256(_mm256_srli_epi16(raw, 4), mask));
    }
}

// out[r] = weight row . x[r] for R rows (int16 x codes).
template <int FMT, int R>
inline void dot_rows_int16(const uint8_t* row, const PairRows& xq, int64_t nb, float* out) {
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    __m256 offset = _mm256_setzero_ps();
    for (int64_t p = 0; p < xq.pairs; ++p) {
        __m512i lo, hi;
        __m512 d;
        float m0, m1;
        pair_codes<FMT>(row, 2 * p, nb, lo, hi, d, m0, m1);
        for (int r = 0; r < R; ++r) {
            const int16_t* xc = xq.codes + (r * xq.pairs + p) * 64;
            __m512i s = dpwssd(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xc));
            s = dpwssd(s, hi, _mm512_loadu_si512(xc + 32));
            const __m512 scale = _mm512_mul_ps(d, _mm512_loadu_ps(xq.scales + (r * xq.pairs + p) * 16));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[r]);
        }
        if constexpr (avx2::has_offset<FMT>()) {
            offset = _mm256_fmadd_ps(_mm256_set1_ps(m0), _mm256_loadu_ps(xq.sums + 2 * p * kDecodeRows), offset);
            offset = _mm256_fmadd_ps(_mm256_set1_ps(m1), _mm256_loadu_ps(xq.sums + (2 * p + 1) * kDecodeRows), offset);
        }
    }
    alignas(32) float off[kDecodeRows];
    _mm256_store_ps(off, offset);
    for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]) + off[r];
}

template <int FMT>
inline void dot_rows_any(const uint8_t* row, const PairRows& xq, int64_t M, int64_t nb, float* out) {
    switch (M) {
        case 1: dot_rows_int16<FMT, 1>(row, xq, nb, out); break;
        case 2: dot_rows_int16<FMT, 2>(row, xq, nb, out); break;
        case 3: dot_rows_int16<FMT, 3>(row, xq, nb, out); break;
        case 4: dot_rows_int16<FMT, 4>(row, xq, nb, out); break;
        case 5: dot_rows_int16<FMT, 5>(row, xq, nb, out); break;
        case 6: dot_rows_int16<FMT, 6>(row, xq, nb, out); break;
        case 7: dot_rows_int16<FMT, 7>(row, xq, nb, out); break;
        default: dot_rows_int16<FMT, 8>(row, xq, nb, out); break;
    }
}

// (into L2: prefetch_row of linear_avx2.cpp)
inline void prefetch_row(const uint8_t* row, size_t bytes) {
    const char* p = reinterpret_cast<const char*>(row);
    for (size_t off = 0; off < bytes; off += 64) _mm_prefetch(p + off, _MM_HINT_T1);
}

inline int64_t chunk_rows(int64_t N) {
    const int64_t threads = omp_get_num_threads();
    return std::max<int64_t>(8, std::min<int64_t>(256, N / (8 * threads)));
}

template <int FMT>
void decode_team(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, const float* bias, float* y,
                 int64_t ldy) {
    const size_t stride = row_bytes(FMT, K);
    const int64_t nb = K / kBlock;
    const PairRows xq = pair_rows(x, M, K);
#pragma omp for schedule(dynamic, chunk_rows(N))
    for (int64_t n = 0; n < N; ++n) {
        const uint8_t* row = w + n * stride;
        if (n + kPrefetchAhead < N) prefetch_row(row + kPrefetchAhead * stride, stride);
        float out[kDecodeRows];
        dot_rows_any<FMT>(row, xq, M, nb, out);
        const float b = bias ? bias[n] : 0.0f;
        for (int64_t r = 0; r < M; ++r) y[r * ldy + n] = out[r] + b;
    }
}

// out[r][n] = silu(gate row n . x[r]) * (up row n . x[r]); the gate rows are w's first I, the up rows the next I.
template <int FMT>
void decode_gated_team(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t I, float* out) {
    const size_t stride = row_bytes(FMT, K);
    const int64_t nb = K / kBlock;
    const PairRows xq = pair_rows(x, M, K);
#pragma omp for schedule(dynamic, chunk_rows(I))
    for (int64_t n = 0; n < I; ++n) {
        const uint8_t* gate_row = w + n * stride;
        const uint8_t* up_row = w + (I + n) * stride;
        if (n + kPrefetchAhead < I) {
            prefetch_row(gate_row + kPrefetchAhead * stride, stride);
            prefetch_row(up_row + kPrefetchAhead * stride, stride);
        }
        alignas(32) float g[kDecodeRows] = {}, u[kDecodeRows] = {}, a[kDecodeRows];
        dot_rows_any<FMT>(gate_row, xq, M, nb, g);
        dot_rows_any<FMT>(up_row, xq, M, nb, u);
        const __m256 gv = _mm256_load_ps(g);
        const __m256 e = avx2::exp_ps(_mm256_xor_ps(gv, _mm256_set1_ps(-0.0f)));
        _mm256_store_ps(a, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), _mm256_load_ps(u)));
        for (int64_t r = 0; r < M; ++r) out[r * I + n] = a[r];
    }
}

}  // namespace

bool decode_takes(int fmt) {
    const int base = fmt & ~kProductFlags;
    return (fmt & kInt16Dot) && (base == kQ8_0 || base == kQ4_0 || base == kQ4_1 || base == kQ8_0F || base == kQ4_1F);
}

void decode_linear_team(const float* x, int64_t M, int64_t K, const uint8_t* w, int fmt, int64_t N, const float* bias,
                        float* y, int64_t ldy) {
    switch (fmt & ~kProductFlags) {
        case kQ8_0: decode_team<kQ8_0>(x, M, K, w, N, bias, y, ldy); break;
        case kQ4_0: decode_team<kQ4_0>(x, M, K, w, N, bias, y, ldy); break;
        case kQ4_1: decode_team<kQ4_1>(x, M, K, w, N, bias, y, ldy); break;
        case kQ8_0F: decode_team<kQ8_0F>(x, M, K, w, N, bias, y, ldy); break;
        case kQ4_1F: decode_team<kQ4_1F>(x, M, K, w, N, bias, y, ldy); break;
    }
}

void decode_gated_linear_team(const float* x, int64_t M, int64_t K, const uint8_t* w, int fmt, int64_t I, float* out) {
    switch (fmt & ~kProductFlags) {
        case kQ8_0: decode_gated_team<kQ8_0>(x, M, K, w, I, out); break;
        case kQ4_0: decode_gated_team<kQ4_0>(x, M, K, w, I, out); break;
        case kQ4_1: decode_gated_team<kQ4_1>(x, M, K, w, I, out); break;
        case kQ8_0F: decode_gated_team<kQ8_0F>(x, M, K, w, I, out); break;
        case kQ4_1F: decode_gated_team<kQ4_1F>(x, M, K, w, I, out); break;
    }
}


// ---- Decode-sized products on 4-bit weights laid out once in panels ----
//
// The decode kernels above take one weight row at a time across its inputs (lanes = inputs), so every
// row of x pays, per two blocks, a scale multiply, a conversion, an FMA and a lane sum at the end: for
// 8 rows about three float operations per two VPDPWSSD, four times the products' own time on a 2-core
// Zen 4 (gate/up, 8 rows: 0.21 ms with the weights in cache, ~0.06 of VPDPWSSD). Here the lanes are
// output columns, as in the panels: the 4-bit codes of 16 columns are laid out once at load
// (q4_panel_pack, as many bytes as the stored rows with float constants) so that one 512-bit load and
// a shift and a mask give a pair of inputs for all 16 columns, shared by every row of x; each row's
// pair of x codes is a broadcast operand of its VPDPWSSD. The block's scaling (d times x's block scale,
// and m times x's block sum) is then a few vector operations per 16 VPDPWSSD for each row.
//
// x is rounded exactly as the decode kernels round it (int16 codes per block of 32, quantize_row), and
// the integer block sums are exact, so the products differ from theirs only in the order of float sums.
namespace {

constexpr int kQ4Cols = 16;                                                  // columns per panel
constexpr int64_t kQ4BlockBytes = 4 * 64 + 2 * kQ4Cols * int64_t(sizeof(float));  // codes, d, m

// Panels read ahead by the first pass over a panel (measured: one on gave 0.87-0.92 of the time at 4 and 8
// rows from memory, two the same, four 0.95), into L2 rather than L1: a decode step at batch 1, 0.86-0.88
// of the time with L1 hints for these, the decode rows' and the 8-bit panels' (2-core Zen 4; batches of
// 8 and 32 the same; three panels on, 1.14).
constexpr int64_t kQ4Ahead = 1;
inline size_t q4_panel_stride(int64_t K);

// Per row and block: r0 .. r0 + MR of x's codes (row stride K), their block scales and sums (stride nb).
template <int MR>
PLAIT_INLINE void q4_panel_sums(const int16_t* xc, const float* xs, const float* xsum, int64_t K, int64_t nb,
                                const uint8_t* panel, int64_t ahead, __m512 (&c)[MR]) {
    const __m512i mask = _mm512_set1_epi32(0x000F000F);
    for (int i = 0; i < MR; ++i) c[i] = _mm512_setzero_ps();
    const int64_t half_k = K / 2;
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = panel + b * kQ4BlockBytes;
        if (ahead)
            for (int line = 0; line < kQ4BlockBytes / 64; ++line)
                _mm_prefetch(reinterpret_cast<const char*>(blk) + ahead + 64 * line, _MM_HINT_T1);
        const int32_t* xp = reinterpret_cast<const pair32*>(xc) + b * (kBlock / 2);
        __m512i s[MR];
        for (int i = 0; i < MR; ++i) s[i] = _mm512_setzero_si512();
        for (int g = 0; g < 4; ++g) {
            const __m512i v = _mm512_load_si512(blk + 64 * g);
            for (int sh = 0; sh < 4; ++sh) {
                const __m512i wv = _mm512_and_si512(sh == 0 ? v : _mm512_srli_epi32(v, 4 * sh), mask);
                const int p = 4 * g + sh;  // the pair of inputs 2p, 2p + 1 of the block
                for (int i = 0; i < MR; ++i) s[i] = dpwssd_broadcast(s[i], wv, xp + i * half_k + p);
            }
        }
        const __m512 d = _mm512_load_ps(reinterpret_cast<const float*>(blk + 256));
        const __m512 m = _mm512_load_ps(reinterpret_cast<const float*>(blk + 256 + 64));
        for (int i = 0; i < MR; ++i) {
            c[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[i]), _mm512_mul_ps(d, _mm512_set1_ps(xs[i * nb + b])), c[i]);
            c[i] = _mm512_fmadd_ps(m, _mm512_set1_ps(xsum[i * nb + b]), c[i]);
        }
    }
}

template <int MR>
PLAIT_INLINE void q4_panel_store(const __m512 (&c)[MR], const float* bias, float* y, int64_t ldy, __mmask16 live) {
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(live, bias) : _mm512_setzero_ps();
    for (int i = 0; i < MR; ++i) _mm512_mask_storeu_ps(y + i * ldy, live, _mm512_add_ps(c[i], bv));
}

// x's rows as the panels take them, in a buffer of the calling thread: every thread rounds the few rows
// itself (as the decode kernels do), so that no barrier separates the rounding from the products.
struct Q4Rows {
    const int16_t* codes;
    const float *scales, *sums;
};

inline Q4Rows q4_rows(const float* x, int64_t M, int64_t K) {
    static thread_local Buffer codes_buffer, const_buffer;
    const int64_t nb = K / kBlock;
    int16_t* codes = reinterpret_cast<int16_t*>(codes_buffer.get(size_t(M * K + 1) / 2));
    float* scales = const_buffer.get(size_t(2 * M * nb));
    for (int64_t r = 0; r < M; ++r) quantize_row(x + r * K, K, codes + r * K, scales + r * nb, scales + (M + r) * nb);
    return {codes, scales, scales + M * nb};
}

// f(std::integral_constant<int, R>) for R = rows, 1 <= rows <= kDecodeRows: the row count as a constant.
template <typename F, int... Rs>
PLAIT_INLINE void dispatch_rows(int64_t rows, F& f, std::integer_sequence<int, Rs...>) {
    ((rows == Rs + 1 ? (f(std::integral_constant<int, Rs + 1>{}), 0) : 0), ...);
}
template <typename F>
PLAIT_INLINE void with_rows(int64_t rows, F&& f) {
    dispatch_rows(rows, f, std::make_integer_sequence<int, kDecodeRows>{});
}

// Rows r0 .. r0 + rows (rows <= 8) of x times one panel: 16 columns of y's rows 0 .. rows.
inline void q4_panel_rows(const Q4Rows& xq, int64_t r0, int64_t rows, int64_t K, const uint8_t* panel,
                          const float* bias, float* y, int64_t ldy, __mmask16 live) {
    const int64_t nb = K / kBlock;
    const int64_t ahead = r0 == 0 ? kQ4Ahead * int64_t(q4_panel_stride(K)) : 0;  // the next panels into L2
    with_rows(rows, [&](auto mr) {
        __m512 c[mr];
        q4_panel_sums<mr>(xq.codes + r0 * K, xq.scales + r0 * nb, xq.sums + r0 * nb, K, nb, panel, ahead, c);
        q4_panel_store<mr>(c, bias, y, ldy, live);
    });
}

inline size_t q4_panel_stride(int64_t K) { return size_t(K / kBlock * kQ4BlockBytes); }

// The same for the 8-bit panels (49,152 x 576, 4 and 8 rows: 0.87-0.90 of the time with two on).
constexpr int64_t kQ8Ahead = 2;

// The same products on an 8-bit weight's int16 panels as int16_panel_pack lays them out (per 32 columns
// and pair of inputs 32 x 2 codes, then the blocks' d): half `half` of a panel's columns, whose pair of
// inputs widens to a VPDPWSSD operand in one instruction.
template <int MR>
PLAIT_INLINE void q8_panel_sums(const int16_t* xc, const float* xs, int64_t K, int64_t nb, const uint8_t* panel,
                                int half, int64_t ahead, __m512 (&c)[MR]) {
    for (int i = 0; i < MR; ++i) c[i] = _mm512_setzero_ps();
    const int64_t half_k = K / 2;
    const uint8_t* codes = panel + 32 * half;
    const float* d_p = reinterpret_cast<const float*>(panel + K * kNR) + 16 * half;
    for (int64_t b = 0; b < nb; ++b) {
        const int32_t* xp = reinterpret_cast<const pair32*>(xc) + b * (kBlock / 2);
        __m512i s[MR];
        for (int i = 0; i < MR; ++i) s[i] = _mm512_setzero_si512();
        for (int p = 0; p < kBlock / 2; ++p) {
            if (ahead) _mm_prefetch(reinterpret_cast<const char*>(panel) + (b * (kBlock / 2) + p) * 2 * kNR + ahead, _MM_HINT_T1);
            const __m512i wv = _mm512_cvtepi8_epi16(
                _mm256_load_si256(reinterpret_cast<const __m256i*>(codes + (b * (kBlock / 2) + p) * 2 * kNR)));
            for (int i = 0; i < MR; ++i) s[i] = dpwssd_broadcast(s[i], wv, xp + i * half_k + p);
        }
        const __m512 d = _mm512_load_ps(d_p + b * kNR);
        for (int i = 0; i < MR; ++i)
            c[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[i]), _mm512_mul_ps(d, _mm512_set1_ps(xs[i * nb + b])), c[i]);
    }
}

// Rows r0 .. r0 + rows (rows <= 8) of x times half `half` of an 8-bit weight's int16 panel.
inline void q8_panel_rows(const Q4Rows& xq, int64_t r0, int64_t rows, int64_t K, const uint8_t* panel, int half,
                          const float* bias, float* y, int64_t ldy, __mmask16 live) {
    const int64_t nb = K / kBlock;
    // the first pass over the panel reads the panel kQ8Ahead on into L2 (its blocks' d ride along: they are
    // a sixteenth of the codes' lines)
    const int64_t ahead = half == 0 && r0 == 0 ? kQ8Ahead * int64_t(panel_stride(K)) : 0;
    with_rows(rows, [&](auto mr) {
        __m512 c[mr];
        q8_panel_sums<mr>(xq.codes + r0 * K, xq.scales + r0 * nb, K, nb, panel, half, ahead, c);
        q4_panel_store<mr>(c, bias, y, ldy, live);
    });
}

// The smallest work item in panels: at least 4 a thread, fewer panels the more rows each panel takes
// (its time grows with the rows), at most 16. The loops hand them out `guided`: the first items are
// large (half the panels, then a quarter, ...) and only the last ones this small. A thread's next panel
// is then mostly the one after its current one, which the first pass over a panel asked for (kQ4Ahead);
// with items of this size from the start, every item began on a panel nobody had asked for, or that
// the other core had brought into its own L2 (a decode step on a 2-core Zen 4, `one_batch`-style,
// alternated 7 times, three times: batch 1 0.86-0.90 of the time, batch 8 0.92-0.95, batch 32 0.94-0.98).
inline int64_t q4_chunk(int64_t panels, int64_t M) {
    const int64_t split = 4 * omp_get_num_threads() * ((M + kDecodeRows - 1) / kDecodeRows);
    return std::max<int64_t>(1, std::min<int64_t>(16, panels / split));
}

// The lanes of 16 columns from n0 that are below N.
inline __mmask16 live_columns(int64_t n0, int64_t N) {
    return N - n0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (N - n0)) - 1);
}

template <int FMT>
void pack_q4_panels(const uint8_t* w, int64_t N, int64_t K, uint8_t* out) {
    const size_t stride = row_bytes(FMT, K), ps = q4_panel_stride(K);
    const int64_t nb = K / kBlock;
#pragma omp parallel for schedule(dynamic, 8)
    for (int64_t p = 0; p < (N + kQ4Cols - 1) / kQ4Cols; ++p) {
        for (int64_t b = 0; b < nb; ++b) {
            uint8_t* blk = out + p * ps + b * kQ4BlockBytes;
            uint32_t* words = reinterpret_cast<uint32_t*>(blk);
            float* d = reinterpret_cast<float*>(blk + 256);
            float* m = d + kQ4Cols;
            for (int j = 0; j < kQ4Cols; ++j) {
                const int64_t n = p * kQ4Cols + j;
                if (n >= N) {
                    for (int g = 0; g < 4; ++g) words[g * kQ4Cols + j] = 0;
                    d[j] = m[j] = 0.0f;
                    continue;
                }
                const uint8_t* q = avx2::block_head<FMT>(w + n * stride, b, d[j], m[j]);
                auto code = [&](int k) { return uint32_t(k < 16 ? q[k] & 0x0F : q[k - 16] >> 4); };
                for (int g = 0; g < 4; ++g) {
                    uint32_t word = 0;
                    for (int sh = 0; sh < 4; ++sh) {
                        const int k = 2 * (4 * g + sh);
                        word |= code(k) << (4 * sh) | code(k + 1) << (16 + 4 * sh);
                    }
                    words[g * kQ4Cols + j] = word;
                }
            }
        }
    }
}

}  // namespace

bool q4_panel_packs(int fmt) {
    const int base = fmt & ~kProductFlags;
    return base == kQ4_0 || base == kQ4_1 || base == kQ4_1F;
}

size_t q4_panel_bytes(int64_t N, int64_t K) { return size_t((N + kQ4Cols - 1) / kQ4Cols) * q4_panel_stride(K); }

void q4_panel_pack(const uint8_t* w, int fmt, int64_t N, int64_t K, uint8_t* out) {
    switch (fmt & ~kProductFlags) {
        case kQ4_0: pack_q4_panels<kQ4_0>(w, N, K, out); break;
        case kQ4_1: pack_q4_panels<kQ4_1>(w, N, K, out); break;
        case kQ4_1F: pack_q4_panels<kQ4_1F>(w, N, K, out); break;
    }
}

void q4_panel_linear_team(const float* x, int64_t M, int64_t K, const uint8_t* packed, int64_t N, const float* bias,
                          float* y, int64_t ldy) {
    const Q4Rows xq = q4_rows(x, M, K);
    const int64_t panels = (N + kQ4Cols - 1) / kQ4Cols;
    const size_t ps = q4_panel_stride(K);
#pragma omp for schedule(guided, q4_chunk(panels, M))
    for (int64_t p = 0; p < panels; ++p) {
        const int64_t n0 = p * kQ4Cols;
        for (int64_t r0 = 0; r0 < M; r0 += kDecodeRows)
            q4_panel_rows(xq, r0, std::min<int64_t>(kDecodeRows, M - r0), K, packed + p * ps,
                          bias ? bias + n0 : nullptr, y + r0 * ldy + n0, ldy, live_columns(n0, N));
    }
}

void q8_panel_linear_team(const float* x, int64_t M, int64_t K, const uint8_t* packed, int64_t N, const float* bias,
                          float* y, int64_t ldy) {
    const Q4Rows xq = q4_rows(x, M, K);
    const int64_t panels = (N + kNR - 1) / kNR;
    const size_t ps = panel_stride(K);
#pragma omp for schedule(guided, q4_chunk(panels, M))
    for (int64_t p = 0; p < panels; ++p)
        for (int half = 0; half < 2; ++half) {
            const int64_t n0 = p * kNR + 16 * half;
            if (n0 >= N) break;
            for (int64_t r0 = 0; r0 < M; r0 += kDecodeRows)
                q8_panel_rows(xq, r0, std::min<int64_t>(kDecodeRows, M - r0), K, packed + p * ps, half,
                              bias ? bias + n0 : nullptr, y + r0 * ldy + n0, ldy, live_columns(n0, N));
        }
}

void q4_panel_gated_linear_team(const float* x, int64_t M, int64_t K, const uint8_t* packed, int64_t I, float* out) {
    const Q4Rows xq = q4_rows(x, M, K);
    const int64_t panels = I / kQ4Cols;
    const size_t ps = q4_panel_stride(K);
#pragma omp for schedule(guided, q4_chunk(panels, M))
    for (int64_t p = 0; p < panels; ++p) {
        alignas(64) float gate[kDecodeRows * kQ4Cols], up[kDecodeRows * kQ4Cols];
        for (int64_t r0 = 0; r0 < M; r0 += kDecodeRows) {
            const int64_t rows = std::min<int64_t>(kDecodeRows, M - r0);
            q4_panel_rows(xq, r0, rows, K, packed + p * ps, nullptr, gate, kQ4Cols, 0xFFFF);
            q4_panel_rows(xq, r0, rows, K, packed + (panels + p) * ps, nullptr, up, kQ4Cols, 0xFFFF);
            for (int64_t r = 0; r < rows; ++r)
                _mm512_storeu_ps(out + (r0 + r) * I + p * kQ4Cols,
                                 silu_mul(_mm512_load_ps(gate + r * kQ4Cols), _mm512_load_ps(up + r * kQ4Cols)));
        }
    }
}

}  // namespace plait::avx512
