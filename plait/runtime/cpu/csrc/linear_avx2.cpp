// Products with weights in their stored format (GGUF blocks or 16-bit floats), float32 math.
//
// Few rows (decode): each weight block is decoded once into registers and multiplied with every
// row of x, so the step reads the weights once, in their compact form. That is what bounds a decode
// step on a CPU: a 4-bit weight is an eighth of the bytes of a float32 one. With a block format the
// products can also run in integers (kInt16Dot, kInt8Dot): x is rounded per block of 32 values and
// the codes multiply exactly, which skips the costliest part of the float path, converting every
// code to float (measured on a Zen 1 core: 15 cycles a block in float, 8 with int16 x, 6.5 int8).
// Many rows (prefill): a panel of weight rows is decoded into float32 in cache, then multiplied with
// x by a register-blocked kernel (3 x 4 outputs, each an 8-wide running sum along K).
#include <omp.h>

#include <algorithm>
#include <vector>

#include "team.h"

#pragma GCC target("avx2,fma,f16c")

#include "simd_avx2.h"

namespace plait::avx2 {
namespace {

constexpr int kGemvRows = 8;  // rows of x handled together by the decode kernel
constexpr int64_t kPrefetchRows = 8;  // weight rows read ahead by the decode kernel
// Up to this many rows the decode kernel runs (in passes of kGemvRows); above it, the panel kernel
// (measured on the default model's shapes: equal at 8 rows, the panel 25% faster at 16).
constexpr int64_t kGemvMaxRows = 8;
constexpr int kPanelRows = 24;  // weight rows decoded into one panel (multiple of kNR)
constexpr int kMR = 3, kNR = 4;  // panel kernel's block of outputs

// Sums of x over each block of 32 inputs, for the formats with an offset (sum_k x_k (q d + m)), laid
// out [M / 8 groups][K / 32 blocks][8 rows] so that one vector holds a block's sums for the 8 rows a
// decode pass handles (rows past M are 0).
void block_sums(const float* x, int64_t M, int64_t K, float* sums) {
    const int64_t nb = K / kBlock;
    for (int64_t r = 0; r < (M + kGemvRows - 1) / kGemvRows * kGemvRows; ++r)
        for (int64_t b = 0; b < nb; ++b) {
            float total = 0.0f;
            if (r < M) {
                const float* p = x + r * K + b * kBlock;
                __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)),
                                         _mm256_add_ps(_mm256_loadu_ps(p + 16), _mm256_loadu_ps(p + 24)));
                total = hsum(s);
            }
            sums[(r / kGemvRows * nb + b) * kGemvRows + r % kGemvRows] = total;
        }
}

// out[r] = row . x[r] for R rows of x (R <= kGemvRows); `sums`: the rows' group of block sums.
template <int FMT, int R>
inline void dot_rows(const uint8_t* row, const float* x, int64_t K, const float* sums, float* out) {
    const int64_t nb = K / kBlock;
    __m256 acc[R];
    __m256 offset = _mm256_setzero_ps();  // lane r: row r's sum of m_b * (block b's sum of x)
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        __m256 v[4];
        float d = 1.0f, m = 0.0f;
        load_block<FMT>(row, b, v, d, m);
        const __m256 dv = _mm256_set1_ps(d);
        for (int r = 0; r < R; ++r) {
            const float* xp = x + r * K + b * kBlock;
            __m256 t = _mm256_mul_ps(v[0], _mm256_loadu_ps(xp));
            t = _mm256_fmadd_ps(v[1], _mm256_loadu_ps(xp + 8), t);
            t = _mm256_fmadd_ps(v[2], _mm256_loadu_ps(xp + 16), t);
            t = _mm256_fmadd_ps(v[3], _mm256_loadu_ps(xp + 24), t);
            if constexpr (is_block_format<FMT>()) {
                acc[r] = _mm256_fmadd_ps(t, dv, acc[r]);
            } else {
                acc[r] = _mm256_add_ps(acc[r], t);
            }
        }
        if constexpr (has_offset<FMT>())
            offset = _mm256_fmadd_ps(_mm256_set1_ps(m), _mm256_loadu_ps(sums + b * kGemvRows), offset);
    }
    alignas(32) float off[kGemvRows];
    _mm256_store_ps(off, offset);
    for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]) + off[r];
}

// Each thread computes the block sums of x for itself (a few hundred adds): no barrier to share them.
inline const float* private_block_sums(const float* x, int64_t M, int64_t K) {
    static thread_local std::vector<float> sums;
    sums.resize(size_t((M + kGemvRows - 1) / kGemvRows * kGemvRows * (K / kBlock)));
    block_sums(x, M, K, sums.data());
    return sums.data();
}

// ---- Integer products for decode (kInt8Dot, kInt16Dot) ----

// x rounded to integers per block of 32 values: codes [M][K] and one scale per block [M][K / 32]
// (value = code * scale, scale = max|x| / LEVELS of the block; LEVELS 127 for int8, 32767 for int16).
template <typename T>
struct IntRows {
    const T* codes;
    const float* scales;
};
using QuantizedRows = IntRows<int8_t>;
using Int16Rows = IntRows<int16_t>;

// int8 codes are stored in value order; int16 codes per block in the order the weight codes widen to
// 16 bits (block_codes16): x[0..7], x[16..23], x[8..15], x[24..31].
template <typename T>
inline IntRows<T> private_int_rows(const float* x, int64_t M, int64_t K) {
    constexpr float kLevels = sizeof(T) == 1 ? 127.0f : 32767.0f;
    static thread_local std::vector<T> codes;
    static thread_local std::vector<float> scales;
    const int64_t nb = K / kBlock;
    codes.resize(size_t(M * K));
    scales.resize(size_t(M * nb));
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    for (int64_t r = 0; r < M; ++r)
        for (int64_t b = 0; b < nb; ++b) {
            const float* p = x + r * K + b * kBlock;
            __m256 v[4], m = _mm256_setzero_ps();
            for (int i = 0; i < 4; ++i) {
                v[i] = _mm256_loadu_ps(p + 8 * i);
                m = _mm256_max_ps(m, _mm256_and_ps(v[i], abs_mask));
            }
            const float max_abs = hmax(m);
            scales[size_t(r * nb + b)] = max_abs / kLevels;
            const __m256 inv = _mm256_set1_ps(max_abs > 0.0f ? kLevels / max_abs : 0.0f);
            __m128i q[4];  // 8 codes each, as int16
            for (int i = 0; i < 4; ++i) {
                const __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));  // round to nearest even
                q[i] = _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
            }
            T* out = codes.data() + r * K + b * kBlock;
            if constexpr (sizeof(T) == 1) {
                for (int i = 0; i < 4; ++i)
                    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + 8 * i), _mm_packs_epi16(q[i], q[i]));
            } else {
                for (int i = 0; i < 4; ++i)  // blocks of 8: 0, 2, 1, 3
                    _mm_storeu_si128(reinterpret_cast<__m128i*>(out) + i, q[(i & 1) * 2 + (i >> 1)]);
            }
        }
    return {codes.data(), scales.data()};
}

// The 32 codes of a 4-bit block as unsigned bytes, in value order (low nibbles first).
static PLAIT_INLINE __m256i q4_codes(const uint8_t* qs) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
    const __m128i mask = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), mask), _mm_and_si128(raw, mask));
}

// Block b's scale d, offset m (w = d * code + m; m = 0 for Q8_0) and 32 codes as bytes, in value
// order: signed for Q8_0, unsigned 0..15 for the 4-bit formats.
template <int FMT>
static PLAIT_INLINE __m256i block_code_bytes(const uint8_t* row, int64_t b, float& d, float& m) {
    const uint8_t* codes = block_head<FMT>(row, b, d, m);
    if constexpr (is_q8<FMT>()) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes));
    else return q4_codes(codes);
}

// The same codes as 16-bit integers: `lo` holds the codes of values 0..7 and 16..23, `hi` those of
// 8..15 and 24..31 (the order of Int16Rows).
template <int FMT>
static PLAIT_INLINE void block_codes16(const uint8_t* row, int64_t b, __m256i& lo, __m256i& hi, float& d, float& m) {
    const __m256i w = block_code_bytes<FMT>(row, b, d, m);
    // the upper bytes once widened: the sign for Q8_0, zero for the unsigned 4-bit codes
    const __m256i ext = is_q8<FMT>() ? _mm256_cmpgt_epi8(_mm256_setzero_si256(), w) : _mm256_setzero_si256();
    lo = _mm256_unpacklo_epi8(w, ext);
    hi = _mm256_unpackhi_epi8(w, ext);
}

// The exact integer sum of a block's 32 code products with int8 x (8 partial sums): maddubs multiplies
// unsigned bytes by signed ones, so signed weights lend their sign to x.
template <int FMT>
static PLAIT_INLINE __m256i block_dot8(__m256i w, const int8_t* xp) {
    __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp));
    if constexpr (is_q8<FMT>()) {
        xv = _mm256_sign_epi8(xv, w);
        w = _mm256_sign_epi8(w, w);
    }
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w, xv), _mm256_set1_epi16(1));
}

// The exact integer sum of a block's 32 code products (8 partial sums).
static PLAIT_INLINE __m256i block_dot16(__m256i lo, __m256i hi, const int16_t* xp) {
    return _mm256_add_epi32(_mm256_madd_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp))),
                            _mm256_madd_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + 16))));
}

// The exact integer sum of the 32 products of block b's codes with x's codes `xp` (8 partial sums).
template <int FMT, typename T>
static PLAIT_INLINE __m256i block_int_dot(const uint8_t* row, int64_t b, const T* xp, float& d, float& m) {
    if constexpr (sizeof(T) == 2) {
        __m256i lo, hi;
        block_codes16<FMT>(row, b, lo, hi, d, m);
        return block_dot16(lo, hi, xp);
    } else {
        return block_dot8<FMT>(block_code_bytes<FMT>(row, b, d, m), xp);
    }
}

// As dot_rows, with x as integer codes (int8 or int16): per block and row, the 32 code products are
// summed exactly in integers, then scaled by d * the row's block scale. The offset term (m * sum of
// x) keeps the float sums of x.
template <int FMT, typename T, int R>
inline void dot_rows_int(const uint8_t* row, IntRows<T> xq, int64_t K, const float* sums, float* out) {
    static_assert(is_block_format<FMT>());
    const int64_t nb = K / kBlock;
    __m256 acc[R];
    __m256 offset = _mm256_setzero_ps();
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        float d, m;
        if constexpr (sizeof(T) == 2) {  // widen the codes once for all rows
            __m256i lo, hi;
            block_codes16<FMT>(row, b, lo, hi, d, m);
            for (int r = 0; r < R; ++r) {
                const __m256i s = block_dot16(lo, hi, xq.codes + r * K + b * kBlock);
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(d * xq.scales[r * nb + b]), acc[r]);
            }
        } else {
            const __m256i w = block_code_bytes<FMT>(row, b, d, m);
            for (int r = 0; r < R; ++r) {
                const __m256i s = block_dot8<FMT>(w, xq.codes + r * K + b * kBlock);
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(d * xq.scales[r * nb + b]), acc[r]);
            }
        }
        if constexpr (has_offset<FMT>())
            offset = _mm256_fmadd_ps(_mm256_set1_ps(m), _mm256_loadu_ps(sums + b * kGemvRows), offset);
    }
    alignas(32) float off[kGemvRows];
    _mm256_store_ps(off, offset);
    for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]) + off[r];
}

// One row of x (batch-1 decode): dot_rows_int for R = 1 with the same arithmetic (so a request's
// logits do not depend on its batch), the offset kept in a scalar.
template <int FMT, typename T>
inline float dot_row_int(const uint8_t* row, IntRows<T> xq, int64_t K, const float* sums) {
    const int64_t nb = K / kBlock;
    __m256 acc = _mm256_setzero_ps();
    float offset = 0.0f;
    for (int64_t b = 0; b < nb; ++b) {
        float d, m;
        const __m256i s = block_int_dot<FMT>(row, b, xq.codes + b * kBlock, d, m);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(d * xq.scales[b]), acc);
        if constexpr (has_offset<FMT>()) offset = std::fma(m, sums[b * kGemvRows], offset);
    }
    return hsum(acc) + offset;
}

// Rows of weight (outputs) per chunk of work: small enough that a thread slowed by another process
// leaves the rest to the others (dynamic schedule), large enough that taking a chunk costs nothing.
inline int64_t chunk_rows(int64_t N) {
    const int64_t threads = omp_get_num_threads();
    return std::max<int64_t>(8, std::min<int64_t>(256, N / (8 * threads)));
}

// dot_rows_int for any count of rows up to kGemvRows.
template <int FMT, typename T>
inline void dot_rows_int_any(const uint8_t* row, IntRows<T> xq, int64_t M, int64_t K, const float* sums, float* out) {
    switch (M) {
        case 1: out[0] = dot_row_int<FMT>(row, xq, K, sums); return;
        case 2: dot_rows_int<FMT, T, 2>(row, xq, K, sums, out); return;
        case 3: dot_rows_int<FMT, T, 3>(row, xq, K, sums, out); return;
        case 4: dot_rows_int<FMT, T, 4>(row, xq, K, sums, out); return;
        case 5: dot_rows_int<FMT, T, 5>(row, xq, K, sums, out); return;
        case 6: dot_rows_int<FMT, T, 6>(row, xq, K, sums, out); return;
        case 7: dot_rows_int<FMT, T, 7>(row, xq, K, sums, out); return;
        default: dot_rows_int<FMT, T, 8>(row, xq, K, sums, out); return;
    }
}

// x as the decode kernels take it: float rows, and for the integer products their codes.
struct DecodeX {
    const float* x;
    const float* sums;  // block sums of x (formats with an offset)
    QuantizedRows q8;   // codes not null: products with x rounded to int8
    Int16Rows q16;      // codes not null: products with x rounded to int16
};

// `dot`: the format code's kInt8Dot / kInt16Dot bits (block formats only; others compute in float).
template <int FMT>
inline DecodeX decode_x(const float* x, int64_t M, int64_t K, int dot) {
    DecodeX dx{x, has_offset<FMT>() ? private_block_sums(x, M, K) : nullptr, {nullptr, nullptr}, {nullptr, nullptr}};
    if constexpr (is_block_format<FMT>()) {
        if (dot & kInt8Dot) {
            dx.q8 = private_int_rows<int8_t>(x, M, K);
        } else if (dot & kInt16Dot) {
            dx.q16 = private_int_rows<int16_t>(x, M, K);
        }
    }
    return dx;
}

// rows <= kGemvRows of x against weight row `row`: out[r].
template <int FMT>
inline void dot_all_rows(const uint8_t* row, const DecodeX& dx, int64_t M, int64_t K, float* out) {
    const float* x = dx.x;
    const float* sums = dx.sums;
    if constexpr (is_block_format<FMT>()) {
        if (dx.q16.codes != nullptr) {
            dot_rows_int_any<FMT>(row, dx.q16, M, K, sums, out);
            return;
        }
        if (dx.q8.codes != nullptr) {
            dot_rows_int_any<FMT>(row, dx.q8, M, K, sums, out);
            return;
        }
    }
    switch (M) {
        case 1: dot_rows<FMT, 1>(row, x, K, sums, out); break;
        case 2: dot_rows<FMT, 2>(row, x, K, sums, out); break;
        case 3: dot_rows<FMT, 3>(row, x, K, sums, out); break;
        case 4: dot_rows<FMT, 4>(row, x, K, sums, out); break;
        case 5: dot_rows<FMT, 5>(row, x, K, sums, out); break;
        case 6: dot_rows<FMT, 6>(row, x, K, sums, out); break;
        case 7: dot_rows<FMT, 7>(row, x, K, sums, out); break;
        default: dot_rows<FMT, 8>(row, x, K, sums, out); break;
    }
}

// One row of x in integers: the product with weight row `row` (dx holds int16 or int8 codes).
template <int FMT>
PLAIT_INLINE float dot_row_codes(const uint8_t* row, const DecodeX& dx, int64_t K) {
    if constexpr (is_block_format<FMT>()) {
        return dx.q16.codes != nullptr ? dot_row_int<FMT>(row, dx.q16, K, dx.sums)
                                       : dot_row_int<FMT>(row, dx.q8, K, dx.sums);
    }
    return 0.0f;
}

// The decode work per byte keeps too few loads in flight for the hardware prefetcher to keep up with
// memory (measured: 1 GB/s from DRAM against 8 for a plain sum); the decode loops ask for the rows a
// few ahead explicitly, into L2 (as the attention's LinesAhead does: more misses in flight than L1's).
inline void prefetch_row(const uint8_t* row, size_t bytes) {
    const char* p = reinterpret_cast<const char*>(row);
    for (size_t off = 0; off < bytes; off += 64) _mm_prefetch(p + off, _MM_HINT_T1);
}

template <int FMT>
void gemv_team(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, const float* bias, float* y,
               int64_t ldy, int dot) {
    static_assert(kGemvMaxRows == kGemvRows, "one pass of the decode kernel covers every row");
    const size_t stride = row_bytes(FMT, K);
    const DecodeX dx = decode_x<FMT>(x, M, K, dot);
    const int64_t chunk = chunk_rows(N);
    if (M == 1 && (dx.q16.codes != nullptr || dx.q8.codes != nullptr)) {  // batch-1 decode: no row switch
#pragma omp for schedule(dynamic, chunk)
        for (int64_t n = 0; n < N; ++n) {
            const uint8_t* row = w + n * stride;
            if (n + kPrefetchRows < N) prefetch_row(row + kPrefetchRows * stride, stride);
            y[n] = dot_row_codes<FMT>(row, dx, K) + (bias ? bias[n] : 0.0f);
        }
        return;
    }
#pragma omp for schedule(dynamic, chunk)
    for (int64_t n = 0; n < N; ++n) {
        const uint8_t* row = w + n * stride;
        if (n + kPrefetchRows < N) prefetch_row(row + kPrefetchRows * stride, stride);
        const float b = bias ? bias[n] : 0.0f;
        float out[kGemvRows];
        dot_all_rows<FMT>(row, dx, M, K, out);
        for (int64_t r = 0; r < M; ++r) y[r * ldy + n] = out[r] + b;
    }
}

// c[i][j] = a_i . b_j over K for up to kMR rows of a and kNR rows of b (all K-contiguous).
template <int MR, int NR>
inline void panel_block(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t K, float c[kMR][kNR]) {
    __m256 acc[MR][NR];
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
        __m256 av[MR];
        for (int i = 0; i < MR; ++i) av[i] = _mm256_loadu_ps(a + i * lda + k);
        for (int j = 0; j < NR; ++j) {
            const __m256 bv = _mm256_loadu_ps(b + j * ldb + k);
            for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(av[i], bv, acc[i][j]);
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) c[i][j] = hsum(acc[i][j]);
}

template <int MR>
inline void panel_block_rows(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t K, int nr,
                             float c[kMR][kNR]) {
    switch (nr) {
        case 1: panel_block<MR, 1>(a, lda, b, ldb, K, c); break;
        case 2: panel_block<MR, 2>(a, lda, b, ldb, K, c); break;
        case 3: panel_block<MR, 3>(a, lda, b, ldb, K, c); break;
        default: panel_block<MR, 4>(a, lda, b, ldb, K, c); break;
    }
}

template <int FMT>
void panel_team(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, const float* bias, float* y,
                int64_t ldy) {
    const size_t stride = row_bytes(FMT, K);
    const int64_t num_panels = (N + kPanelRows - 1) / kPanelRows;
    static thread_local std::vector<float> panel;
    if constexpr (FMT != kF32) {
        if (int64_t(panel.size()) < kPanelRows * K) panel.resize(size_t(kPanelRows * K));
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t p = 0; p < num_panels; ++p) {
        const int64_t n0 = p * kPanelRows;
        const int64_t rows = std::min<int64_t>(kPanelRows, N - n0);
        const float* b;
        if constexpr (FMT == kF32) {
            b = reinterpret_cast<const float*>(w + n0 * stride);
        } else {
            for (int64_t j = 0; j < rows; ++j) dequant_row<FMT>(w + (n0 + j) * stride, K, panel.data() + j * K);
            b = panel.data();
        }
        for (int64_t m0 = 0; m0 < M; m0 += kMR) {
            const int mr = int(std::min<int64_t>(kMR, M - m0));
            for (int64_t j0 = 0; j0 < rows; j0 += kNR) {
                const int nr = int(std::min<int64_t>(kNR, rows - j0));
                float c[kMR][kNR];
                const float* a = x + m0 * K;
                switch (mr) {
                    case 1: panel_block_rows<1>(a, K, b + j0 * K, K, K, nr, c); break;
                    case 2: panel_block_rows<2>(a, K, b + j0 * K, K, K, nr, c); break;
                    default: panel_block_rows<3>(a, K, b + j0 * K, K, K, nr, c); break;
                }
                for (int i = 0; i < mr; ++i)
                    for (int j = 0; j < nr; ++j) {
                        const int64_t n = n0 + j0 + j;
                        y[(m0 + i) * ldy + n] = c[i][j] + (bias ? bias[n] : 0.0f);
                    }
            }
        }
    }
}

template <int FMT>
void gated_team(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t I, float* out, int dot) {
    const size_t stride = row_bytes(FMT, K);
    const DecodeX dx = decode_x<FMT>(x, M, K, dot);
    const int64_t chunk = chunk_rows(I);
    const __m256 one = _mm256_set1_ps(1.0f);
    auto silu_mul = [&](__m256 g, __m256 u) {
        const __m256 e = exp_ps(_mm256_xor_ps(g, _mm256_set1_ps(-0.0f)));
        return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), u);
    };
    if (M == 1 && (dx.q16.codes != nullptr || dx.q8.codes != nullptr)) {  // batch-1 decode (arithmetic as below)
#pragma omp for schedule(dynamic, chunk)
        for (int64_t n = 0; n < I; ++n) {
            const uint8_t* gate_row = w + n * stride;
            const uint8_t* up_row = w + (I + n) * stride;
            if (n + kPrefetchRows < I) {
                prefetch_row(gate_row + kPrefetchRows * stride, stride);
                prefetch_row(up_row + kPrefetchRows * stride, stride);
            }
            const float g = dot_row_codes<FMT>(gate_row, dx, K);
            const float u = dot_row_codes<FMT>(up_row, dx, K);
            out[n] = _mm256_cvtss_f32(silu_mul(_mm256_set1_ps(g), _mm256_set1_ps(u)));
        }
        return;
    }
#pragma omp for schedule(dynamic, chunk)
    for (int64_t n = 0; n < I; ++n) {
        float gate[kGemvRows], up[kGemvRows];
        dot_all_rows<FMT>(w + n * stride, dx, M, K, gate);
        dot_all_rows<FMT>(w + (I + n) * stride, dx, M, K, up);
        alignas(32) float g8[kGemvRows] = {}, u8[kGemvRows] = {}, a8[kGemvRows];
        std::copy(gate, gate + M, g8);
        std::copy(up, up + M, u8);
        _mm256_store_ps(a8, silu_mul(_mm256_load_ps(g8), _mm256_load_ps(u8)));
        for (int64_t r = 0; r < M; ++r) out[r * I + n] = a8[r];
    }
}

template <int FMT>
void linear_fmt(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, const float* bias, float* y,
                int64_t ldy, int dot, TeamScratch& ts) {
    if (M <= kGemvMaxRows) {
        if (avx512::decode_enabled() && avx512::decode_takes(FMT | dot))
            avx512::decode_linear_team(x, M, K, w, FMT | dot, N, bias, y, ldy);
        else
            gemv_team<FMT>(x, M, K, w, N, bias, y, ldy, dot);
    } else if (avx512::decode_enabled() && avx512::int16_panels_take(FMT | dot)) {
#pragma omp single
        ts.x16.resize(avx512::int16_panel_scratch(M, K));
        avx512::int16_panel_linear_team(x, M, K, w, FMT | dot, N, bias, y, ldy, ts.x16.data());
    } else if (avx512::enabled()) {
        avx512::panel_linear_team(x, M, K, w, FMT, N, bias, y, ldy);
    } else {
        panel_team<FMT>(x, M, K, w, N, bias, y, ldy);
    }
}

template <int FMT>
void embedding_fmt(const int64_t* ids, int64_t n, const uint8_t* w, int64_t K, float* out, int nthreads) {
    const size_t stride = row_bytes(FMT, K);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (n > 16)
    for (int64_t i = 0; i < n; ++i) dequant_row<FMT>(w + ids[i] * stride, K, out + i * K);
}

}  // namespace

void linear_team(const float* x, int64_t M, int64_t K, const uint8_t* w, int fmt, int64_t N, const float* bias,
                 float* y, int64_t ldy, TeamScratch& ts) {
    const int dot = fmt & kProductFlags;
    switch (fmt & ~kProductFlags) {
        case kF32: linear_fmt<kF32>(x, M, K, w, N, bias, y, ldy, dot, ts); break;
        case kBF16: linear_fmt<kBF16>(x, M, K, w, N, bias, y, ldy, dot, ts); break;
        case kF16: linear_fmt<kF16>(x, M, K, w, N, bias, y, ldy, dot, ts); break;
        case kQ8_0: linear_fmt<kQ8_0>(x, M, K, w, N, bias, y, ldy, dot, ts); break;
        case kQ4_0: linear_fmt<kQ4_0>(x, M, K, w, N, bias, y, ldy, dot, ts); break;
        case kQ4_1: linear_fmt<kQ4_1>(x, M, K, w, N, bias, y, ldy, dot, ts); break;
        case kQ8_0F: linear_fmt<kQ8_0F>(x, M, K, w, N, bias, y, ldy, dot, ts); break;
        case kQ4_1F: linear_fmt<kQ4_1F>(x, M, K, w, N, bias, y, ldy, dot, ts); break;
    }
}

void gated_linear_team(const float* x, int64_t M, int64_t K, const uint8_t* w, int fmt, int64_t I, float* out) {
    if (M >= 2 && M <= avx512::kColumnPanelMaxRows && avx512::decode_enabled() && avx512::decode_takes(fmt)) {
        avx512::decode_gated_linear_team(x, M, K, w, fmt, I, out);
        return;
    }
    const int dot = fmt & kProductFlags;
    switch (fmt & ~kProductFlags) {
        case kF32: gated_team<kF32>(x, M, K, w, I, out, dot); break;
        case kBF16: gated_team<kBF16>(x, M, K, w, I, out, dot); break;
        case kF16: gated_team<kF16>(x, M, K, w, I, out, dot); break;
        case kQ8_0: gated_team<kQ8_0>(x, M, K, w, I, out, dot); break;
        case kQ4_0: gated_team<kQ4_0>(x, M, K, w, I, out, dot); break;
        case kQ4_1: gated_team<kQ4_1>(x, M, K, w, I, out, dot); break;
        case kQ8_0F: gated_team<kQ8_0F>(x, M, K, w, I, out, dot); break;
        case kQ4_1F: gated_team<kQ4_1F>(x, M, K, w, I, out, dot); break;
    }
}

bool gated_panels_team(const float* x, int64_t M, int64_t K, const uint8_t* w, int fmt, int64_t I, float* out,
                       TeamScratch& ts) {
    if (M <= kGemvMaxRows || !avx512::decode_enabled() || !avx512::int16_panels_take(fmt)) return false;
#pragma omp single
    ts.x16.resize(avx512::int16_panel_scratch(M, K));
    avx512::int16_gated_panel_team(x, M, K, w, fmt, I, out, ts.x16.data());
    return true;
}

void gated_linear(const float* x, int64_t M, int64_t K, const uint8_t* w, int fmt, int64_t I, float* out, int nthreads) {
    TeamScratch ts;
    std::vector<float> gate_up;
#pragma omp parallel num_threads(nthreads)
    {
        if (M <= kGemvMaxRows) {
            gated_linear_team(x, M, K, w, fmt, I, out);
        } else if (!gated_panels_team(x, M, K, w, fmt, I, out, ts)) {
#pragma omp single
            gate_up.resize(size_t(M * 2 * I));
            linear_team(x, M, K, w, fmt, 2 * I, nullptr, gate_up.data(), 2 * I, ts);
            silu_mul_team(gate_up.data(), M, I, out);
        }
    }
}

void linear(const float* x, int64_t M, int64_t K, const uint8_t* w, int fmt, int64_t N, const float* bias, float* y,
            int64_t ldy, int nthreads) {
    TeamScratch ts;
#pragma omp parallel num_threads(nthreads)
    linear_team(x, M, K, w, fmt, N, bias, y, ldy, ts);
}

void linear_packed(const float* x, int64_t M, int64_t K, const uint8_t* w, const uint8_t* packed, int fmt, int64_t N,
                   const float* bias, float* y, int64_t ldy, int nthreads) {
    if (M >= 2 && M <= avx512::kColumnPanelMaxRows && avx512::decode_enabled() && avx512::decode_takes(fmt) && avx512::int16_panel_packs(fmt)) {
        // the int16 decode products' rounding, with the panels' columns in the lanes (a single row reads
        // the rows faster: 1.16 against 1.36 ms for a 49,152 x 576 Q8_0 head on a 2-core Zen 4; 12 to 48
        // rows take 0.69-0.90 of the int16 panels' time)
#pragma omp parallel num_threads(nthreads)
        avx512::q8_panel_linear_team(x, M, K, packed, N, bias, y, ldy);
        return;
    }
    if (M <= kGemvMaxRows || !avx512::decode_enabled() || !avx512::int16_panels_take(fmt) ||
        !avx512::int16_panel_packs(fmt)) {
        linear(x, M, K, w, fmt, N, bias, y, ldy, nthreads);
        return;
    }
    TeamScratch ts;
    ts.x16.resize(avx512::int16_panel_scratch(M, K));
#pragma omp parallel num_threads(nthreads)
    avx512::int16_packed_linear_team(x, M, K, packed, fmt, N, bias, y, ldy, ts.x16.data());
}

void int14_linear(const float* x, int64_t M, int64_t K, const uint8_t* packed, int64_t N, const float* bias, float* y,
                  int64_t ldy, int nthreads) {
    TeamScratch ts;
    ts.x16.resize(avx512::int16_panel_scratch(M, K));
#pragma omp parallel num_threads(nthreads)
    avx512::int14_linear_team(x, M, K, packed, N, bias, y, ldy, ts.x16.data());
}

void int14_gated_linear(const float* x, int64_t M, int64_t K, const uint8_t* packed, int64_t I, float* out,
                        int nthreads) {
    TeamScratch ts;
    ts.x16.resize(avx512::int16_panel_scratch(M, K));
#pragma omp parallel num_threads(nthreads)
    avx512::int14_gated_linear_team(x, M, K, packed, I, out, ts.x16.data());
}

void q4_panel_linear(const float* x, int64_t M, int64_t K, const uint8_t* packed, int64_t N, const float* bias, float* y,
                     int64_t ldy, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    avx512::q4_panel_linear_team(x, M, K, packed, N, bias, y, ldy);
}

void q4_panel_gated_linear(const float* x, int64_t M, int64_t K, const uint8_t* packed, int64_t I, float* out,
                           int nthreads) {
#pragma omp parallel num_threads(nthreads)
    avx512::q4_panel_gated_linear_team(x, M, K, packed, I, out);
}

void embedding(const int64_t* ids, int64_t n, const uint8_t* w, int fmt, int64_t K, float* out, int nthreads) {
    switch (fmt) {
        case kF32: embedding_fmt<kF32>(ids, n, w, K, out, nthreads); break;
        case kBF16: embedding_fmt<kBF16>(ids, n, w, K, out, nthreads); break;
        case kF16: embedding_fmt<kF16>(ids, n, w, K, out, nthreads); break;
        case kQ8_0: embedding_fmt<kQ8_0>(ids, n, w, K, out, nthreads); break;
        case kQ4_0: embedding_fmt<kQ4_0>(ids, n, w, K, out, nthreads); break;
        case kQ4_1: embedding_fmt<kQ4_1>(ids, n, w, K, out, nthreads); break;
        case kQ8_0F: embedding_fmt<kQ8_0F>(ids, n, w, K, out, nthreads); break;
        case kQ4_1F: embedding_fmt<kQ4_1F>(ids, n, w, K, out, nthreads); break;
    }
}

}  // namespace plait::avx2
