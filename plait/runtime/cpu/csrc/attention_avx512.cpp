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
#include "team.h"

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")

#include "simd_avx2.h"
#include "simd_avx512.h"

namespace plait::avx512 {
namespace {

using avx2::cache_row;
using avx2::CacheRow;
using avx2::LinesAhead;
using avx2::load_row8;
using avx512_helpers::dpwssd;
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

// ---- Tasks of many rows in integers (VPDPWSSD), where the CPU has AVX-512 VNNI ----
//
// The same segments, softmax steps and row groups as above, with both products as exact sums of
// int16 code products: 32 multiply-adds per instruction where the float kernels run 16. The keys and
// values are rounded once per call (prepare_codes, the team over all blocks of the sequences that
// have such tasks): every task of a sequence reads the same codes. q and each key
// are rounded to 13-bit codes with one scale a row (a head's 64 or 128 products of two such codes stay
// inside an int32 sum); the scores are the code sums times the two scales. Each value row is rounded to
// 14-bit codes with its own scale, which moves into the weights: per row and block of 32 keys the
// softmax weights times their values' scales are rounded to 14-bit codes (32 products of two 14-bit
// codes stay inside an int32 sum), and each block's sum is scaled into the float output. Greedy
// outputs of the default model under this rounding equal those of exact attention over the same
// float16 cache (python -m plait.bench.rounding --attention).

constexpr float kQkLevels = 4095.0f;  // q and k: codes in [-4095, 4095]
constexpr float kPvLevels = 8191.0f;  // weights times value scales, and values: [-8191, 8191]
constexpr int64_t kIntMaxD = 128;     // 128 products of 13-bit codes fill an int32 sum

// A 4-byte load of two int16 codes side by side.
typedef int32_t code_pair __attribute__((may_alias, aligned(4)));

// A row of n floats (n % 16 == 0, n <= kIntMaxD) as int16 codes at `levels` with one scale (returned).
inline float round_row(const __m512* x, int64_t n, float levels, int16_t* codes) {
    __m512 top = _mm512_setzero_ps();
    for (int64_t i = 0; i < n / 16; ++i) top = _mm512_max_ps(top, _mm512_abs_ps(x[i]));
    const float max_abs = _mm512_reduce_max_ps(top);
    const __m512 inv = _mm512_set1_ps(max_abs > 0.0f ? levels / max_abs : 0.0f);
    for (int64_t i = 0; i < n / 16; ++i)  // round to nearest even
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + 16 * i),
                            _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(x[i], inv))));
    return max_abs / levels;
}

// A block of 32 keys as codes (code_block_words(D) words): the keys as pairs of dimensions,
// kp[p][t] = (k[t][2p], k[t][2p + 1]) [D / 2][32]; the values as pairs of keys,
// vp[j][d] = (v[2j][d], v[2j + 1][d]) [16][D]; then per key the keys' scales sk[32] and the values'
// sv[32] (floats). Keys past `nt` are 0.
struct CodeBlock {
    int32_t *kp, *vp;
    float *sk, *sv;
    CodeBlock(int32_t* base, int64_t D)
        : kp(base), vp(base + D / 2 * kT), sk(reinterpret_cast<float*>(base + D * kT)), sv(sk + kT) {}
};

void load_block_codes(const int64_t* slots, int64_t nt, const void* k_cache, const void* v_cache, int fmt,
                      int64_t Hkv, int64_t head, int64_t D, const CodeBlock& out) {
    int32_t* kp = out.kp;
    int32_t* vp = out.vp;
    float* sk = out.sk;
    float* sv = out.sv;
    alignas(64) int16_t kc[kT][kIntMaxD], vc[kT][kIntMaxD];
    for (int64_t t = 0; t < kT; ++t) {
        if (t >= nt) {
            std::fill(kc[t], kc[t] + D, int16_t(0));
            std::fill(vc[t], vc[t] + D, int16_t(0));
            sk[t] = sv[t] = 0.0f;
            continue;
        }
        __m512 row[kIntMaxD / 16];
        const CacheRow krow = cache_row(k_cache, fmt, slots[t], Hkv, head, D);
        for (int64_t i = 0; i < D / 16; ++i) row[i] = load_row16(krow, 16 * i);
        sk[t] = round_row(row, D, kQkLevels, kc[t]);
        const CacheRow vrow = cache_row(v_cache, fmt, slots[t], Hkv, head, D);
        for (int64_t i = 0; i < D / 16; ++i) row[i] = load_row16(vrow, 16 * i);
        sv[t] = round_row(row, D, kPvLevels, vc[t]);
    }
    for (int64_t t0 = 0; t0 < kT; t0 += 16)
        for (int64_t p0 = 0; p0 < D / 2; p0 += 16) {  // 16 keys x 16 pairs, transposed
            __m512 r[16];
            for (int i = 0; i < 16; ++i) r[i] = _mm512_castsi512_ps(_mm512_load_si512(kc[t0 + i] + 2 * p0));
            transpose16(r);
            for (int j = 0; j < 16; ++j) _mm512_storeu_si512(kp + (p0 + j) * kT + t0, _mm512_castps_si512(r[j]));
        }
    const __m512i low = _mm512_set1_epi32(0xFFFF);
    for (int64_t j = 0; j < kT / 2; ++j)
        for (int64_t d = 0; d < D; d += 16) {
            const __m512i a = _mm512_cvtepi16_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(vc[2 * j] + d)));
            const __m512i b = _mm512_cvtepi16_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(vc[2 * j + 1] + d)));
            _mm512_storeu_si512(vp + j * D + d, _mm512_or_si512(_mm512_and_si512(a, low), _mm512_slli_epi32(b, 16)));
        }
}

// s[r * ld + 0..32) = q[r] . k[t] for R <= 12 rows from codes: qc [R][D] with scales sq, kp [D / 2][32]
// with scales sk.
template <int R>
inline void scores_codes(const int16_t* qc, const float* sq, int64_t D, const int32_t* kp, const float* sk, float* s,
                         int64_t ld) {
    __m512i a0[R], a1[R];
    for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm512_setzero_si512();
    const code_pair* qp = reinterpret_cast<const code_pair*>(qc);
    for (int64_t p = 0; p < D / 2; ++p) {
        const __m512i k0 = _mm512_loadu_si512(kp + p * kT), k1 = _mm512_loadu_si512(kp + p * kT + 16);
        for (int r = 0; r < R; ++r) {
            const __m512i qv = _mm512_set1_epi32(qp[r * D / 2 + p]);
            a0[r] = dpwssd(a0[r], qv, k0);
            a1[r] = dpwssd(a1[r], qv, k1);
        }
    }
    const __m512 s0 = _mm512_loadu_ps(sk), s1 = _mm512_loadu_ps(sk + 16);
    for (int r = 0; r < R; ++r) {
        const __m512 sr = _mm512_set1_ps(sq[r]);
        _mm512_storeu_ps(s + r * ld, _mm512_mul_ps(_mm512_cvtepi32_ps(a0[r]), _mm512_mul_ps(s0, sr)));
        _mm512_storeu_ps(s + r * ld + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(a1[r]), _mm512_mul_ps(s1, sr)));
    }
}

// o[r][d0 .. d0 + 16 NV) += the blocks' weighted values for R <= 6 rows: per block b, the code sums
// of pc[r * ld + 32 b ..] and the block's values (vp + b * vp_stride), times the row's block scale
// ps[r * ps_ld + b].
template <int R, int NV>
inline void accumulate_codes(const int16_t* pc, int64_t ld, const float* ps, int64_t ps_ld, const int32_t* vp,
                             int64_t vp_stride, int64_t D, int64_t d0, int64_t nblocks, float* o) {
    for (int64_t b = 0; b < nblocks; ++b) {
        __m512i acc[R][NV];
        for (int r = 0; r < R; ++r)
            for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_setzero_si512();
        const code_pair* pp = reinterpret_cast<const code_pair*>(pc + b * kT);
        const int32_t* vb = vp + b * vp_stride + d0;
        for (int64_t t2 = 0; t2 < kT / 2; ++t2) {
            __m512i vv[NV];
            for (int j = 0; j < NV; ++j) vv[j] = _mm512_loadu_si512(vb + t2 * D + 16 * j);
            for (int r = 0; r < R; ++r) {
                const __m512i pv = _mm512_set1_epi32(pp[r * ld / 2 + t2]);
                for (int j = 0; j < NV; ++j) acc[r][j] = dpwssd(acc[r][j], pv, vv[j]);
            }
        }
        for (int r = 0; r < R; ++r) {
            const __m512 scale = _mm512_set1_ps(ps[r * ps_ld + b]);
            for (int j = 0; j < NV; ++j) {
                float* out = o + r * D + d0 + 16 * j;
                _mm512_storeu_ps(out, _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][j]), scale, _mm512_loadu_ps(out)));
            }
        }
    }
}

template <int R>
inline void accumulate_codes_all(const int16_t* pc, int64_t ld, const float* ps, int64_t ps_ld, const int32_t* vp,
                                 int64_t vp_stride, int64_t D, int64_t nblocks, float* o) {
    int64_t d0 = 0;
    for (; d0 + 64 <= D; d0 += 64) accumulate_codes<R, 4>(pc, ld, ps, ps_ld, vp, vp_stride, D, d0, nblocks, o);
    for (; d0 < D; d0 += 16) accumulate_codes<R, 1>(pc, ld, ps, ps_ld, vp, vp_stride, D, d0, nblocks, o);
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

bool attend_rows_in_integers(int64_t D) { return decode_enabled() && D % 32 == 0 && D <= kIntMaxD; }

int64_t code_block_words(int64_t D) { return D * kT + 2 * kT; }

void prepare_codes(const AttentionCall& a, TeamScratch& ts) {
    const int64_t G = a.Hq / a.Hkv, words = code_block_words(a.D);
    const int64_t num_seqs = a.num_seqs;
#pragma omp single
    {
        ts.int_kv_off.assign(size_t(num_seqs), -1);
        std::vector<char> takes(size_t(num_seqs), 0);
        for (const AttentionTask& t : ts.tasks)
            if (t.nq * G > 3) takes[size_t(t.seq)] = 1;  // run_task's tasks of many rows
        int64_t total = 0;
        for (int64_t s = 0; s < num_seqs; ++s) {
            if (!takes[size_t(s)]) continue;
            ts.int_kv_off[size_t(s)] = total;
            total += a.Hkv * (a.kv_len[s] + kT - 1) / kT * words;
        }
        if (int64_t(ts.int_kv.size()) < total) ts.int_kv.resize(size_t(total));
    }
    // one item per (sequence, KV head, block of 32 keys)
    std::vector<int64_t> first(size_t(num_seqs) + 1, 0);
    int64_t items = 0;
    for (int64_t s = 0; s < num_seqs; ++s) {
        first[size_t(s)] = items;
        if (ts.int_kv_off[size_t(s)] >= 0) items += a.Hkv * ((a.kv_len[s] + kT - 1) / kT);
    }
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
        const int64_t s = std::upper_bound(first.begin(), first.begin() + num_seqs, it) - first.begin() - 1;
        const int64_t blocks = (a.kv_len[s] + kT - 1) / kT;
        const int64_t h = (it - first[size_t(s)]) / blocks, b = (it - first[size_t(s)]) % blocks;
        int32_t* base = ts.int_kv.data() + ts.int_kv_off[size_t(s)] + (h * blocks + b) * words;
        load_block_codes(a.slots + a.slot_off[s] + b * kT, std::min<int64_t>(kT, a.kv_len[s] - b * kT), a.k_cache,
                         a.v_cache, a.fmt, a.Hkv, h, a.D, CodeBlock(base, a.D));
    }
}

const int32_t* sequence_codes(const TeamScratch& ts, const AttentionTask& task, const int64_t* kv_len, int64_t D) {
    const int64_t blocks = (kv_len[task.seq] + kT - 1) / kT;
    return ts.int_kv.data() + ts.int_kv_off[size_t(task.seq)] + task.head * blocks * code_block_words(D);
}

void attend_rows_int(const int32_t* codes, int64_t k0, int64_t end, int64_t D, const float* q, int64_t R, int64_t G,
                     int64_t first_visible, float* s, float* o, float* mx, float* l) {
    constexpr int64_t kBlocks = kRowSeg / kT;
    const int64_t words = code_block_words(D);
    alignas(64) int16_t qc[12 * kIntMaxD], pc[12 * kRowSeg];
    float sq[12], ps[12 * kBlocks];
    for (int64_t t0 = k0; t0 < end; t0 += kRowSeg) {
        const int64_t ns = std::min<int64_t>(kRowSeg, end - t0);
        const int32_t* seg = codes + t0 / kT * words;
        auto block = [&](int64_t b) { return CodeBlock(const_cast<int32_t*>(seg + b * words), D); };
        for (int64_t r0 = 0; r0 < R; r0 += 12) {
            const int rows = int(std::min<int64_t>(12, R - r0));
            const int64_t seen = std::min(ns, first_visible + (r0 + rows - 1) / G - t0);
            if (seen <= 0) continue;
            const int64_t nblocks = (seen + kT - 1) / kT;
            for (int r = 0; r < rows; ++r) {
                __m512 row[kIntMaxD / 16];
                for (int64_t i = 0; i < D / 16; ++i) row[i] = _mm512_loadu_ps(q + (r0 + r) * D + 16 * i);
                sq[r] = round_row(row, D, kQkLevels, qc + r * D);
            }
            by_rows(rows, std::make_integer_sequence<int, 12>{}, [&](auto n) {
                for (int64_t b = 0; b < nblocks; ++b) {
                    const CodeBlock cb = block(b);
                    scores_codes<decltype(n)::value>(qc, sq, D, cb.kp, cb.sk, s + b * kT, kRowSeg);
                }
            });
            softmax_segment(s, kRowSeg, mx + r0, l + r0, o + r0 * D, rows, G, first_visible, t0, seen, D, r0);
            for (int r = 0; r < rows; ++r)  // the weights times the values' scales, as codes per block
                for (int64_t b = 0; b < nblocks; ++b) {
                    const float* sv = block(b).sv;
                    __m512 w[2];
                    for (int h = 0; h < 2; ++h)
                        w[h] = _mm512_mul_ps(_mm512_loadu_ps(s + r * kRowSeg + b * kT + 16 * h), _mm512_loadu_ps(sv + 16 * h));
                    ps[r * kBlocks + b] = round_row(w, kT, kPvLevels, pc + r * kRowSeg + b * kT);
                }
            for (int64_t r1 = 0; r1 < rows; r1 += 6)
                by_rows(int(std::min<int64_t>(6, rows - r1)), std::make_integer_sequence<int, 6>{}, [&](auto n) {
                    accumulate_codes_all<decltype(n)::value>(pc + r1 * kRowSeg, kRowSeg, ps + r1 * kBlocks, kBlocks,
                                                             seg + D / 2 * kT, words, D, nblocks, o + (r0 + r1) * D);
                });
        }
    }
}

}  // namespace plait::avx512
