// A whole decoder stack (all layers of a Llama-family model) for one step, in one call.
//
// On a CPU, a small model's step is thousands of small operations; dispatching each from Python
// costs as much as computing it. This runs the layers' sequence here instead, over the same
// kernels the layer modules call (so both paths compute the same thing), with the step's
// arguments in one block of integers (`StackField`, pointers and sizes) and each layer's weights
// in one row of a table (`LayerField`). It is to the CPU what a captured CUDA graph is to a GPU,
// without padding: every batch shape runs as it comes.
#pragma GCC target("avx2,fma,f16c")

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "simd_avx2.h"
#include "stack.h"
#include "team.h"

namespace plait::avx2 {
namespace {

template <typename T>
T* field_ptr(const int64_t* a, int f) {
    return reinterpret_cast<T*>(static_cast<uintptr_t>(a[f]));
}

// RMSNorm of each of `heads` vectors of D in every row (Qwen3's q/k norm), in place.
void head_rmsnorm_team(float* x, int64_t T, int64_t row_stride, int64_t heads, int64_t D, const float* w, float eps) {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t)
        for (int64_t h = 0; h < heads; ++h) {
            float* v = x + t * row_stride + h * D;
            float ss = 0.0f;
            for (int64_t d = 0; d < D; ++d) ss += v[d] * v[d];
            const float inv = 1.0f / std::sqrt(ss / float(D) + eps);
            for (int64_t d = 0; d < D; ++d) v[d] = (v[d] * inv) * w[d];
        }
}

// out[r] = merge of two attentions over disjoint keys (a: prefix pass, b: own pass), by log-sum-exp.
void merge_rows_team(float* out, const float* out_a, const float* lse_a, const float* lse_b, const int64_t* rows,
                     int64_t n, int64_t Hq, int64_t D) {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
        const int64_t r = rows[i];
        for (int64_t h = 0; h < Hq; ++h) {
            const float la = lse_a[r * Hq + h], lb = lse_b[r * Hq + h];
            const float m = std::max(la, lb);
            const float wa = std::exp(la - m), wb = std::exp(lb - m);
            const float inv = 1.0f / (wa + wb);
            float* o = out + (r * Hq + h) * D;
            const float* a = out_a + (r * Hq + h) * D;
            for (int64_t d = 0; d < D; ++d) o[d] = (a[d] * wa + o[d] * wb) * inv;
        }
    }
}

}  // namespace

void decoder_stack(const int64_t* a, const int64_t* layers, float eps, float scale) {
    const int64_t L = a[kNumLayers], T = a[kTokens], H = a[kHidden], Hq = a[kHeads], Hkv = a[kKvHeads],
                  D = a[kHeadDim], I = a[kIntermediate];
    const int fmt = int(a[kCacheFmt]), nthreads = int(a[kNumThreads]);
    const int64_t qkv_width = (Hq + 2 * Hkv) * D;
    float* x = field_ptr<float>(a, kX);
    float* residual = field_ptr<float>(a, kResidual);
    float* qkv = field_ptr<float>(a, kQkv);
    float* attn = field_ptr<float>(a, kAttn);
    float* normed = field_ptr<float>(a, kNormed);
    float* gate_up = field_ptr<float>(a, kGateUp);
    float* act = field_ptr<float>(a, kAct);
    const int64_t* positions = field_ptr<const int64_t>(a, kPositions);
    const int64_t* loc = field_ptr<const int64_t>(a, kLoc);
    const float* rope = field_ptr<const float>(a, kRopeTable);
    const bool cascade = a[kPreNumSeqs] > 0;
    TeamScratch ts;
    // One parallel region for the whole step: the kernels' team forms share out each operation and
    // end in a barrier, so threads wake once per step instead of once per operation.
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; ++t) std::memcpy(residual + t * H, x + t * H, size_t(H) * sizeof(float));
        for (int64_t l = 0; l < L; ++l) {
            const int64_t* w = layers + l * kNumLayerFields;
            auto wptr = [&](int f) { return reinterpret_cast<const uint8_t*>(static_cast<uintptr_t>(w[f])); };
            auto fptr = [&](int f) { return reinterpret_cast<const float*>(static_cast<uintptr_t>(w[f])); };
            void* k_cache = reinterpret_cast<void*>(static_cast<uintptr_t>(w[kKCache]));
            void* v_cache = reinterpret_cast<void*>(static_cast<uintptr_t>(w[kVCache]));
            // attention block: normed = norm(residual) (layer 0: of x itself, residual already holds x)
            rmsnorm_team(x, l == 0 ? nullptr : residual, fptr(kInNorm), T, H, eps, normed);
            linear_team(normed, T, H, wptr(kQkvW), int(w[kQkvFmt]), qkv_width, fptr(kQkvBias), qkv, qkv_width, ts);
            float* q = qkv;
            float* k = qkv + Hq * D;
            float* v = qkv + (Hq + Hkv) * D;
            if (w[kQNorm]) {
                head_rmsnorm_team(q, T, qkv_width, Hq, D, fptr(kQNorm), eps);
                head_rmsnorm_team(k, T, qkv_width, Hkv, D, fptr(kKNorm), eps);
            }
            rope_store_team(q, k, v, T, Hq, Hkv, D, qkv_width, qkv_width, qkv_width, positions, rope, k_cache,
                            v_cache, fmt, loc);
            attention_team(q, qkv_width, field_ptr<const int64_t>(a, kMainQRows),
                           field_ptr<const int64_t>(a, kMainQOff), field_ptr<const int64_t>(a, kMainQLen),
                           field_ptr<const int64_t>(a, kMainSlots), field_ptr<const int64_t>(a, kMainSlotOff),
                           field_ptr<const int64_t>(a, kMainKvLen), a[kMainNumSeqs], a[kMainCausal] != 0, k_cache,
                           v_cache, fmt, Hq, Hkv, D, scale, attn, cascade ? field_ptr<float>(a, kLseOwn) : nullptr,
                           ts);
            if (cascade) {
                float* out_prefix = field_ptr<float>(a, kOutPrefix);
                float* lse_prefix = field_ptr<float>(a, kLsePrefix);
                attention_team(q, qkv_width, field_ptr<const int64_t>(a, kPreQRows),
                               field_ptr<const int64_t>(a, kPreQOff), field_ptr<const int64_t>(a, kPreQLen),
                               field_ptr<const int64_t>(a, kPreSlots), field_ptr<const int64_t>(a, kPreSlotOff),
                               field_ptr<const int64_t>(a, kPreKvLen), a[kPreNumSeqs], false, k_cache, v_cache, fmt,
                               Hq, Hkv, D, scale, out_prefix, lse_prefix, ts);
                merge_rows_team(attn, out_prefix, lse_prefix, field_ptr<const float>(a, kLseOwn),
                                field_ptr<const int64_t>(a, kCascadeRows), a[kNumCascadeRows], Hq, D);
            }
            linear_team(attn, T, Hq * D, wptr(kOW), int(w[kOFmt]), H, nullptr, x, H, ts);
            // MLP block
            rmsnorm_team(x, residual, fptr(kPostNorm), T, H, eps, normed);
            linear_team(normed, T, H, wptr(kGateUpW), int(w[kGateUpFmt]), 2 * I, nullptr, gate_up, 2 * I, ts);
            silu_mul_team(gate_up, T, I, act);
            linear_team(act, T, I, wptr(kDownW), int(w[kDownFmt]), H, nullptr, x, H, ts);
        }
    }
}

}  // namespace plait::avx2
