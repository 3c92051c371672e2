// Attention tasks of many query rows (prefill, extend) with AVX-512, where the CPU has it and no AMX.
//
// The same scheme as the AVX2 path for such tasks (attention_avx2.cpp): the keys of one KV head, 32
// at a time, converted to float32 in cache (keys transposed to columns, values as rows); the scores
// of all the task's rows, one online-softmax step per row and block, then the weighted values. Here
// in 512-bit registers: scores as 12 rows x 32 keys (24 accumulators; per head dimension two key
// loads and 12 broadcasts), values as 6 rows x 64 dimensions, and the softmax two vectors a row.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>

#include "kernels.h"
#include "simd_avx2.h"

namespace plait::avx512 {
namespace {

using avx2::cache_row;
using avx2::CacheRow;
using avx2::load_row8;

constexpr int kT = 32;  // keys per block (kT in attention_avx2.cpp)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// 16 values d .. d + 16 of a cache row as float32.
inline __m512 load_row16(const CacheRow& row, int64_t d) {
    return _mm512_insertf32x8(_mm512_castps256_ps512(load_row8(row, d)), load_row8(row, d + 8), 1);
}

// Transposes 16 vectors of 16 floats in place (r[i][j] -> r[j][i]).
inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int q = 0; q < 4; ++q) {
        r[4 * q + 0] = _mm512_shuffle_ps(t[4 * q], t[4 * q + 2], 0x44);
        r[4 * q + 1] = _mm512_shuffle_ps(t[4 * q], t[4 * q + 2], 0xEE);
        r[4 * q + 2] = _mm512_shuffle_ps(t[4 * q + 1], t[4 * q + 3], 0x44);
        r[4 * q + 3] = _mm512_shuffle_ps(t[4 * q + 1], t[4 * q + 3], 0xEE);
    }
    for (int e = 0; e < 4; ++e) {
        const __m512 a0 = _mm512_shuffle_f32x4(r[e], r[4 + e], 0x88);
        const __m512 a1 = _mm512_shuffle_f32x4(r[e], r[4 + e], 0xDD);
        const __m512 b0 = _mm512_shuffle_f32x4(r[8 + e], r[12 + e], 0x88);
        const __m512 b1 = _mm512_shuffle_f32x4(r[8 + e], r[12 + e], 0xDD);
        t[e] = _mm512_shuffle_f32x4(a0, b0, 0x88);
        t[8 + e] = _mm512_shuffle_f32x4(a0, b0, 0xDD);
        t[4 + e] = _mm512_shuffle_f32x4(a1, b1, 0x88);
        t[12 + e] = _mm512_shuffle_f32x4(a1, b1, 0xDD);
    }
    for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// exp(x) for x <= 0 (-inf: 0): the AVX2 path's exp_neg_ps in 16 lanes (n = round(x log2 e) by the
// 1.5 * 2^23 + 127 addition, the remainder's Taylor polynomial to degree 6).
inline __m512 exp_neg(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.0f);
    const __m512 magic = _mm512_set1_ps(12582912.0f + 127.0f);
    const __m512 xc = _mm512_max_ps(x, lo);
    const __m512 t = _mm512_fmadd_ps(xc, _mm512_set1_ps(1.44269504088896341f), magic);
    const __m512 n = _mm512_sub_ps(t, magic);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(t), 23));
    const __mmask16 live = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);
    return _mm512_maskz_mul_ps(live, p, scale);
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

// s[r][0..32) = q[r] . k[t] for R <= 12 rows.
template <int R>
inline void scores(const float* q, int64_t D, const float* kt, float* s) {
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
        _mm512_storeu_ps(s + r * kT, a0[r]);
        _mm512_storeu_ps(s + r * kT + 16, a1[r]);
    }
}

// o[r][d0 .. d0 + 16 NV) += sum_t p[r][t] v[t][...] for R <= 6 rows.
template <int R, int NV>
inline void accumulate(const float* p, const float* v, int64_t D, int64_t d0, int64_t nt, float* o) {
    __m512 acc[R][NV];
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_loadu_ps(o + r * D + d0 + 16 * j);
    for (int64_t t = 0; t < nt; ++t) {
        __m512 vv[NV];
        for (int j = 0; j < NV; ++j) vv[j] = _mm512_loadu_ps(v + t * D + d0 + 16 * j);
        for (int r = 0; r < R; ++r) {
            const __m512 pv = _mm512_set1_ps(p[r * kT + t]);
            for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_fmadd_ps(pv, vv[j], acc[r][j]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < NV; ++j) _mm512_storeu_ps(o + r * D + d0 + 16 * j, acc[r][j]);
}

template <int R>
inline void accumulate_all(const float* p, const float* v, int64_t D, int64_t nt, float* o) {
    int64_t d0 = 0;
    for (; d0 + 64 <= D; d0 += 64) accumulate<R, 4>(p, v, D, d0, nt, o);
    for (; d0 < D; d0 += 16) accumulate<R, 1>(p, v, D, d0, nt, o);
}

template <int... Rs, typename F>
inline void by_rows(int n, std::integer_sequence<int, Rs...>, F&& f) {
    ((n == Rs + 1 ? (f(std::integral_constant<int, Rs + 1>{}), 0) : 0), ...);
}

// One online-softmax step over the block's scores: row r sees keys [0, first_visible + r / G) of the
// task, of which this block holds t0 .. t0 + nt; s[r] become weights, mx, l and o are rescaled.
void softmax_step(float* s, float* mx, float* l, float* o, int64_t R, int64_t G, int64_t first_visible, int64_t t0,
                  int64_t nt, int64_t D) {
    for (int64_t r = 0; r < R; ++r) {
        float* sr = s + r * kT;
        const int64_t limit = std::min(nt, first_visible + r / G - t0);
        if (limit <= 0) {
            _mm512_storeu_ps(sr, _mm512_setzero_ps());
            _mm512_storeu_ps(sr + 16, _mm512_setzero_ps());
            continue;
        }
        const __mmask16 m0 = limit >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << limit) - 1);
        const __mmask16 m1 = limit >= 32 ? __mmask16(0xFFFF) : limit <= 16 ? __mmask16(0) : __mmask16((1u << (limit - 16)) - 1);
        const __m512 ninf = _mm512_set1_ps(kNegInf);
        const __m512 s0 = _mm512_mask_loadu_ps(ninf, m0, sr), s1 = _mm512_mask_loadu_ps(ninf, m1, sr + 16);
        const float m_new = std::max(mx[r], _mm512_reduce_max_ps(_mm512_max_ps(s0, s1)));
        const float alpha = m_new == mx[r] ? 1.0f : std::exp(mx[r] - m_new);  // 0 for the first visible block
        const __m512 mv = _mm512_set1_ps(m_new);
        const __m512 p0 = exp_neg(_mm512_sub_ps(s0, mv)), p1 = exp_neg(_mm512_sub_ps(s1, mv));
        _mm512_storeu_ps(sr, p0);
        _mm512_storeu_ps(sr + 16, p1);
        l[r] = l[r] * alpha + _mm512_reduce_add_ps(_mm512_add_ps(p0, p1));
        mx[r] = m_new;
        if (alpha != 1.0f) {
            const __m512 av = _mm512_set1_ps(alpha);
            for (int64_t d = 0; d < D; d += 16)
                _mm512_storeu_ps(o + r * D + d, _mm512_mul_ps(_mm512_loadu_ps(o + r * D + d), av));
        }
    }
}

}  // namespace

void attend_rows(const int64_t* slots, int64_t k0, int64_t end, int64_t k1, const void* k_cache, const void* v_cache,
                 int fmt, int64_t Hkv, int64_t head, int64_t D, const float* q, int64_t R, int64_t G,
                 int64_t first_visible, float* kt, float* v, float* s, float* o, float* mx, float* l) {
    for (int64_t t0 = k0; t0 < end; t0 += kT) {
        const int64_t nt = std::min<int64_t>(kT, k1 - t0);
        load_block(slots + t0, nt, k_cache, v_cache, fmt, Hkv, head, D, kt, v);
        for (int64_t r0 = 0; r0 < R; r0 += 12)
            by_rows(int(std::min<int64_t>(12, R - r0)), std::make_integer_sequence<int, 12>{},
                    [&](auto rows) { scores<decltype(rows)::value>(q + r0 * D, D, kt, s + r0 * kT); });
        softmax_step(s, mx, l, o, R, G, first_visible, t0, nt, D);
        for (int64_t r0 = 0; r0 < R; r0 += 6)
            by_rows(int(std::min<int64_t>(6, R - r0)), std::make_integer_sequence<int, 6>{},
                    [&](auto rows) { accumulate_all<decltype(rows)::value>(s + r0 * kT, v, D, nt, o + r0 * D); });
    }
}

}  // namespace plait::avx512
