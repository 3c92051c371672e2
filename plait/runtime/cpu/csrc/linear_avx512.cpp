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
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")

#include <immintrin.h>
#include <omp.h>

#include <utility>

#include <algorithm>
#include <cstdlib>
#include <new>

#include "kernels.h"
#include "simd_avx2.h"

namespace plait::avx512 {
namespace {

using avx2::dequant_row;

constexpr int kNR = 32;  // output columns (weight rows) per panel: two 16-float vectors
constexpr int kMR = 12;  // rows of x per block: 24 accumulators, 2 panel vectors, 1 broadcast
#ifndef PLAIT_KC
#define PLAIT_KC 256
#endif
// At most this many inputs per slice of the panel (32 KiB of it), which stays in L1 while every row of
// x passes over it; K is cut into equal slices of a multiple of 16.
constexpr int64_t kMaxKC = PLAIT_KC;

// A thread's growing float buffer on 64-byte lines. Deliberately not a std::vector: a template this file
// instantiates under its AVX-512 target could be merged by the linker with the same instantiation in
// another file and then run on CPUs without AVX-512; a type local to this file cannot.
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

// Transposes 16 vectors of 16 floats in place (r[i][j] -> r[j][i]).
inline void transpose16(__m512 r[16]) {
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

// y[i][0 .. ncols) (+)= x[i][k0 .. k1) . panel columns k0 .. k1 for MR rows of x (row stride K): the
// first slice of K starts the sums, later ones add to y; the last adds the bias.
template <int MR>
inline void panel_block(const float* x, int64_t K, int64_t k0, int64_t k1, const float* panel, const float* bias,
                        float* y, int64_t ldy, int ncols) {
    const __mmask16 m0 = ncols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << ncols) - 1);
    const __mmask16 m1 = ncols >= 32 ? __mmask16(0xFFFF) : ncols <= 16 ? __mmask16(0) : __mmask16((1u << (ncols - 16)) - 1);
    __m512 c0[MR], c1[MR];
    if (k0 == 0) {
        for (int i = 0; i < MR; ++i) c0[i] = c1[i] = _mm512_setzero_ps();
    } else {
        for (int i = 0; i < MR; ++i) {
            c0[i] = _mm512_maskz_loadu_ps(m0, y + i * ldy);
            c1[i] = _mm512_maskz_loadu_ps(m1, y + i * ldy + 16);
        }
    }
    for (int64_t k = k0; k < k1; ++k) {
        const __m512 b0 = _mm512_load_ps(panel + k * kNR);
        const __m512 b1 = _mm512_load_ps(panel + k * kNR + 16);
        for (int i = 0; i < MR; ++i) {
            const __m512 a = _mm512_set1_ps(x[i * K + k]);
            c0[i] = _mm512_fmadd_ps(a, b0, c0[i]);
            c1[i] = _mm512_fmadd_ps(a, b1, c1[i]);
        }
    }
    if (k1 == K && bias) {
        const __m512 bias0 = _mm512_maskz_loadu_ps(m0, bias), bias1 = _mm512_maskz_loadu_ps(m1, bias + 16);
        for (int i = 0; i < MR; ++i) {
            c0[i] = _mm512_add_ps(c0[i], bias0);
            c1[i] = _mm512_add_ps(c1[i], bias1);
        }
    }
    for (int i = 0; i < MR; ++i) {
        _mm512_mask_storeu_ps(y + i * ldy, m0, c0[i]);
        _mm512_mask_storeu_ps(y + i * ldy + 16, m1, c1[i]);
    }
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

}  // namespace

void panel_linear_team(const float* x, int64_t M, int64_t K, const uint8_t* w, int fmt, int64_t N, const float* bias,
                       float* y, int64_t ldy) {
    switch (fmt & ~(kInt8Dot | kInt16Dot)) {
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

}  // namespace plait::avx512
