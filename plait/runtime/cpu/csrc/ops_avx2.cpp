// The small operations of a decoder layer, each one pass over its data: RMSNorm with the residual
// add, SiLU-and-multiply, and rotary embedding fused with the store of K and V into the pool.
#include <omp.h>

#include <algorithm>

#include "team.h"

#pragma GCC target("avx2,fma,f16c")

#include "simd_avx2.h"

namespace plait::avx2 {

void rmsnorm_team(const float* x, float* residual, const float* weight, int64_t M, int64_t H, float eps, float* out) {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) {
        const float* xr = x + m * H;
        float* rr = residual ? residual + m * H : nullptr;
        float* orow = out + m * H;
        __m256 ss = _mm256_setzero_ps();
        int64_t h = 0;
        for (; h + 8 <= H; h += 8) {
            __m256 v = _mm256_loadu_ps(xr + h);
            if (rr) {
                v = _mm256_add_ps(v, _mm256_loadu_ps(rr + h));
                _mm256_storeu_ps(rr + h, v);
            }
            ss = _mm256_fmadd_ps(v, v, ss);
        }
        float sum = hsum(ss);
        for (; h < H; ++h) {
            float v = xr[h];
            if (rr) {
                v += rr[h];
                rr[h] = v;
            }
            sum += v * v;
        }
        const float* src = rr ? rr : xr;
        const float inv = 1.0f / std::sqrt(sum / float(H) + eps);
        const __m256 iv = _mm256_set1_ps(inv);
        h = 0;
        for (; h + 8 <= H; h += 8)
            _mm256_storeu_ps(orow + h,
                             _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(src + h), iv), _mm256_loadu_ps(weight + h)));
        for (; h < H; ++h) orow[h] = (src[h] * inv) * weight[h];
    }
}

void rmsnorm_private(const float* x, const float* res_in, float* res_out, bool write, const float* weight, int64_t M,
                     int64_t H, float eps, float* out) {
    for (int64_t m = 0; m < M; ++m) {
        const float* xr = x + m * H;
        const float* ri = res_in ? res_in + m * H : nullptr;
        float* o = out + m * H;
        __m256 ss = _mm256_setzero_ps();
        for (int64_t h = 0; h < H; h += 8) {  // H % 8 == 0 on this path (checked by the stack)
            __m256 v = _mm256_loadu_ps(xr + h);
            if (ri) v = _mm256_add_ps(v, _mm256_loadu_ps(ri + h));
            if (write) _mm256_storeu_ps(res_out + m * H + h, v);
            _mm256_storeu_ps(o + h, v);
            ss = _mm256_fmadd_ps(v, v, ss);
        }
        const __m256 iv = _mm256_set1_ps(1.0f / std::sqrt(hsum(ss) / float(H) + eps));
        for (int64_t h = 0; h < H; h += 8)
            _mm256_storeu_ps(o + h, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(o + h), iv), _mm256_loadu_ps(weight + h)));
    }
}

void silu_mul_team(const float* x, int64_t M, int64_t I, float* out) {
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 neg = _mm256_set1_ps(-0.0f);
    // Pieces of 256 values of one row, so that a single row (decode) is shared by the threads too.
    constexpr int64_t kPiece = 256;
    const int64_t pieces = (I + kPiece - 1) / kPiece;
#pragma omp for schedule(static)
    for (int64_t job = 0; job < M * pieces; ++job) {
        const int64_t m = job / pieces, i0 = job % pieces * kPiece, i1 = std::min(I, i0 + kPiece);
        const float* g = x + m * 2 * I;
        const float* u = g + I;
        float* o = out + m * I;
        int64_t i = i0;
        for (; i + 8 <= i1; i += 8) {
            __m256 gv = _mm256_loadu_ps(g + i);
            __m256 e = exp_ps(_mm256_xor_ps(gv, neg));
            __m256 s = _mm256_div_ps(gv, _mm256_add_ps(one, e));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
        }
        for (; i < i1; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
    }
}

namespace {

// x (D floats) rotated in place: [x1 cos - x2 sin, x2 cos + x1 sin] over its two halves.
inline void rotate(float* x, const float* cs, int64_t half) {
    for (int64_t i = 0; i < half; i += 8) {
        __m256 c = _mm256_loadu_ps(cs + i), s = _mm256_loadu_ps(cs + half + i);
        __m256 x1 = _mm256_loadu_ps(x + i), x2 = _mm256_loadu_ps(x + half + i);
        _mm256_storeu_ps(x + i, _mm256_fmsub_ps(x1, c, _mm256_mul_ps(x2, s)));
        _mm256_storeu_ps(x + half + i, _mm256_fmadd_ps(x2, c, _mm256_mul_ps(x1, s)));
    }
}

}  // namespace

void rope_store_team(float* q, float* k, const float* v, int64_t M, int64_t Hq, int64_t Hkv, int64_t D,
                     int64_t q_stride, int64_t k_stride, int64_t v_stride, const int64_t* positions,
                     const float* table, void* k_cache, void* v_cache, int cache_fmt, const int64_t* loc) {
    const int64_t half = D / 2;
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) {
        const float* cs = table + positions[m] * D;
        for (int64_t h = 0; h < Hq; ++h) rotate(q + m * q_stride + h * D, cs, half);
        for (int64_t h = 0; h < Hkv; ++h) {
            float* kh = k + m * k_stride + h * D;
            rotate(kh, cs, half);
            if (k_cache == nullptr) continue;
            store_row(k_cache, cache_fmt, loc[m], Hkv, h, D, kh);
            store_row(v_cache, cache_fmt, loc[m], Hkv, h, D, v + m * v_stride + h * D);
        }
    }
}

// ---- the plain forms: one parallel region each ----

void rmsnorm(const float* x, float* residual, const float* weight, int64_t M, int64_t H, float eps, float* out,
             int nthreads) {
#pragma omp parallel num_threads(nthreads) if (M >= 16)
    rmsnorm_team(x, residual, weight, M, H, eps, out);
}

void silu_mul(const float* x, int64_t M, int64_t I, float* out, int nthreads) {
#pragma omp parallel num_threads(nthreads) if (M * I >= 16384)
    silu_mul_team(x, M, I, out);
}

void rope_store(float* q, float* k, const float* v, int64_t M, int64_t Hq, int64_t Hkv, int64_t D, int64_t q_stride,
                int64_t k_stride, int64_t v_stride, const int64_t* positions, const float* table, void* k_cache,
                void* v_cache, int cache_fmt, const int64_t* loc, int nthreads) {
#pragma omp parallel num_threads(nthreads) if (M >= 16)
    rope_store_team(q, k, v, M, Hq, Hkv, D, q_stride, k_stride, v_stride, positions, table, k_cache, v_cache,
                    cache_fmt, loc);
}

}  // namespace plait::avx2
