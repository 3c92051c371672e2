// Attention over the KV pool in place: every query sequence reads its keys and values through its
// list of slots (a req_to_token row, or a shared prefix), a block of 32 at a time, with an online
// softmax; nothing is gathered into per-request copies.
//
// Work is split into tasks of (sequence, KV heads, block of query rows, range of keys). The G query
// heads that read one KV head are rows of the same task, so each key is loaded once for all of
// them. Sequences with few query rows (decode) and long KV are split along the keys as well, so
// that a single request still keeps every thread busy; their partial results are merged through
// their log-sum-exps at the end (flash-decoding).
//
// Two ways through a block: tasks with many query rows (prefill, extend) convert it to float32 in
// cache, keys transposed, and run register-blocked products over it; decode tasks (one query token,
// G <= 3) cover all KV heads and read each key's rows in place, converting in registers, since the
// copy would cost more than the few products it feeds (decode at 4,000 tokens of context: 24.4 ms
// of attention per 30-layer step before, 13.6 ms after, on the 2-core machine of docs/benchmarks.md).
// Decode tasks go through their keys a segment of 256 at a time: all its scores, one softmax step,
// then its values (see blocks_direct).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "team.h"

#pragma GCC target("avx2,fma,f16c")

#include "simd_avx2.h"

namespace plait::avx2 {
namespace {

constexpr int kT = 32;         // keys per block
// Query rows (query tokens x heads of one KV head) per task: tasks of many rows on the vector units
// convert each segment of keys they read, so more rows a task convert the keys fewer times (a
// 512-token chunk over 4,096 keys: 9% faster with 192 rows than with 96; 384 rows left too few tasks
// for a 512-token prompt). Tasks on AMX tiles and decode tasks' heads keep 96.
constexpr int kMaxRows = 192;
constexpr int kTaskRows = 96;
constexpr int64_t kMinChunk = 128;  // fewest keys in one chunk of a split sequence
constexpr int64_t kSeg = 256;       // keys per segment of a decode task (a multiple of kT; 128 was slower, 512 no faster)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Scratch {
    std::vector<float> q, o, s, kt, v, mx, l, seg;
    void reserve(int64_t rows, int64_t D) {
        if (int64_t(seg.size()) < rows * kSeg) seg.resize(rows * kSeg);
        if (int64_t(q.size()) < rows * D) {
            q.resize(rows * D);
            o.resize(rows * D);
        }
        if (int64_t(s.size()) < std::max(rows * kT, 12 * kSeg)) s.resize(std::max(rows * kT, 12 * kSeg));
        if (int64_t(kt.size()) < D * kSeg) {  // a segment of keys (attention_avx512.cpp's tasks of many rows)
            kt.resize(D * kSeg);
            v.resize(D * kSeg);
        }
        if (int64_t(mx.size()) < rows) {
            mx.resize(rows);
            l.resize(rows);
        }
    }
};

inline void transpose8(__m256 r[8]) {
    __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
    r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
    r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
    r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
    r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// Keys t of the block as columns kt[d][t] and values as rows v[t][d], float32; columns and rows
// past `nt` are zero.
inline void load_block_kv(const int64_t* slots, int64_t nt, const void* k_cache, const void* v_cache, int fmt,
                          int64_t Hkv, int64_t head, int64_t D, float* kt, float* v) {
    const __m256 zero = _mm256_setzero_ps();
    for (int64_t t0 = 0; t0 < kT; t0 += 8) {
        CacheRow krow[8], vrow[8];
        bool live[8];
        for (int i = 0; i < 8; ++i) {
            live[i] = t0 + i < nt;
            if (live[i]) {
                krow[i] = cache_row(k_cache, fmt, slots[t0 + i], Hkv, head, D);
                vrow[i] = cache_row(v_cache, fmt, slots[t0 + i], Hkv, head, D);
            }
        }
        for (int64_t d0 = 0; d0 < D; d0 += 8) {
            __m256 r[8];
            for (int i = 0; i < 8; ++i) {
                if (!live[i]) {
                    r[i] = zero;
                    _mm256_storeu_ps(v + (t0 + i) * D + d0, zero);
                } else {
                    r[i] = load_row8(krow[i], d0);
                    _mm256_storeu_ps(v + (t0 + i) * D + d0, load_row8(vrow[i], d0));
                }
            }
            transpose8(r);
            for (int i = 0; i < 8; ++i) _mm256_storeu_ps(kt + (d0 + i) * kT + t0, r[i]);
        }
    }
}

// s[r][0..32) = q[r] . k[t] for up to 3 rows.
template <int R>
inline void scores_rows(const float* q, int64_t D, const float* kt, float* s) {
    __m256 acc[R][4];
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
        const float* kd = kt + d * kT;
        __m256 k0 = _mm256_loadu_ps(kd), k1 = _mm256_loadu_ps(kd + 8), k2 = _mm256_loadu_ps(kd + 16),
               k3 = _mm256_loadu_ps(kd + 24);
        for (int r = 0; r < R; ++r) {
            __m256 qv = _mm256_broadcast_ss(q + r * D + d);
            acc[r][0] = _mm256_fmadd_ps(qv, k0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(qv, k1, acc[r][1]);
            acc[r][2] = _mm256_fmadd_ps(qv, k2, acc[r][2]);
            acc[r][3] = _mm256_fmadd_ps(qv, k3, acc[r][3]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < 4; ++j) _mm256_storeu_ps(s + r * kT + 8 * j, acc[r][j]);
}

// o[r][d0..d0+16) += sum_t p[r][t] v[t][d0..d0+16) for up to 6 rows.
template <int R>
inline void accumulate_rows(const float* p, const float* v, int64_t D, int64_t nt, float* o) {
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
        __m256 acc[R][2];
        for (int r = 0; r < R; ++r) {
            acc[r][0] = _mm256_loadu_ps(o + r * D + d0);
            acc[r][1] = _mm256_loadu_ps(o + r * D + d0 + 8);
        }
        for (int64_t t = 0; t < nt; ++t) {
            __m256 v0 = _mm256_loadu_ps(v + t * D + d0), v1 = _mm256_loadu_ps(v + t * D + d0 + 8);
            for (int r = 0; r < R; ++r) {
                __m256 pv = _mm256_broadcast_ss(p + r * kT + t);
                acc[r][0] = _mm256_fmadd_ps(pv, v0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(pv, v1, acc[r][1]);
            }
        }
        for (int r = 0; r < R; ++r) {
            _mm256_storeu_ps(o + r * D + d0, acc[r][0]);
            _mm256_storeu_ps(o + r * D + d0 + 8, acc[r][1]);
        }
    }
}

// ---- Decode: few query rows read the pool's K/V rows in place (no float32 block copy) ----
//
// With one query token per task (R = G rows, 3 for SmolLM2) the block copy above costs more than the
// products it feeds: its transposes are many shuffles per key for only 24 FMAs. Here each key's row
// is converted to float32 in registers where it is used: scores as four keys' dot products at a
// time reduced by horizontal adds, values added to the output 16 dims at a time.

// Row values d .. d + 8 as float32 before the row's scale (int8 codes as integers).
template <int FMT>
inline __m256 load_raw8(const uint8_t* row, int64_t d) {
    if constexpr (FMT == kCacheBF16) return load_bf16(reinterpret_cast<const uint16_t*>(row) + d);
    else if constexpr (FMT == kCacheF16) return load_f16(reinterpret_cast<const uint16_t*>(row) + d);
    else if constexpr (FMT == kCacheI8)
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + d))));
    else return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + d);
}

// Where keys t0 .. t0 + kT of the task's first KV head start in the pool (rows past the block's end
// repeat its last row: their scores are masked and their weights 0).
inline void block_rows(const int64_t* slots, int64_t nt, const uint8_t* base, int64_t slot_bytes,
                       const uint8_t* rows[kT]) {
    for (int64_t t = 0; t < kT; ++t) rows[t] = base + slots[std::min<int64_t>(t, nt - 1)] * slot_bytes;
}

// Scales of the rows of one head `off` bytes past the task's first (int8 pools: each row's float32
// after its codes).
inline void head_scales(const uint8_t* const rows[kT], int64_t off, int64_t D, float scales[kT]) {
    for (int64_t t = 0; t < kT; ++t) std::memcpy(&scales[t], rows[t] + off + D, sizeof(float));
}

// s[r * ld + t] = q[r] . k[t] for the block's keys (rows `off` bytes past `rows`; four at a time), R <= 3 rows.
template <int R, int FMT>
inline void scores_direct(const float* q, int64_t D, const uint8_t* const rows[kT], int64_t off, const float scales[kT],
                          float* s, int64_t ld, LinesAhead& ahead) {
    for (int64_t t = 0; t < kT; t += 4) {
        __m256 acc[R][4];
        for (int r = 0; r < R; ++r)
            for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) {
            ahead.read();
            for (int j = 0; j < 4; ++j) {
                const __m256 k = load_raw8<FMT>(rows[t + j] + off, d);
                for (int r = 0; r < R; ++r) acc[r][j] = _mm256_fmadd_ps(_mm256_loadu_ps(q + r * D + d), k, acc[r][j]);
            }
        }
        const __m128 sc = _mm_loadu_ps(scales + t);
        for (int r = 0; r < R; ++r) {
            const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[r][0], acc[r][1]), _mm256_hadd_ps(acc[r][2], acc[r][3]));
            __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
            if constexpr (FMT == kCacheI8) s4 = _mm_mul_ps(s4, sc);
            _mm_storeu_ps(s + r * ld + t, s4);
        }
    }
}

// o[r] += sum_t p[r][t] v[t] over the block's first nt keys, R <= 3 rows: for 3 rows 32 dims at a
// time (12 chains of FMAs); else 16 dims at a time, even and odd keys adding into separate
// accumulators, so that 4 R chains run side by side.
template <int R, int FMT>
inline void accumulate_direct(const float* p, int64_t ld, const uint8_t* const rows[kT], int64_t off,
                              const float scales[kT], int64_t D, int64_t nt, float* o, LinesAhead& ahead) {
    // p (rows ld apart; 0 past nt: those keys are masked) with each value row's scale folded in for int8 pools
    alignas(32) float scaled[FMT == kCacheI8 ? R : 1][kT];
    const float* w[R];
    for (int r = 0; r < R; ++r) w[r] = p + r * ld;
    if constexpr (FMT == kCacheI8) {
        for (int r = 0; r < R; ++r) {
            for (int64_t t = 0; t < kT; t += 8)
                _mm256_store_ps(&scaled[r][t], _mm256_mul_ps(_mm256_loadu_ps(p + r * ld + t), _mm256_loadu_ps(scales + t)));
            w[r] = scaled[r];
        }
    }
    if constexpr (R == 3) {
        if (D % 32 == 0) {  // 32 dims a pass: 12 accumulators, each weight broadcast once a pass
            for (int64_t d0 = 0; d0 < D; d0 += 32) {
                __m256 acc[3][4];
                for (int r = 0; r < 3; ++r)
                    for (int c = 0; c < 4; ++c) acc[r][c] = _mm256_loadu_ps(o + r * D + d0 + 8 * c);
                for (int64_t t = 0; t < nt; ++t) {
                    ahead.read();
                    const __m256 p0 = _mm256_broadcast_ss(&w[0][t]), p1 = _mm256_broadcast_ss(&w[1][t]),
                                 p2 = _mm256_broadcast_ss(&w[2][t]);
                    for (int c = 0; c < 4; ++c) {
                        const __m256 v = load_raw8<FMT>(rows[t] + off, d0 + 8 * c);
                        acc[0][c] = _mm256_fmadd_ps(p0, v, acc[0][c]);
                        acc[1][c] = _mm256_fmadd_ps(p1, v, acc[1][c]);
                        acc[2][c] = _mm256_fmadd_ps(p2, v, acc[2][c]);
                    }
                }
                for (int r = 0; r < 3; ++r)
                    for (int c = 0; c < 4; ++c) _mm256_storeu_ps(o + r * D + d0 + 8 * c, acc[r][c]);
            }
            return;
        }
    }
    const int64_t n2 = (nt + 1) / 2 * 2;  // an odd count reads one more row (the last, repeated) with weight 0
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
        __m256 even[R][2], odd[R][2];
        for (int r = 0; r < R; ++r) {
            even[r][0] = _mm256_loadu_ps(o + r * D + d0);
            even[r][1] = _mm256_loadu_ps(o + r * D + d0 + 8);
            odd[r][0] = odd[r][1] = _mm256_setzero_ps();
        }
        for (int64_t t = 0; t < n2; t += 2) {
            ahead.read();
            __m256 v0 = load_raw8<FMT>(rows[t] + off, d0), v1 = load_raw8<FMT>(rows[t] + off, d0 + 8);
            for (int r = 0; r < R; ++r) {
                const __m256 pv = _mm256_broadcast_ss(&w[r][t]);
                even[r][0] = _mm256_fmadd_ps(pv, v0, even[r][0]);
                even[r][1] = _mm256_fmadd_ps(pv, v1, even[r][1]);
            }
            v0 = load_raw8<FMT>(rows[t + 1] + off, d0);
            v1 = load_raw8<FMT>(rows[t + 1] + off, d0 + 8);
            for (int r = 0; r < R; ++r) {
                const __m256 pv = _mm256_broadcast_ss(&w[r][t + 1]);
                odd[r][0] = _mm256_fmadd_ps(pv, v0, odd[r][0]);
                odd[r][1] = _mm256_fmadd_ps(pv, v1, odd[r][1]);
            }
        }
        for (int r = 0; r < R; ++r) {
            _mm256_storeu_ps(o + r * D + d0, _mm256_add_ps(even[r][0], odd[r][0]));
            _mm256_storeu_ps(o + r * D + d0 + 8, _mm256_add_ps(even[r][1], odd[r][1]));
        }
    }
}

struct Args {
    const float* q;
    int64_t q_row_stride;
    const int64_t *q_rows, *q_off, *q_len, *slots, *slot_off, *kv_len;
    bool causal;
    const void *k_cache, *v_cache;
    int fmt;
    int64_t Hq, Hkv, D, G;
    float scale;
    float *out, *lse;
    const RopeStore* rope;  // decode only: rotate q here and store each new token's K/V (see kernels.h)
};

// x (D floats) rotated in place: [x1 cos - x2 sin, x2 cos + x1 sin] over its two halves.
inline void rotate_half_split(float* x, const float* cs, int64_t half) {
    for (int64_t i = 0; i < half; i += 8) {
        __m256 c = _mm256_loadu_ps(cs + i), sn = _mm256_loadu_ps(cs + half + i);
        __m256 x1 = _mm256_loadu_ps(x + i), x2 = _mm256_loadu_ps(x + half + i);
        _mm256_storeu_ps(x + i, _mm256_fmsub_ps(x1, c, _mm256_mul_ps(x2, sn)));
        _mm256_storeu_ps(x + half + i, _mm256_fmadd_ps(x2, c, _mm256_mul_ps(x1, sn)));
    }
}

// exp(x) for x <= 0 (or -inf: 0), as softmax weights need it, in fewer steps than exp_ps: n = round(x
// log2 e) comes from adding 1.5 * 2^23 + 127 (the sum's low bits then hold n + 127, the exponent of 2^n
// once shifted in place: no round or convert instructions), and exp of the remainder |r| <= ln2 / 2 by
// its Taylor polynomial to degree 6 (relative error ~1e-7, below the pool's float16 rounding of the
// keys by far).
PLAIT_INLINE __m256 exp_neg_ps(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.0f);  // exp(-87) is still normal: n + 127 >= 1
    const __m256 magic = _mm256_set1_ps(12582912.0f + 127.0f);
    const __m256 xc = _mm256_max_ps(x, lo);
    const __m256 t = _mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504088896341f), magic);
    const __m256 n = _mm256_sub_ps(t, magic);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t), 23));
    // below the clamp (masked keys among them) the weight is 0
    return _mm256_and_ps(_mm256_mul_ps(p, scale), _mm256_cmp_ps(x, lo, _CMP_GE_OQ));
}

// The online softmax over one block of scores: sp[r][0..nt) become the block's weights (0 past the
// keys row r sees), and each row's running max, sum and output are rescaled to the new max.
struct BlockSoftmax {
    int64_t R, G, first_visible;  // query row r sees keys [0, first_visible + r / G)
    float *sp, *mx, *l, *o;
    int64_t D;

    // The same softmax for rows r0 .. of this one (their own scores, maxima, sums and outputs).
    BlockSoftmax rows_from(int64_t r0, int64_t n) const {
        return {n, G, first_visible, sp + r0 * kT, mx + r0, l + r0, o + r0 * D, D};
    }

    void update(int64_t t0, int64_t nt) const {
        for (int64_t r = 0; r < R; ++r) {
            float* sr = sp + r * kT;
            const int64_t limit = std::min(nt, first_visible + r / G - t0);  // visible keys of this block
            if (limit <= 0) {  // no visible key in this block: weight 0 everywhere
                std::fill(sr, sr + kT, 0.0f);
                continue;
            }
            for (int64_t t = limit; t < kT; ++t) sr[t] = kNegInf;
            __m256 m4 = _mm256_max_ps(_mm256_max_ps(_mm256_loadu_ps(sr), _mm256_loadu_ps(sr + 8)),
                                      _mm256_max_ps(_mm256_loadu_ps(sr + 16), _mm256_loadu_ps(sr + 24)));
            const float m_new = std::max(mx[r], hmax(m4));
            const float alpha = m_new == mx[r] ? 1.0f : std::exp(mx[r] - m_new);  // 0 for the first visible block
            const __m256 mv = _mm256_set1_ps(m_new);
            __m256 sum = _mm256_setzero_ps();
            for (int j = 0; j < kT; j += 8) {
                __m256 p = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(sr + j), mv));
                _mm256_storeu_ps(sr + j, p);
                sum = _mm256_add_ps(sum, p);
            }
            l[r] = l[r] * alpha + hsum(sum);
            mx[r] = m_new;
            if (alpha != 1.0f) {
                const __m256 av = _mm256_set1_ps(alpha);
                for (int64_t d = 0; d < D; d += 8)
                    _mm256_storeu_ps(o + r * D + d, _mm256_mul_ps(_mm256_loadu_ps(o + r * D + d), av));
            }
        }
    }

    // The same over a segment of n keys from t0 whose scores are s[r * ld + 0 .. n), n rounded up to
    // whole blocks (the rest masked here): one maximum, one rescale and one run of exps per row for
    // the whole segment, a loop without a chain from one block to the next.
    void update_segment(float* s, int64_t ld, int64_t t0, int64_t n) const {
        const int64_t padded = (n + kT - 1) / kT * kT;
        for (int64_t r = 0; r < R; ++r) {
            float* sr = s + r * ld;
            const int64_t limit = std::min(n, first_visible + r / G - t0);  // visible keys of this segment
            if (limit <= 0) {
                std::fill(sr, sr + padded, 0.0f);
                continue;
            }
            for (int64_t t = limit; t < padded; ++t) sr[t] = kNegInf;
            __m256 m0 = _mm256_loadu_ps(sr), m1 = _mm256_loadu_ps(sr + 8), m2 = _mm256_loadu_ps(sr + 16),
                   m3 = _mm256_loadu_ps(sr + 24);
            for (int64_t t = kT; t < padded; t += kT) {
                m0 = _mm256_max_ps(m0, _mm256_loadu_ps(sr + t));
                m1 = _mm256_max_ps(m1, _mm256_loadu_ps(sr + t + 8));
                m2 = _mm256_max_ps(m2, _mm256_loadu_ps(sr + t + 16));
                m3 = _mm256_max_ps(m3, _mm256_loadu_ps(sr + t + 24));
            }
            const float m_new = std::max(mx[r], hmax(_mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3))));
            const float alpha = m_new == mx[r] ? 1.0f : std::exp(mx[r] - m_new);  // 0 for the first visible segment
            const __m256 mv = _mm256_set1_ps(m_new);
            __m256 sum0 = _mm256_setzero_ps(), sum1 = _mm256_setzero_ps();
            for (int64_t t = 0; t < padded; t += 16) {
                const __m256 p0 = exp_neg_ps(_mm256_sub_ps(_mm256_loadu_ps(sr + t), mv));
                const __m256 p1 = exp_neg_ps(_mm256_sub_ps(_mm256_loadu_ps(sr + t + 8), mv));
                _mm256_storeu_ps(sr + t, p0);
                _mm256_storeu_ps(sr + t + 8, p1);
                sum0 = _mm256_add_ps(sum0, p0);
                sum1 = _mm256_add_ps(sum1, p1);
            }
            l[r] = l[r] * alpha + hsum(_mm256_add_ps(sum0, sum1));
            mx[r] = m_new;
            if (alpha != 1.0f) {
                const __m256 av = _mm256_set1_ps(alpha);
                for (int64_t d = 0; d < D; d += 8)
                    _mm256_storeu_ps(o + r * D + d, _mm256_mul_ps(_mm256_loadu_ps(o + r * D + d), av));
            }
        }
    }
};

// The keys k0 .. end of a decode task, read in place, a segment of kSeg keys at a time in two sweeps:
// first every score of the segment (per block, each of the task's KV heads in turn, R rows a head,
// rows of head hh after those of head hh - 1), then one softmax step per row for the whole segment,
// then the values. Per block of 32 keys the online softmax's maximum, rescale and sums were a chain
// of dependent steps between the products that the core could not overlap; per segment they are
// few, and the exps run as one long loop. Each sweep reads one pool, asking for the next block's
// lines (or the other pool's first block's) meanwhile. The products themselves are near what Zen 1
// can do with float16 rows (each 8 values: one conversion, 3 FMAs per query row group): of ~100
// cycles per key and KV head, ~45 are the scores, ~39 the values, ~10 the softmax.
template <int R, int FMT>
void blocks_direct(const Args& a, const AttentionTask& task, const int64_t* slots, int64_t end, const float* qs,
                   const BlockSoftmax& sm, float* seg_scores) {
    const int64_t D = a.D, row_bytes = cache_row_bytes(FMT, D), slot_bytes = a.Hkv * row_bytes;
    const int64_t span = task.nh * row_bytes;  // bytes of a key's rows of the task's heads, adjacent in the pool
    const uint8_t* kbase = static_cast<const uint8_t*>(a.k_cache) + task.head * row_bytes;
    const uint8_t* vbase = static_cast<const uint8_t*>(a.v_cache) + task.head * row_bytes;
    // Blocks in the order the sweeps read them: segment by segment, its K blocks then its V blocks;
    // block i's lines are read during block i - 1.
    const int64_t seg_blocks = kSeg / kT, num_segs = (end - task.k0 + kSeg - 1) / kSeg;
    const int64_t num_blocks = num_segs * 2 * seg_blocks;
    auto block = [&](int64_t i, int64_t& t0, int64_t& nt, int& pass) {  // false past the last
        const int64_t seg = i / (2 * seg_blocks), in_seg = i % (2 * seg_blocks);
        t0 = task.k0 + seg * kSeg + in_seg % seg_blocks * kT;
        nt = std::min<int64_t>(kT, std::min(end, task.k0 + (seg + 1) * kSeg) - t0);
        pass = in_seg < seg_blocks ? 0 : 1;
        return i < num_blocks && nt > 0;
    };
    const uint8_t* rows_a[kT];
    const uint8_t* rows_b[kT];
    const uint8_t** rows = rows_a;  // this block's rows (of the task's first head)
    const uint8_t** next = rows_b;  // the next block's, read ahead
    float scale[kT];
    LinesAhead ahead;
    int64_t t0, nt;
    int pass;
    block(0, t0, nt, pass);
    block_rows(slots + t0, nt, kbase, slot_bytes, rows);
    ahead.plan(rows, nt, span);
    ahead.read_rest();  // the first block has no block before it to hide its reads
    for (int64_t i = 0; i < num_blocks;) {
        int64_t j = i + 1, t1 = 0, n1 = 0;
        int pass1 = 0;
        while (j < num_blocks && !block(j, t1, n1, pass1)) ++j;  // a short last segment skips empty blocks
        const bool more = j < num_blocks;
        if (more) block_rows(slots + t1, n1, pass1 == 0 ? kbase : vbase, slot_bytes, next);
        ahead.plan(next, more ? n1 : 0, span);
        const int64_t s0 = task.k0 + (t0 - task.k0) / kSeg * kSeg;
        for (int64_t hh = 0; hh < task.nh; ++hh) {
            const int64_t off = hh * row_bytes;
            if constexpr (FMT == kCacheI8) head_scales(rows, off, D, scale);
            float* sp = seg_scores + hh * R * kSeg + (t0 - s0);
            if (pass == 0) scores_direct<R, FMT>(qs + hh * R * D, D, rows, off, scale, sp, kSeg, ahead);
            else accumulate_direct<R, FMT>(sp, kSeg, rows, off, scale, D, nt, sm.o + hh * R * D, ahead);
        }
        ahead.read_rest();
        if (pass == 0 && (!more || pass1 == 1)) {  // a segment's last K block: its softmax before its values
            const int64_t s1 = std::min(end, s0 + kSeg);
            for (int64_t hh = 0; hh < task.nh; ++hh)
                sm.rows_from(hh * R, R).update_segment(seg_scores + hh * R * kSeg, kSeg, s0, s1 - s0);
        }
        std::swap(rows, next);
        i = j;
        t0 = t1;
        nt = n1;
        pass = pass1;
    }
}

// Query token (index in the task) and query head of row r of a task: rows run over the G heads of
// each query token, then (decode tasks over several KV heads, one token) over the KV heads.
inline void task_row(const AttentionTask& task, int64_t G, int64_t r, int64_t& token, int64_t& head) {
    token = task.nh == 1 ? r / G : 0;
    head = task.head * G + (task.nh == 1 ? r % G : r);
}

// codes: the task's (sequence, KV head) as integer codes (avx512::sequence_codes) where it runs on them.
void run_task(const Args& a, const AttentionTask& task, Scratch& sc, float* partial_o, float* partial_m, float* partial_l,
              const int32_t* codes) {
    const int64_t D = a.D, G = a.G, R = task.nq * G * task.nh, head_rows = task.nq * G;
    const int64_t s = task.seq, kv_len = a.kv_len[s], q_len = a.q_len[s];
    float *qs = sc.q.data(), *o = sc.o.data(), *sp = sc.s.data(), *mx = sc.mx.data(), *l = sc.l.data();
    // The task's query rows (see task_row), pre-scaled: each token's nh * G heads are adjacent in q.
    const __m256 scale = _mm256_set1_ps(a.scale);
    const int64_t width = task.nh * G * D;
    for (int64_t i = 0; i < task.nq; ++i) {
        const int64_t row = a.q_rows[a.q_off[s] + task.q0 + i];
        const float* src = a.q + row * a.q_row_stride + task.head * G * D;
        if (a.rope != nullptr) {  // the query as it comes out of the QKV product: rotate our copy
            const float* cs = a.rope->table + a.rope->positions[row] * D;
            std::copy(src, src + width, qs + i * width);
            for (int64_t g = 0; g < task.nh * G; ++g) rotate_half_split(qs + i * width + g * D, cs, D / 2);
            src = qs + i * width;
        }
        for (int64_t e = 0; e < width; e += 8)
            _mm256_storeu_ps(qs + i * width + e, _mm256_mul_ps(_mm256_loadu_ps(src + e), scale));
        if (a.rope != nullptr && a.rope->k_cache != nullptr && task.k1 == kv_len) {
            // The task that reads the sequence's newest key (it reads it below, after this store)
            // rotates and stores its KV heads' new K and V; no other task reads them this step.
            const RopeStore& r = *a.rope;
            for (int64_t h = task.head; h < task.head + task.nh; ++h) {
                alignas(32) float k[256];
                std::copy(r.k + row * r.kv_stride + h * D, r.k + row * r.kv_stride + (h + 1) * D, k);
                rotate_half_split(k, r.table + r.positions[row] * D, D / 2);
                store_row(r.k_cache, a.fmt, r.loc[row], a.Hkv, h, D, k);
                store_row(r.v_cache, a.fmt, r.loc[row], a.Hkv, h, D, r.v + row * r.kv_stride + h * D);
            }
        }
    }
    std::fill(o, o + R * D, 0.0f);
    std::fill(mx, mx + R, kNegInf);
    std::fill(l, l + R, 0.0f);
    // Query token i sees keys [0, visible0 + i) (all when not causal).
    const int64_t visible0 = a.causal ? kv_len - q_len + 1 : kv_len;
    const int64_t last_visible = std::min(kv_len, visible0 + task.q0 + task.nq - 1);
    const int64_t* slots = a.slots + a.slot_off[s];
    const int64_t end = std::min(task.k1, last_visible);
    const BlockSoftmax sm{R, G, visible0 + task.q0, sp, mx, l, o, D};
    if (head_rows <= 3 && avx512::enabled() && D % 16 == 0) {  // as below, in 512-bit registers
        avx512::decode_attention({slots, task.k0, end, task.head, task.nh, head_rows, G, visible0 + task.q0, D, a.Hkv,
                                  a.fmt, a.k_cache, a.v_cache, qs, o, mx, l, sc.seg.data()});
    } else if (head_rows <= 3) {
        switch (a.fmt * 4 + int(head_rows)) {
#define PLAIT_DIRECT(F, RR) \
    case F * 4 + RR: blocks_direct<RR, F>(a, task, slots, end, qs, sm, sc.seg.data()); break;
            PLAIT_DIRECT(kCacheF32, 1) PLAIT_DIRECT(kCacheF32, 2) PLAIT_DIRECT(kCacheF32, 3)
            PLAIT_DIRECT(kCacheBF16, 1) PLAIT_DIRECT(kCacheBF16, 2) PLAIT_DIRECT(kCacheBF16, 3)
            PLAIT_DIRECT(kCacheF16, 1) PLAIT_DIRECT(kCacheF16, 2) PLAIT_DIRECT(kCacheF16, 3)
            PLAIT_DIRECT(kCacheI8, 1) PLAIT_DIRECT(kCacheI8, 2) PLAIT_DIRECT(kCacheI8, 3)
#undef PLAIT_DIRECT
        }
    } else if (codes != nullptr) {  // one KV head, on integer codes
        avx512::attend_rows_int(codes, task.k0, end, D, qs, R, G, visible0 + task.q0, sp, o, mx, l);
    } else if (avx512::enabled() && D % 16 == 0) {  // one KV head, as below, in 512-bit registers
        avx512::attend_rows(slots, task.k0, end, a.k_cache, a.v_cache, a.fmt, a.Hkv, task.head, D, qs, R, G,
                            visible0 + task.q0, sc.kt.data(), sc.v.data(), sp, o, mx, l);
    } else {  // one KV head (the planner's contract for more than 3 rows per head)
        for (int64_t t0 = task.k0; t0 < end; t0 += kT) {
            const int64_t nt = std::min<int64_t>(kT, task.k1 - t0);
            load_block_kv(slots + t0, nt, a.k_cache, a.v_cache, a.fmt, a.Hkv, task.head, D, sc.kt.data(), sc.v.data());
            for (int64_t r0 = 0; r0 < R; r0 += 3) {
                switch (std::min<int64_t>(3, R - r0)) {
                    case 1: scores_rows<1>(qs + r0 * D, D, sc.kt.data(), sp + r0 * kT); break;
                    case 2: scores_rows<2>(qs + r0 * D, D, sc.kt.data(), sp + r0 * kT); break;
                    default: scores_rows<3>(qs + r0 * D, D, sc.kt.data(), sp + r0 * kT); break;
                }
            }
            sm.update(t0, nt);
            for (int64_t r0 = 0; r0 < R; r0 += 6) {
                const float* pr = sp + r0 * kT;
                float* orow = o + r0 * D;
                switch (std::min<int64_t>(6, R - r0)) {
                    case 1: accumulate_rows<1>(pr, sc.v.data(), D, nt, orow); break;
                    case 2: accumulate_rows<2>(pr, sc.v.data(), D, nt, orow); break;
                    case 3: accumulate_rows<3>(pr, sc.v.data(), D, nt, orow); break;
                    case 4: accumulate_rows<4>(pr, sc.v.data(), D, nt, orow); break;
                    case 5: accumulate_rows<5>(pr, sc.v.data(), D, nt, orow); break;
                    default: accumulate_rows<6>(pr, sc.v.data(), D, nt, orow); break;
                }
            }
        }
    }
    if (task.partial >= 0) {
        std::copy(o, o + R * D, partial_o + task.partial * kMaxRows * D);
        std::copy(mx, mx + R, partial_m + task.partial * kMaxRows);
        std::copy(l, l + R, partial_l + task.partial * kMaxRows);
        return;
    }
    for (int64_t r = 0; r < R; ++r) {
        int64_t token, head;
        task_row(task, G, r, token, head);
        const int64_t row = a.q_rows[a.q_off[s] + task.q0 + token];
        float* dst = a.out + (row * a.Hq + head) * D;
        const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
        const __m256 iv = _mm256_set1_ps(inv);
        for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(dst + d, _mm256_mul_ps(_mm256_loadu_ps(o + r * D + d), iv));
        if (a.lse) a.lse[row * a.Hq + head] = l[r] > 0.0f ? mx[r] + std::log(l[r]) : kNegInf;
    }
}

}  // namespace

// Splits the work into tasks (see the top of the file); run by one thread.
void plan_attention(const int64_t* q_len, const int64_t* kv_len, int64_t num_seqs, int64_t Hq, int64_t Hkv,
                    int64_t D, int nthreads, TeamScratch& ts, bool amx_tasks) {
    const int64_t G = Hq / Hkv;
    const int64_t rows_per_task = std::max<int64_t>(1, (amx_tasks ? kTaskRows : kMaxRows) / G);
    // KV heads per task: all of them for decode (one query token, at most 3 heads per KV head: read in
    // place, one task then reads each key's rows of every head, adjacent in the pool), else one.
    auto heads_per_task = [&](int64_t s) { return q_len[s] == 1 && G <= 3 ? std::min(Hkv, kTaskRows / G) : int64_t(1); };
    // Tasks without splitting the keys first; then split the keys of short-query sequences until
    // there are a few tasks per thread.
    int64_t base_tasks = 0;
    for (int64_t s = 0; s < num_seqs; ++s) {
        const int64_t nh = heads_per_task(s);
        base_tasks += (Hkv + nh - 1) / nh * ((q_len[s] + rows_per_task - 1) / rows_per_task);
    }
    // One sequence splits evenly: a chunk per thread (each chunk's first block is read before any
    // arithmetic hides it, so fewer chunks are faster). Several, of different lengths, balance only
    // with more, smaller tasks.
    const int64_t want = (num_seqs == 1 ? 1 : 4) * int64_t(nthreads);
    ts.tasks.clear();
    ts.splits.clear();
    int64_t num_partials = 0;
    for (int64_t s = 0; s < num_seqs; ++s) {
        int64_t chunks = 1;
        if (q_len[s] * G <= 16 && base_tasks < want) {
            const int64_t per = (want + base_tasks - 1) / base_tasks;
            chunks = std::max<int64_t>(1, std::min(per, kv_len[s] / kMinChunk));
        }
        const int64_t chunk_len = ((kv_len[s] + chunks - 1) / chunks + kT - 1) / kT * kT;
        const int64_t heads = heads_per_task(s);
        for (int64_t h = 0; h < Hkv; h += heads) {
            const int64_t nh = std::min(heads, Hkv - h);
            for (int64_t q0 = 0; q0 < q_len[s]; q0 += rows_per_task) {
                const int64_t nq = std::min(rows_per_task, q_len[s] - q0);
                if (chunks == 1) {
                    ts.tasks.push_back({s, h, nh, q0, nq, 0, kv_len[s], -1});
                    continue;
                }
                // chunked sequences have a single block of query rows (q_len * G <= 16 rows)
                ts.splits.push_back({s, h, nh, num_partials, 0});
                for (int64_t k0 = 0; k0 < kv_len[s]; k0 += chunk_len) {
                    ts.tasks.push_back({s, h, nh, q0, nq, k0, std::min(kv_len[s], k0 + chunk_len), num_partials++});
                    ts.splits.back().count++;
                }
            }
        }
    }
    ts.partial_o.resize(size_t(num_partials * kMaxRows * D));
    ts.partial_m.resize(size_t(num_partials * kMaxRows));
    ts.partial_l.resize(size_t(num_partials * kMaxRows));
}

namespace {

// Merges the chunks of one split (sequence, head) through their log-sum-exps.
void merge_split(const Args& a, const AttentionSplit& sp, const TeamScratch& ts) {
    const int64_t s = sp.seq, R = a.q_len[s] * a.G * sp.nh, D = a.D;
    const AttentionTask rows{s, sp.head, sp.nh, 0, a.q_len[s], 0, 0, -1};  // the chunks' row layout
    for (int64_t r = 0; r < R; ++r) {
        float m = kNegInf;
        for (int64_t c = 0; c < sp.count; ++c) m = std::max(m, ts.partial_m[(sp.first + c) * kMaxRows + r]);
        int64_t token, head;
        task_row(rows, a.G, r, token, head);
        const int64_t row = a.q_rows[a.q_off[s] + token];
        float* dst = a.out + (row * a.Hq + head) * D;
        float total = 0.0f;
        std::fill(dst, dst + D, 0.0f);
        if (m != kNegInf) {
            for (int64_t c = 0; c < sp.count; ++c) {
                const int64_t p = sp.first + c;
                const float w = std::exp(ts.partial_m[p * kMaxRows + r] - m);
                if (w == 0.0f) continue;
                total += w * ts.partial_l[p * kMaxRows + r];
                const float* src = ts.partial_o.data() + (p * kMaxRows + r) * D;
                for (int64_t d = 0; d < D; ++d) dst[d] += w * src[d];
            }
            for (int64_t d = 0; d < D; ++d) dst[d] /= total;
        }
        if (a.lse) a.lse[row * a.Hq + head] = total > 0.0f ? m + std::log(total) : kNegInf;
    }
}

}  // namespace

void attention_team(const float* q, int64_t q_row_stride, const int64_t* q_rows, const int64_t* q_off,
                    const int64_t* q_len, const int64_t* slots, const int64_t* slot_off, const int64_t* kv_len,
                    bool causal, const void* k_cache, const void* v_cache, int cache_fmt, int64_t Hq, int64_t Hkv,
                    int64_t D, float scale, float* out, float* lse, TeamScratch& ts, const RopeStore* rope,
                    int mode) {
    const Args a{q, q_row_stride, q_rows, q_off, q_len, slots, slot_off, kv_len, causal, k_cache, v_cache,
                 cache_fmt, Hq, Hkv, D, Hq / Hkv, scale, out, lse, rope};
    static thread_local Scratch sc;
    sc.reserve(kMaxRows, D);
    const int64_t num_tasks = int64_t(ts.tasks.size());
    // Tasks of many query rows on AMX where asked (prefill and extend: the keys are all in the pool)
    const bool amx = (mode == kAttnAmxExact || mode == kAttnAmxBf16) && rope == nullptr;
    int64_t num_seqs = 0;
    for (const AttentionTask& t : ts.tasks) num_seqs = std::max(num_seqs, t.seq + 1);
    const AttentionCall call{q, q_row_stride, q_rows, q_off, q_len, slots, slot_off, kv_len,
                                 num_seqs, causal, k_cache, v_cache, cache_fmt, Hq, Hkv, D, scale, out, lse,
                                 mode != kAttnAmxBf16};
    if (amx) {
        amx::prepare_attention(call, ts);
        amx::begin_tiles();
    }
    const bool integer = mode == kAttnInt16 && rope == nullptr && avx512::attend_rows_in_integers(D);
    if (integer) avx512::prepare_codes(call, ts);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < num_tasks; ++i) {
        if (amx && amx::attention_task_fits(call, ts.tasks[i]))
            amx::run_attention_task(call, ts.tasks[i], ts);
        else
            run_task(a, ts.tasks[i], sc, ts.partial_o.data(), ts.partial_m.data(), ts.partial_l.data(),
                     integer && ts.int_kv_off[size_t(ts.tasks[i].seq)] >= 0
                         ? avx512::sequence_codes(ts, ts.tasks[i], kv_len, D) : nullptr);
    }
    if (amx) amx::end_tiles();
    const int64_t num_splits = int64_t(ts.splits.size());
    if (num_splits > 0) {  // the same for every thread: all skip or all take this barrier
#pragma omp for schedule(static)
        for (int64_t i = 0; i < num_splits; ++i) merge_split(a, ts.splits[i], ts);
    }
}

void attention(const float* q, int64_t q_row_stride, const int64_t* q_rows, const int64_t* q_off,
               const int64_t* q_len, const int64_t* slots, const int64_t* slot_off, const int64_t* kv_len,
               int64_t num_seqs, bool causal, const void* k_cache, const void* v_cache, int cache_fmt, int64_t Hq,
               int64_t Hkv, int64_t D, float scale, float* out, float* lse, int nthreads, int mode) {
    TeamScratch ts;
    plan_attention(q_len, kv_len, num_seqs, Hq, Hkv, D, nthreads, ts, mode == kAttnAmxExact || mode == kAttnAmxBf16);
#pragma omp parallel num_threads(nthreads)
    attention_team(q, q_row_stride, q_rows, q_off, q_len, slots, slot_off, kv_len, causal, k_cache, v_cache,
                   cache_fmt, Hq, Hkv, D, scale, out, lse, ts, nullptr, mode);
}

}  // namespace plait::avx2
