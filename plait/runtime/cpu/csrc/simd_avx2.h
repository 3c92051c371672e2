// AVX2 building blocks shared by the kernels: loads and stores of 16-bit floats, GGUF block decoding,
// a vectorized exp, horizontal sums. Included only by files compiled for AVX2 + FMA + F16C.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace plait::avx2 {

// The block decoders below return their values in arrays of registers; called out of line they go
// through memory, which doubled the float decode kernel's time when GCC stopped inlining one of them.
#define PLAIT_INLINE inline __attribute__((always_inline))

static inline float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v);
    __m128 hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    __m128 sh = _mm_movehdup_ps(lo);
    __m128 s = _mm_add_ps(lo, sh);
    sh = _mm_movehl_ps(sh, s);
    s = _mm_add_ss(s, sh);
    return _mm_cvtss_f32(s);
}

static inline float hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

static inline float fp16_to_f32(uint16_t h) { return _cvtsh_ss(h); }

static inline __m256 load_bf16(const uint16_t* p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

static inline __m256 load_f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Round to nearest even, as PyTorch's float -> bfloat16 conversion does (NaN stays NaN).
static inline __m128i to_bf16(__m256 x) {
    __m256i bits = _mm256_castps_si256(x);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    rounded = _mm256_blendv_epi8(rounded, _mm256_or_si256(bits, _mm256_set1_epi32(0x400000)), nan);
    __m256i hi = _mm256_srli_epi32(rounded, 16);
    __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1));
    return packed;
}

// One KV row (a token's D values of one KV head) of a pool in any cache format.
struct CacheRow {
    const uint8_t* data;
    int fmt;
    float scale;  // kCacheI8 only
};

static inline CacheRow cache_row(const void* cache, int fmt, int64_t slot, int64_t Hkv, int64_t head, int64_t D) {
    const uint8_t* p = static_cast<const uint8_t*>(cache) + (slot * Hkv + head) * cache_row_bytes(fmt, D);
    float scale = 1.0f;
    if (fmt == kCacheI8) std::memcpy(&scale, p + D, sizeof(float));
    return {p, fmt, scale};
}

// Values d .. d + 8 of a row, as float32.
static inline __m256 load_row8(const CacheRow& row, int64_t d) {
    switch (row.fmt) {
        case kCacheBF16: return load_bf16(reinterpret_cast<const uint16_t*>(row.data) + d);
        case kCacheF16: return load_f16(reinterpret_cast<const uint16_t*>(row.data) + d);
        case kCacheI8: {
            __m128i codes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row.data + d));
            return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes)), _mm256_set1_ps(row.scale));
        }
        default: return _mm256_loadu_ps(reinterpret_cast<const float*>(row.data) + d);
    }
}

// Stores D float32 values (D % 8 == 0) as row (slot, head) of a pool, rounding as PyTorch's
// conversions do; kCacheI8 quantizes symmetrically with the row's own scale.
static inline void store_row(void* cache, int fmt, int64_t slot, int64_t Hkv, int64_t head, int64_t D, const float* x) {
    uint8_t* p = static_cast<uint8_t*>(cache) + (slot * Hkv + head) * cache_row_bytes(fmt, D);
    switch (fmt) {
        case kCacheBF16:
            for (int64_t d = 0; d < D; d += 8)
                _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 2 * d), to_bf16(_mm256_loadu_ps(x + d)));
            return;
        case kCacheF16:
            for (int64_t d = 0; d < D; d += 8)
                _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 2 * d),
                                 _mm256_cvtps_ph(_mm256_loadu_ps(x + d), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            return;
        case kCacheI8: {
            const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
            __m256 m = _mm256_setzero_ps();
            for (int64_t d = 0; d < D; d += 8) m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(x + d), abs_mask));
            const float max_abs = hmax(m);
            const float scale = max_abs > 0.0f ? max_abs / 127.0f : 1.0f;
            const __m256 inv = _mm256_set1_ps(max_abs > 0.0f ? 127.0f / max_abs : 0.0f);
            for (int64_t d = 0; d < D; d += 8) {
                __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + d), inv));  // round to nearest even
                __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
                _mm_storel_epi64(reinterpret_cast<__m128i*>(p + d), _mm_packs_epi16(q16, q16));
            }
            std::memcpy(p + D, &scale, sizeof(float));
            return;
        }
        default:
            for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(reinterpret_cast<float*>(p) + d, _mm256_loadu_ps(x + d));
    }
}

// exp(x) for a vector, relative error ~2 ulp over the range softmax uses (x <= 0); exp(-inf) = 0.
static inline __m256 exp_ps(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.3f), hi = _mm256_set1_ps(88.3f);
    __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
    // x = n ln2 + r, |r| <= ln2 / 2
    __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    // exp(r) by its Taylor polynomial to degree 7 (error below float rounding for |r| <= 0.35)
    __m256 p = _mm256_set1_ps(1.0f / 5040);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 result = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    // Below the clamp the true value is 0 (or a denormal): return 0, as exp(-inf) must be.
    return _mm256_and_ps(result, _mm256_cmp_ps(x, lo, _CMP_GE_OQ));
}

// ---- GGUF blocks -> four vectors of 8 floats (the block's 32 values before scale and offset) ----

static PLAIT_INLINE void decode_q4(const uint8_t* qs, __m256 v[4]) {
    __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m128i lo = _mm_and_si128(raw, mask);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
    v[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    v[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    v[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    v[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}

static PLAIT_INLINE void decode_q8(const int8_t* qs, __m256 v[4]) {
    for (int i = 0; i < 4; ++i) {
        __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + 8 * i));
        v[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
    }
}

template <int FMT>
constexpr bool is_block_format() {
    return FMT == kQ8_0 || FMT == kQ4_0 || FMT == kQ4_1 || FMT == kQ8_0F || FMT == kQ4_1F;
}

// Signed 8-bit codes (Q8_0 either way); the other block formats have unsigned 4-bit ones.
template <int FMT>
constexpr bool is_q8() {
    return FMT == kQ8_0 || FMT == kQ8_0F;
}

template <int FMT>
constexpr bool has_offset() {
    return FMT == kQ4_0 || FMT == kQ4_1 || FMT == kQ4_1F;
}

// The one place that knows a block's layout: block `b`'s scale d and offset m (w = d * code + m; m = 0
// without one) and where its codes start (32 int8, or 16 bytes of 4-bit pairs).
template <int FMT>
static PLAIT_INLINE const uint8_t* block_head(const uint8_t* row, int64_t b, float& d, float& m) {
    static_assert(is_block_format<FMT>());
    uint16_t h[2];
    m = 0.0f;
    if constexpr (FMT == kQ8_0) {
        const uint8_t* blk = row + b * 34;
        std::memcpy(h, blk, 2);
        d = fp16_to_f32(h[0]);
        return blk + 2;
    } else if constexpr (FMT == kQ4_0) {
        const uint8_t* blk = row + b * 18;
        std::memcpy(h, blk, 2);
        d = fp16_to_f32(h[0]);
        m = -8.0f * d;
        return blk + 2;
    } else if constexpr (FMT == kQ4_1) {
        const uint8_t* blk = row + b * 20;
        std::memcpy(h, blk, 4);
        d = fp16_to_f32(h[0]);
        m = fp16_to_f32(h[1]);
        return blk + 4;
    } else if constexpr (FMT == kQ8_0F) {
        const uint8_t* blk = row + b * 36;
        std::memcpy(&d, blk, 4);
        return blk + 4;
    } else {  // kQ4_1F
        const uint8_t* blk = row + b * 24;
        std::memcpy(&d, blk, 4);
        std::memcpy(&m, blk + 4, 4);
        return blk + 8;
    }
}

// The 32 values of block `b` of a row in any format, scaled: w = v * d + m for the block formats.
// Float formats return d = 1, m = 0 (the caller's templates skip both).
template <int FMT>
static PLAIT_INLINE void load_block(const uint8_t* row, int64_t b, __m256 v[4], float& d, float& m) {
    if constexpr (FMT == kF32) {
        const float* p = reinterpret_cast<const float*>(row) + b * kBlock;
        for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(p + 8 * i);
    } else if constexpr (FMT == kBF16) {
        const uint16_t* p = reinterpret_cast<const uint16_t*>(row) + b * kBlock;
        for (int i = 0; i < 4; ++i) v[i] = load_bf16(p + 8 * i);
    } else if constexpr (FMT == kF16) {
        const uint16_t* p = reinterpret_cast<const uint16_t*>(row) + b * kBlock;
        for (int i = 0; i < 4; ++i) v[i] = load_f16(p + 8 * i);
    } else if constexpr (is_q8<FMT>()) {
        decode_q8(reinterpret_cast<const int8_t*>(block_head<FMT>(row, b, d, m)), v);
    } else {
        decode_q4(block_head<FMT>(row, b, d, m), v);
    }
}

// Row `n` of a weight in float32 (K values).
template <int FMT>
static inline void dequant_row(const uint8_t* row, int64_t K, float* out) {
    for (int64_t b = 0; b < K / kBlock; ++b) {
        __m256 v[4];
        float d = 1.0f, m = 0.0f;
        load_block<FMT>(row, b, v, d, m);
        if constexpr (is_block_format<FMT>()) {
            __m256 dv = _mm256_set1_ps(d), mv = _mm256_set1_ps(m);
            for (int i = 0; i < 4; ++i) v[i] = _mm256_fmadd_ps(v[i], dv, mv);
        }
        for (int i = 0; i < 4; ++i) _mm256_storeu_ps(out + b * kBlock + 8 * i, v[i]);
    }
}

namespace {  // a copy per file, compiled for that file's target

// Asks for every cache line of a block's rows (all the task's heads, adjacent in the pool), one line at
// a time from inside the arithmetic of the block before, so that the pool's reads overlap the
// products. Prefetch hints, not loads: a load that misses holds up the retirement of everything after
// it, and with K and V now read in separate sweeps (one stream of adjacent rows each) the hints are
// taken. On the 2-core Zen 1 machine of docs/benchmarks.md, decode attention at 4,096 tokens of context
// (30 layers' own pools, float16): 11.4 ms a step reading the lines with loads, 9.3 ms with hints;
// all of a block's hints at once, 14.5 ms.
// The hints ask for L2, not L1 (`_MM_HINT_T1`): a core has far more L2 misses in flight than L1 fill
// buffers, and the block's lines reach L1 from L2 in a few cycles. On a 2-core Zen 4, attention alone
// over 30 layers' pools: one sequence of 4,096 keys 0.74 of the time of L1 hints, 32 sequences of 192
// keys 0.77 (0.55 with their slots scattered through the pool, as decode tokens of a batch are), the
// same with the pools in cache; a decode step at 4,096 tokens of context 0.84.

class LinesAhead {
public:
    // The lines of rows[0 .. n), each `span` bytes (the caller keeps `rows`: they are the next
    // block's, which it reads after this one).
    void plan(const uint8_t* const* rows, int64_t n, int64_t span) {
        rows_ = rows;
        n_ = n;
        lines_per_row_ = (span + 63) / 64;
        t_ = j_ = 0;
    }
    // Ask for the next line (none past the last).
    PLAIT_INLINE void read() {
        if (t_ >= n_) return;
        _mm_prefetch(reinterpret_cast<const char*>(rows_[t_] + 64 * j_), _MM_HINT_T1);
        if (++j_ == lines_per_row_) {
            j_ = 0;
            ++t_;
        }
    }
    void read_rest() {
        while (t_ < n_) read();
    }

private:
    const uint8_t* const* rows_ = nullptr;
    int64_t n_ = 0, lines_per_row_ = 1, t_ = 0, j_ = 0;
};

}  // namespace

}  // namespace plait::avx2
