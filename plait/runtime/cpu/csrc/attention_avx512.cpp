// Attention tasks of many query rows (prefill, extend) with AVX-512, where the CPU has it and no AMX.
//
// The same scheme as the AVX2 path for such tasks (attention_avx2.cpp), a segment of 128 keys of one
// KV head at a time: the segment converted to float32 in cache (keys transposed to columns, 32 a
// block; values as rows), then for each group of 12 rows their scores over the whole segment, one
// online-softmax step and the weighted values. The segment, not the block, is the softmax step: its
// per-row reductions, exponential of the rescale and rescale of the output then come once per 128
// keys (an extend of 160 tokens over 1,300 cached: 83.5 ms of attention before, 75-79 after, 2-core
// AVX-512 Xeon). In 512-bit registers: scores as 12 rows x 32 keys (24 accumulators; per head
// dimension two key loads and 12 broadcasts), values as 6 rows x 64 dimensions.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include "kernels.h"

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")

#include "simd_avx2.h"
#include "simd_avx512.h"

namespace plait::avx512 {
namespace {

using avx2::cache_row;
using avx2::CacheRow;
using avx2::LinesAhead;
using avx2::load_row8;
using avx512_helpers::exp_neg;
using avx512_helpers::transpose16;

constexpr int kT = 32;  // keys per block (kT in attention_avx2.cpp)
constexpr int64_t kRowSeg = 128;  // keys per softmax step of a task of many rows (a multiple of kT)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// 16 values d .. d + 16 of a cache row as float32.
inline __m512 load_row16(const CacheRow& row, int64_t d) {
    return _mm512_insertf32x8(_mm512_castps256_ps512(load_row8(row, d)), load_row8(row, d + 8), 1);
}

// Keys of the block as columns kt[d][t] and values as rows v[t][d] (D % 16 == 0), float32; keys past
// `nt` are zero.
void load_block(const int64_t* slots, int64_t nt, const void* k_cache, const void* v_cache, int fmt, int64_t Hkv,
                int64_t head, int64_t D, float* kt, float* v) {
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t t0 = 0; t0 < kT; t0 += 16) {
        CacheRow krow[16], vrow[16];
        const int live = int(std::clamp<int64_t>(nt - t0, 0, 16));
        for (int i = 0; i < live; ++i) {
            krow[i] = cache_row(k_cache, fmt, slots[t0 + i], Hkv, head, D);
            vrow[i] = cache_row(v_cache, fmt, slots[t0 + i], Hkv, head, D);
        }
        for (int64_t d0 = 0; d0 < D; d0 += 16) {
            __m512 r[16];
            for (int i = 0; i < 16; ++i) {
                const bool on = i < live;
                r[i] = on ? load_row16(krow[i], d0) : zero;
                _mm512_storeu_ps(v + (t0 + i) * D + d0, on ? load_row16(vrow[i], d0) : zero);
            }
            transpose16(r);
            for (int i = 0; i < 16; ++i) _mm512_storeu_ps(kt + (d0 + i) * kT + t0, r[i]);
        }
    }
}

// s[r * ld + 0..32) = q[r] . k[t] for R <= 12 rows.
template <int R>
inline void scores(const float* q, int64_t D, const float* kt, float* s, int64_t ld) {
    __m512 a0[R], a1[R];
    for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
        const __m512 k0 = _mm512_loadu_ps(kt + d * kT), k1 = _mm512_loadu_ps(kt + d * kT + 16);
        for (int r = 0; r < R; ++r) {
            const __m512 qv = _mm512_set1_ps(q[r * D + d]);
            a0[r] = _mm512_fmadd_ps(qv, k0, a0[r]);
            a1[r] = _mm512_fmadd_ps(qv, k1, a1[r]);
        }
    }
    for (int r = 0; r < R; ++r) {
        _mm512_storeu_ps(s + r * ld, a0[r]);
        _mm512_storeu_ps(s + r * ld + 16, a1[r]);
    }
}

// o[r][d0 .. d0 + 16 NV) += sum_t p[r * ld + t] v[t][...] for R <= 6 rows.
template <int R, int NV>
inline void accumulate(const float* p, int64_t ld, const float* v, int64_t D, int64_t d0, int64_t nt, float* o) {
    __m512 acc[R][NV];
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_loadu_ps(o + r * D + d0 + 16 * j);
    for (int64_t t = 0; t < nt; ++t) {
        __m512 vv[NV];
        for (int j = 0; j < NV; ++j) vv[j] = _mm512_loadu_ps(v + t * D + d0 + 16 * j);
        for (int r = 0; r < R; ++r) {
            const __m512 pv = _mm512_set1_ps(p[r * ld + t]);
            for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_fmadd_ps(pv, vv[j], acc[r][j]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < NV; ++j) _mm512_storeu_ps(o + r * D + d0 + 16 * j, acc[r][j]);
}

template <int R>
inline void accumulate_all(const float* p, int64_t ld, const float* v, int64_t D, int64_t nt, float* o) {
    int64_t d0 = 0;
    for (; d0 + 64 <= D; d0 += 64) accumulate<R, 4>(p, ld, v, D, d0, nt, o);
    for (; d0 < D; d0 += 16) accumulate<R, 1>(p, ld, v, D, d0, nt, o);
}

template <int... Rs, typename F>
inline void by_rows(int n, std::integer_sequence<int, Rs...>, F&& f) {
    ((n == Rs + 1 ? (f(std::integral_constant<int, Rs + 1>{}), 0) : 0), ...);
}

// One online-softmax step over n keys from t0 (scores s[r * ld + ...], n rounded up to whole blocks of
// 32 and masked here; row r sees keys below first_visible + (row0 + r) / G): the scores become weights,
// and each row's maximum, sum and output are rescaled. BlockSoftmax::update_segment of
// attention_avx2.cpp; tasks call it per segment of keys and group of rows.
void softmax_segment(float* s, int64_t ld, float* mx, float* l, float* o, int64_t R, int64_t G, int64_t first_visible,
                     int64_t t0, int64_t n, int64_t D, int64_t row0 = 0) {
    const int64_t padded = (n + kT - 1) / kT * kT;
    for (int64_t r = 0; r < R; ++r) {
        float* sr = s + r * ld;
        const int64_t limit = std::min(n, first_visible + (row0 + r) / G - t0);
        if (limit <= 0) {
            std::fill(sr, sr + padded, 0.0f);
            continue;
        }
        for (int64_t t = limit; t < padded; ++t) sr[t] = kNegInf;
        __m512 m0 = _mm512_loadu_ps(sr), m1 = _mm512_loadu_ps(sr + 16);
        for (int64_t t = kT; t < padded; t += kT) {
            m0 = _mm512_max_ps(m0, _mm512_loadu_ps(sr + t));
            m1 = _mm512_max_ps(m1, _mm512_loadu_ps(sr + t + 16));
        }
        const float m_new = std::max(mx[r], _mm512_reduce_max_ps(_mm512_max_ps(m0, m1)));
        const float alpha = m_new == mx[r] ? 1.0f : std::exp(mx[r] - m_new);
        const __m512 mv = _mm512_set1_ps(m_new);
        __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps();
        for (int64_t t = 0; t < padded; t += 32) {
            const __m512 p0 = exp_neg(_mm512_sub_ps(_mm512_loadu_ps(sr + t), mv));
            const __m512 p1 = exp_neg(_mm512_sub_ps(_mm512_loadu_ps(sr + t + 16), mv));
            _mm512_storeu_ps(sr + t, p0);
            _mm512_storeu_ps(sr + t + 16, p1);
            sum0 = _mm512_add_ps(sum0, p0);
            sum1 = _mm512_add_ps(sum1, p1);
        }
        l[r] = l[r] * alpha + _mm512_reduce_add_ps(_mm512_add_ps(sum0, sum1));
        mx[r] = m_new;
        if (alpha != 1.0f) {
            const __m512 av = _mm512_set1_ps(alpha);
            for (int64_t d = 0; d < D; d += 16)
                _mm512_storeu_ps(o + r * D + d, _mm512_mul_ps(_mm512_loadu_ps(o + r * D + d), av));
        }
    }
}

}  // namespace

void attend_rows(const int64_t* slots, int64_t k0, int64_t end, const void* k_cache, const void* v_cache,
                 int fmt, int64_t Hkv, int64_t head, int64_t D, const float* q, int64_t R, int64_t G,
                 int64_t first_visible, float* kt, float* v, float* s, float* o, float* mx, float* l) {
    for (int64_t t0 = k0; t0 < end; t0 += kRowSeg) {
        const int64_t ns = std::min<int64_t>(kRowSeg, end - t0);
        for (int64_t b = 0; b * kT < ns; ++b)
            load_block(slots + t0 + b * kT, std::min<int64_t>(kT, ns - b * kT), k_cache, v_cache, fmt, Hkv, head, D,
                       kt + b * D * kT, v + b * kT * D);
        for (int64_t r0 = 0; r0 < R; r0 += 12) {
            const int rows = int(std::min<int64_t>(12, R - r0));
            // The keys of the segment the group's last row sees: on the causal diagonal, the blocks past
            // them are masked for every row of the group and skipped (the same bits: their weights are 0).
            const int64_t seen = std::min(ns, first_visible + (r0 + rows - 1) / G - t0);
            if (seen <= 0) continue;
            by_rows(rows, std::make_integer_sequence<int, 12>{}, [&](auto n) {
                for (int64_t b = 0; b * kT < seen; ++b)
                    scores<decltype(n)::value>(q + r0 * D, D, kt + b * D * kT, s + b * kT, kRowSeg);
            });
            softmax_segment(s, kRowSeg, mx + r0, l + r0, o + r0 * D, rows, G, first_visible, t0, seen, D, r0);
            for (int64_t r1 = 0; r1 < rows; r1 += 6)
                by_rows(int(std::min<int64_t>(6, rows - r1)), std::make_integer_sequence<int, 6>{}, [&](auto n) {
                    accumulate_all<decltype(n)::value>(s + r1 * kRowSeg, kRowSeg, v, D, seen, o + (r0 + r1) * D);
                });
        }
    }
}

// ---- Decode tasks: the pool's rows read in place, a segment of keys at a time ----
//
// The AVX2 path's decode tasks (attention_avx2.cpp, blocks_direct) in 512-bit registers: per segment of
// 256 keys all the scores (K rows converted in registers, 16 dims a vector; the sums of 8 keys reduced
// across lanes together), one softmax step per row,
// then the values (64 dims of a row per pass over the keys, even and odd keys into separate sums), with
// the next block's cache lines asked for from inside each block's arithmetic.
namespace {

constexpr int64_t kSeg = 256;  // keys per segment (kSeg in attention_avx2.cpp)

template <int FMT>
PLAIT_INLINE __m512 load_raw16(const uint8_t* row, int64_t d) {
    if constexpr (FMT == kCacheBF16) {
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(reinterpret_cast<const uint16_t*>(row) + d));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else if constexpr (FMT == kCacheF16) {
        return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(reinterpret_cast<const uint16_t*>(row) + d)));
    } else if constexpr (FMT == kCacheI8) {
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + d))));
    } else {
        return _mm512_loadu_ps(reinterpret_cast<const float*>(row) + d);
    }
}

// The sums of eight vectors in order, {sum a[0], ..., sum a[7]}: pairs of vectors folded into one
// (halves, then quarters, then pairs of lanes added), 24 instructions for the eight where reducing
// each alone takes 4 shuffles and 4 adds.
PLAIT_INLINE __m256 sum8(const __m512 a[8]) {
    auto halves = [](__m512 x, __m512 y) {  // quarters {x0 + x2, x1 + x3, y0 + y2, y1 + y3}
        return _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x44), _mm512_shuffle_f32x4(x, y, 0xEE));
    };
    auto quarters = [](__m512 x, __m512 y) {  // quarter i: four partial sums of vector i
        return _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x88), _mm512_shuffle_f32x4(x, y, 0xDD));
    };
    const __m512 lo = quarters(halves(a[0], a[1]), halves(a[2], a[3]));
    const __m512 hi = quarters(halves(a[4], a[5]), halves(a[6], a[7]));
    // Lane i of e: two partial sums of vector i, then two of vector 4 + i; of f: {s_i, s_i, s_4+i, s_4+i}.
    const __m512 e = _mm512_add_ps(_mm512_shuffle_ps(lo, hi, 0x44), _mm512_shuffle_ps(lo, hi, 0xEE));
    const __m512 f = _mm512_add_ps(e, _mm512_shuffle_ps(e, e, 0xB1));
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_castps512_ps256(_mm512_permutexvar_ps(order, f));
}

// s[r * ld + t] = q[r] . k[t] for the block's 32 keys, 8 at a time: R x 8 sums in registers, reduced
// together by sum8.
template <int R, int FMT>
void scores_direct(const float* q, int64_t D, const uint8_t* const rows[kT], int64_t off, const float scales[kT],
                   float* s, int64_t ld, LinesAhead& ahead) {
    for (int64_t t = 0; t < kT; t += 8) {
        __m512 acc[R][8];
        for (int r = 0; r < R; ++r)
            for (int j = 0; j < 8; ++j) acc[r][j] = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) {
            ahead.read();
            ahead.read();
            for (int j = 0; j < 8; ++j) {
                const __m512 k = load_raw16<FMT>(rows[t + j] + off, d);
                for (int r = 0; r < R; ++r) acc[r][j] = _mm512_fmadd_ps(_mm512_loadu_ps(q + r * D + d), k, acc[r][j]);
            }
        }
        const __m256 sc = _mm256_loadu_ps(scales + t);
        for (int r = 0; r < R; ++r) {
            __m256 s8 = sum8(acc[r]);
            if constexpr (FMT == kCacheI8) s8 = _mm256_mul_ps(s8, sc);
            _mm256_storeu_ps(s + r * ld + t, s8);
        }
    }
}

// o[r][d0 .. d0 + 16 NV) += sum_t p[r][t] v[t][...] over the block's first nt keys (rows past nt
// repeat the last, with weight 0), even and odd keys into separate sums.
template <int R, int FMT, int NV>
PLAIT_INLINE void accumulate_part(const float* const w[R], const uint8_t* const rows[kT], int64_t off, int64_t D,
                                  int64_t d0, int64_t nt, float* o, LinesAhead& ahead) {
    __m512 even[R][NV], odd[R][NV];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < NV; ++c) {
            even[r][c] = _mm512_loadu_ps(o + r * D + d0 + 16 * c);
            odd[r][c] = _mm512_setzero_ps();
        }
    const int64_t n2 = (nt + 1) / 2 * 2;
    for (int64_t t = 0; t < n2; t += 2) {
        ahead.read();
        __m512 v[NV];
        for (int c = 0; c < NV; ++c) v[c] = load_raw16<FMT>(rows[t] + off, d0 + 16 * c);
        for (int r = 0; r < R; ++r) {
            const __m512 pv = _mm512_set1_ps(w[r][t]);
            for (int c = 0; c < NV; ++c) even[r][c] = _mm512_fmadd_ps(pv, v[c], even[r][c]);
        }
        for (int c = 0; c < NV; ++c) v[c] = load_raw16<FMT>(rows[t + 1] + off, d0 + 16 * c);
        for (int r = 0; r < R; ++r) {
            const __m512 pv = _mm512_set1_ps(w[r][t + 1]);
            for (int c = 0; c < NV; ++c) odd[r][c] = _mm512_fmadd_ps(pv, v[c], odd[r][c]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < NV; ++c) _mm512_storeu_ps(o + r * D + d0 + 16 * c, _mm512_add_ps(even[r][c], odd[r][c]));
}

template <int R, int FMT>
void accumulate_direct(const float* p, int64_t ld, const uint8_t* const rows[kT], int64_t off, const float scales[kT],
                       int64_t D, int64_t nt, float* o, LinesAhead& ahead) {
    alignas(64) float scaled[FMT == kCacheI8 ? R : 1][kT];
    const float* w[R];
    for (int r = 0; r < R; ++r) w[r] = p + r * ld;
    if constexpr (FMT == kCacheI8) {
        for (int r = 0; r < R; ++r) {
            for (int64_t t = 0; t < kT; t += 16)
                _mm512_store_ps(&scaled[r][t], _mm512_mul_ps(_mm512_loadu_ps(p + r * ld + t), _mm512_loadu_ps(scales + t)));
            w[r] = scaled[r];
        }
    }
    int64_t d0 = 0;
    for (; d0 + 64 <= D; d0 += 64) accumulate_part<R, FMT, 4>(w, rows, off, D, d0, nt, o, ahead);
    for (; d0 < D; d0 += 16) accumulate_part<R, FMT, 1>(w, rows, off, D, d0, nt, o, ahead);
}

template <int R, int FMT>
void decode_blocks(const DecodeTask& t) {
    const int64_t D = t.D, row_bytes = cache_row_bytes(FMT, D), slot_bytes = t.Hkv * row_bytes;
    const int64_t span = t.nh * row_bytes;
    const uint8_t* kbase = static_cast<const uint8_t*>(t.k_cache) + t.head * row_bytes;
    const uint8_t* vbase = static_cast<const uint8_t*>(t.v_cache) + t.head * row_bytes;
    const int64_t seg_blocks = kSeg / kT, num_segs = (t.end - t.k0 + kSeg - 1) / kSeg;
    const int64_t num_blocks = num_segs * 2 * seg_blocks;
    auto block = [&](int64_t i, int64_t& t0, int64_t& nt, int& pass) {
        const int64_t seg = i / (2 * seg_blocks), in_seg = i % (2 * seg_blocks);
        t0 = t.k0 + seg * kSeg + in_seg % seg_blocks * kT;
        nt = std::min<int64_t>(kT, std::min(t.end, t.k0 + (seg + 1) * kSeg) - t0);
        pass = in_seg < seg_blocks ? 0 : 1;
        return i < num_blocks && nt > 0;
    };
    auto block_rows = [&](int64_t first, int64_t nt, const uint8_t* base, const uint8_t** rows) {
        for (int64_t i = 0; i < kT; ++i) rows[i] = base + t.slots[first + std::min<int64_t>(i, nt - 1)] * slot_bytes;
    };
    const uint8_t* rows_a[kT];
    const uint8_t* rows_b[kT];
    const uint8_t** rows = rows_a;
    const uint8_t** next = rows_b;
    float scale[kT];
    LinesAhead ahead;
    int64_t t0, nt;
    int pass;
    block(0, t0, nt, pass);
    block_rows(t0, nt, kbase, rows);
    ahead.plan(rows, nt, span);
    ahead.read_rest();
    for (int64_t i = 0; i < num_blocks;) {
        int64_t j = i + 1, t1 = 0, n1 = 0;
        int pass1 = 0;
        while (j < num_blocks && !block(j, t1, n1, pass1)) ++j;
        const bool more = j < num_blocks;
        if (more) block_rows(t1, n1, pass1 == 0 ? kbase : vbase, next);
        ahead.plan(next, more ? n1 : 0, span);
        const int64_t s0 = t.k0 + (t0 - t.k0) / kSeg * kSeg;
        for (int64_t hh = 0; hh < t.nh; ++hh) {
            const int64_t off = hh * row_bytes;
            if constexpr (FMT == kCacheI8)
                for (int64_t k = 0; k < kT; ++k) std::memcpy(&scale[k], rows[k] + off + D, sizeof(float));
            float* sp = t.seg_scores + hh * R * kSeg + (t0 - s0);
            if (pass == 0) scores_direct<R, FMT>(t.q + hh * R * D, D, rows, off, scale, sp, kSeg, ahead);
            else accumulate_direct<R, FMT>(sp, kSeg, rows, off, scale, D, nt, t.o + hh * R * D, ahead);
        }
        ahead.read_rest();
        if (pass == 0 && (!more || pass1 == 1)) {
            const int64_t s1 = std::min(t.end, s0 + kSeg);
            for (int64_t hh = 0; hh < t.nh; ++hh)
                softmax_segment(t.seg_scores + hh * R * kSeg, kSeg, t.mx + hh * R, t.l + hh * R, t.o + hh * R * D, R,
                                t.G, t.first_visible, s0, s1 - s0, D);
        }
        std::swap(rows, next);
        i = j;
        t0 = t1;
        nt = n1;
        pass = pass1;
    }
}

}  // namespace

void decode_attention(const DecodeTask& t) {
    switch (t.fmt * 4 + int(t.R)) {
#define PLAIT_DECODE(F, RR) \
    case F * 4 + RR: decode_blocks<RR, F>(t); break;
        PLAIT_DECODE(kCacheF32, 1) PLAIT_DECODE(kCacheF32, 2) PLAIT_DECODE(kCacheF32, 3)
        PLAIT_DECODE(kCacheBF16, 1) PLAIT_DECODE(kCacheBF16, 2) PLAIT_DECODE(kCacheBF16, 3)
        PLAIT_DECODE(kCacheF16, 1) PLAIT_DECODE(kCacheF16, 2) PLAIT_DECODE(kCacheF16, 3)
        PLAIT_DECODE(kCacheI8, 1) PLAIT_DECODE(kCacheI8, 2) PLAIT_DECODE(kCacheI8, 3)
#undef PLAIT_DECODE
    }
}

}  // namespace plait::avx512
