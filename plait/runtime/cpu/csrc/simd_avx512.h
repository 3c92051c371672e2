// Helpers of the 512-bit kernels (linear_avx512.cpp, attention_avx512.cpp, attention_amx.cpp): static
// inline, so each file compiles its own copy under its own `#pragma GCC target` (include after it).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace plait::avx512_helpers {

// acc + the pairwise int16 products of a and b (VPDPWSSD), written as one instruction on acc's register.
// GCC 12 compiles the intrinsic in loops that carry many sums with a register copy before and after each
// instruction (two moves per multiply, which fill the front end); the asm ties the sum to one register.
static inline __m512i dpwssd(__m512i acc, __m512i a, __m512i b) {
    __asm__("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(a), "vm"(b));
    return acc;
}

// acc + the pairwise int16 products of a and the pair of int16 at p broadcast to every lane (VPDPWSSD
// with an embedded broadcast: the load is part of the instruction).
static inline __m512i dpwssd_broadcast(__m512i acc, __m512i a, const int32_t* p) {
    __asm__("vpdpwssd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(a), "m"(*p));
    return acc;
}

// exp(r) for |r| <= ln2 / 2 by its Taylor polynomial to degree 7 (exp_ps and exp_neg below).
static inline __m512 exp_taylor(__m512 r) {
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return p;
}

// exp(x) for 16 lanes: avx2::exp_ps (simd_avx2.h) operation for operation, so the same bits per lane.
static inline __m512 exp_ps(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.3f), hi = _mm512_set1_ps(88.3f);
    const __m512 xc = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    const __m512 p = exp_taylor(r);
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ), _mm512_mul_ps(p, _mm512_castsi512_ps(e)));
}

// silu(g) * u for 16 lanes, the bits of silu_mul's 8-lane form.
static inline __m512 silu_mul(__m512 g, __m512 u) {
    const __m512 e = exp_ps(_mm512_xor_ps(g, _mm512_set1_ps(-0.0f)));
    return _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), u);
}

// Transposes 16 vectors of 16 floats in place (r[i][j] -> r[j][i]).
static inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // Per 128-bit lane l, r[4q + e] holds element 4l + e of rows 4q .. 4q + 3.
    for (int q = 0; q < 4; ++q) {
        r[4 * q + 0] = _mm512_shuffle_ps(t[4 * q], t[4 * q + 2], 0x44);
        r[4 * q + 1] = _mm512_shuffle_ps(t[4 * q], t[4 * q + 2], 0xEE);
        r[4 * q + 2] = _mm512_shuffle_ps(t[4 * q + 1], t[4 * q + 3], 0x44);
        r[4 * q + 3] = _mm512_shuffle_ps(t[4 * q + 1], t[4 * q + 3], 0xEE);
    }
    // Gather lane l of r[e], r[4 + e], r[8 + e], r[12 + e] into column 4l + e.
    for (int e = 0; e < 4; ++e) {
        const __m512 a0 = _mm512_shuffle_f32x4(r[e], r[4 + e], 0x88);       // r[e].l0 l2, r[4+e].l0 l2
        const __m512 a1 = _mm512_shuffle_f32x4(r[e], r[4 + e], 0xDD);       // lanes 1, 3
        const __m512 b0 = _mm512_shuffle_f32x4(r[8 + e], r[12 + e], 0x88);
        const __m512 b1 = _mm512_shuffle_f32x4(r[8 + e], r[12 + e], 0xDD);
        t[e] = _mm512_shuffle_f32x4(a0, b0, 0x88);       // column e
        t[8 + e] = _mm512_shuffle_f32x4(a0, b0, 0xDD);   // column 8 + e
        t[4 + e] = _mm512_shuffle_f32x4(a1, b1, 0x88);   // column 4 + e
        t[12 + e] = _mm512_shuffle_f32x4(a1, b1, 0xDD);  // column 12 + e
    }
    for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// exp(x) for x <= 0 (0 for -inf), 16 at a time: 2^n * p(r) with x = n ln2 + r.
static inline __m512 exp_neg(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.0f);
    const __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);
    x = _mm512_max_ps(x, lo);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    const __m512 p = exp_taylor(r);
    return _mm512_maskz_scalef_ps(keep, p, n);
}

// Lane masks of the first n of 32 values, as two halves of 16 (n clamped to 0 .. 32).
static inline void tail_masks(int64_t n, __mmask16& m0, __mmask16& m1) {
    m0 = n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
    m1 = n >= 32 ? __mmask16(0xFFFF) : n <= 16 ? __mmask16(0) : __mmask16((1u << (n - 16)) - 1);
}

}  // namespace plait::avx512_helpers
