// A whole decoder stack (all layers of a Llama-family model) for one step, in one call.
//
// On a CPU, a small model's step is thousands of small operations; dispatching each from Python
// costs as much as computing it. This runs the layers' sequence here instead, over the same
// kernels the layer modules call (so both paths compute the same thing), with the step's
// arguments in one block of integers (`StackField`, pointers and sizes) and each layer's weights
// in one row of a table (`LayerField`). It is to the CPU what a captured CUDA graph is to a GPU,
// without padding: every batch shape runs as it comes.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <vector>

#include "stack.h"
#include "team.h"

#pragma GCC target("avx2,fma,f16c")

#include "simd_avx2.h"

namespace plait::avx2 {
namespace {

constexpr int64_t kSmallStepRows = 8;  // up to this many token rows a step takes the fused, fewer-barrier path
constexpr int64_t kAmxMinRows = 9;     // from this many rows products take a layer's AMX weight (AMX_MIN_ROWS)
// Up to this many rows products take a layer's 4-bit panels where it has them and no AMX weight (up to
// kSmallStepRows with one): from memory they beat the int14 weights' 2 bytes up to 48-64 rows
// (Q4_PANEL_MAX_ROWS in linear.py).
constexpr int64_t kQ4MaxRows = avx512::kColumnPanelMaxRows;

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

// Where a step's time goes, by phase (see `stack_profile`): thread 0 reads the clock after each
// phase, which ends at a barrier on the larger steps (on decode-sized steps, where phases need no
// barrier, the split is thread 0's own view). Off unless asked for: a clock read per phase and layer.
std::atomic<bool> g_profile{false};
double g_phase_seconds[kNumStackPhases] = {};
int64_t g_profile_steps = 0;

struct PhaseClock {
    bool on;
    std::chrono::steady_clock::time_point last;
    void mark(StackPhase phase) {
        if (!on) return;
        const auto now = std::chrono::steady_clock::now();
        g_phase_seconds[phase] += std::chrono::duration<double>(now - last).count();
        last = now;
    }
};

}  // namespace

void stack_profile(bool enable, double* seconds, int64_t* steps) {
    for (int p = 0; p < kNumStackPhases; ++p) {
        seconds[p] = g_phase_seconds[p];
        g_phase_seconds[p] = 0.0;
    }
    *steps = g_profile_steps;
    g_profile_steps = 0;
    g_profile.store(enable);
}

void decoder_stack(const int64_t* a, const int64_t* layers, float eps, float scale) {
    const int64_t L = a[kNumLayers], T = a[kTokens], H = a[kHidden], Hq = a[kHeads], Hkv = a[kKvHeads],
                  D = a[kHeadDim], I = a[kIntermediate];
    const int fmt = int(a[kCacheFmt]), nthreads = int(a[kNumThreads]);
    const int64_t qkv_width = (Hq + 2 * Hkv) * D;
    float* x = field_ptr<float>(a, kX);
    float* qkv = field_ptr<float>(a, kQkv);
    float* attn = field_ptr<float>(a, kAttn);
    float* normed = field_ptr<float>(a, kNormed);
    float* gate_up = field_ptr<float>(a, kGateUp);
    float* act = field_ptr<float>(a, kAct);
    const int64_t* positions = field_ptr<const int64_t>(a, kPositions);
    const int64_t* loc = field_ptr<const int64_t>(a, kLoc);
    const float* rope = field_ptr<const float>(a, kRopeTable);
    const int64_t *main_q_len = field_ptr<const int64_t>(a, kMainQLen), *main_kv_len = field_ptr<const int64_t>(a, kMainKvLen);
    const bool cascade = a[kPreNumSeqs] > 0;
    // The attention tasks depend only on the step's lengths: planned once for every layer.
    TeamScratch ts, main_plan, prefix_plan;
    const bool amx_attention = L > 0 && layers[kQkvAmx] != 0;  // the layers' attention tasks may run on AMX
    plan_attention(main_q_len, main_kv_len, a[kMainNumSeqs], Hq, Hkv, D, nthreads, main_plan, amx_attention);
    if (cascade)
        plan_attention(field_ptr<const int64_t>(a, kPreQLen), field_ptr<const int64_t>(a, kPreKvLen), a[kPreNumSeqs],
                       Hq, Hkv, D, nthreads, prefix_plan);
    // Decode-sized steps take fewer barriers: every thread normalises the few rows itself (into its
    // own buffer, with the residual alternating between two buffers so that nobody writes what
    // another thread may still read), gate/up and SiLU are one pass, and pure decode steps fold the
    // rotary embedding and the K/V store into attention. Larger steps share each operation out.
    const bool small = T <= kSmallStepRows && H % 8 == 0;
    bool decode = small && a[kMainCausal] == 0;
    for (int64_t s = 0; s < a[kMainNumSeqs] && decode; ++s) decode = main_q_len[s] == 1;
    std::vector<float> residual_b(small ? size_t(T * H) : 0);
    // A step that returns only some rows' hidden states (the last row of each prompt of a prefill):
    // the last layer stores every row's K and V and attends for every row, then runs its output
    // product and MLP on those rows only, gathered into `pruned` (attn, x, residual, normed, gate_up,
    // act) and scattered back into x and residual.
    const int64_t num_out = a[kNumOutRows];
    const int64_t* out_rows = field_ptr<const int64_t>(a, kOutRows);
    const bool prune = !small && !cascade && num_out > 0 && num_out < T;
    std::vector<float> pruned(prune ? size_t(num_out * (Hq * D + 3 * H + 3 * I)) : 0);
    float* residual[2] = {field_ptr<float>(a, kResidual), residual_b.data()};
    int current = 0;  // residual[current] holds the running sum (small steps)
    const bool profile = g_profile.load(std::memory_order_relaxed);
    if (profile) ++g_profile_steps;
    const RopeStore rope_store_args{rope, positions, qkv + Hq * D, qkv + (Hq + Hkv) * D, qkv_width, nullptr, nullptr, loc};
#pragma omp parallel num_threads(nthreads) firstprivate(current)
    {
        static thread_local std::vector<float> own_normed;
        if (small) own_normed.resize(size_t(T * H));
        const bool writer = omp_get_thread_num() == 0;
        PhaseClock clock{profile && writer, std::chrono::steady_clock::now()};
        // small steps: norm into this thread's buffer; residual[current ^ 1] = x + residual[current]
        auto small_norm = [&](const float* weight, bool first) {
            rmsnorm_private(x, first ? nullptr : residual[current], residual[current ^ 1], writer, weight, T, H, eps,
                            own_normed.data());
            current ^= 1;
        };
        if (!small) {
#pragma omp for schedule(static)
            for (int64_t t = 0; t < T; ++t) std::memcpy(residual[0] + t * H, x + t * H, size_t(H) * sizeof(float));
        }
        for (int64_t l = 0; l < L; ++l) {
            const int64_t* w = layers + l * kNumLayerFields;
            // the rows the products below take: all T, but only the returned rows in a pruned last layer
            int64_t rows = T;
            auto wptr = [&](int f) { return reinterpret_cast<const uint8_t*>(static_cast<uintptr_t>(w[f])); };
            auto fptr = [&](int f) { return reinterpret_cast<const float*>(static_cast<uintptr_t>(w[f])); };
            // y = in W^T (+ bias) for the weight in field `wf`, on its AMX packing where it has one
            // (on its AMX int8 packing for decode-sized steps, where it has one)
            auto int8_product = [&](int i8f) { return w[i8f] != 0 && rows >= a[kInt8MinRows] && rows <= a[kInt8MaxRows]; };
            // steps of more than the decode kernels' rows on the int14 packing, where the layer has one
            auto int14_product = [&](int i14f) { return w[i14f] != 0 && rows > kSmallStepRows; };
            auto int14_scratch = [&](int64_t K) {
#pragma omp single
                ts.x16.resize(avx512::int16_panel_scratch(rows, K));
                return ts.x16.data();
            };
            // steps of up to kQ4MaxRows on the 4-bit panels, where the layer has them (up to the decode
            // kernels' rows where it has AMX weights too)
            auto q4_product = [&](int q4f, int af) {
                return w[q4f] != 0 && rows <= (w[af] != 0 ? kSmallStepRows : kQ4MaxRows);
            };
            auto product = [&](const float* in, int64_t K, int wf, int ff, int af, int i8f, int i14f, int q4f,
                               const float* bias, int64_t N, float* y) {
                if (int8_product(i8f))
                    amx::int8_linear_team(in, rows, K, reinterpret_cast<const uint8_t*>(static_cast<uintptr_t>(w[i8f])), N,
                                          bias, y, N, ts);
                else if (q4_product(q4f, af))
                    avx512::q4_panel_linear_team(in, rows, K, wptr(q4f), N, bias, y, N);
                else if (int14_product(i14f))
                    avx512::int14_linear_team(in, rows, K, reinterpret_cast<const uint8_t*>(static_cast<uintptr_t>(w[i14f])),
                                              N, bias, y, N, int14_scratch(K));
                else if (w[af] && rows >= kAmxMinRows)
                    amx::linear_team(in, rows, K, reinterpret_cast<const uint16_t*>(static_cast<uintptr_t>(w[af])), N,
                                     bias, y, N, ts, a[kAmxExact] != 0);
                else
                    linear_team(in, rows, K, wptr(wf), int(w[ff]), N, bias, y, N, ts);
            };
            void* k_cache = reinterpret_cast<void*>(static_cast<uintptr_t>(w[kKCache]));
            void* v_cache = reinterpret_cast<void*>(static_cast<uintptr_t>(w[kVCache]));
            // attention block
            const float* qkv_in = normed;
            if (small) {
                small_norm(fptr(kInNorm), l == 0);
                qkv_in = own_normed.data();
            } else {
                rmsnorm_team(x, l == 0 ? nullptr : residual[0], fptr(kInNorm), T, H, eps, normed);
            }
            clock.mark(kPhaseNorm);
            product(qkv_in, H, kQkvW, kQkvFmt, kQkvAmx, kQkvI8, kQkvI14, kQkvQ4, fptr(kQkvBias), qkv_width, qkv);
            clock.mark(kPhaseQkv);
            float* q = qkv;
            float* k = qkv + Hq * D;
            float* v = qkv + (Hq + Hkv) * D;
            if (w[kQNorm]) {
                head_rmsnorm_team(q, T, qkv_width, Hq, D, fptr(kQNorm), eps);
                head_rmsnorm_team(k, T, qkv_width, Hkv, D, fptr(kKNorm), eps);
            }
            RopeStore fused = rope_store_args;
            fused.k_cache = k_cache;
            fused.v_cache = v_cache;
            if (!decode)
                rope_store_team(q, k, v, T, Hq, Hkv, D, qkv_width, qkv_width, qkv_width, positions, rope, k_cache,
                                v_cache, fmt, loc);
            clock.mark(kPhaseRopeStore);
            attention_team(q, qkv_width, field_ptr<const int64_t>(a, kMainQRows), field_ptr<const int64_t>(a, kMainQOff),
                           main_q_len, field_ptr<const int64_t>(a, kMainSlots), field_ptr<const int64_t>(a, kMainSlotOff),
                           main_kv_len, a[kMainCausal] != 0, k_cache, v_cache, fmt, Hq, Hkv, D, scale, attn,
                           cascade ? field_ptr<float>(a, kLseOwn) : nullptr, main_plan, decode ? &fused : nullptr,
                           decode                ? kAttnFloat
                           : w[kQkvAmx] != 0     ? (a[kAmxExact] ? kAttnAmxExact : kAttnAmxBf16)
                           : a[kIntAttention]    ? kAttnInt16
                                                 : kAttnFloat);
            if (cascade) {
                float* out_prefix = field_ptr<float>(a, kOutPrefix);
                float* lse_prefix = field_ptr<float>(a, kLsePrefix);
                RopeStore rotate_only = fused;  // the prefix pass rotates its queries but stores nothing
                rotate_only.k_cache = rotate_only.v_cache = nullptr;
                attention_team(q, qkv_width, field_ptr<const int64_t>(a, kPreQRows),
                               field_ptr<const int64_t>(a, kPreQOff), field_ptr<const int64_t>(a, kPreQLen),
                               field_ptr<const int64_t>(a, kPreSlots), field_ptr<const int64_t>(a, kPreSlotOff),
                               field_ptr<const int64_t>(a, kPreKvLen), false, k_cache, v_cache, fmt, Hq, Hkv, D, scale,
                               out_prefix, lse_prefix, prefix_plan, decode ? &rotate_only : nullptr);
                merge_rows_team(attn, out_prefix, lse_prefix, field_ptr<const float>(a, kLseOwn),
                                field_ptr<const int64_t>(a, kCascadeRows), a[kNumCascadeRows], Hq, D);
            }
            clock.mark(kPhaseAttention);
            // the output product and the MLP: on every row, or on the returned rows gathered
            float *o_in = attn, *xo = x, *res = residual[0], *nrm = normed, *gu = gate_up, *ac = act;
            const bool pruned_layer = prune && l == L - 1;
            if (pruned_layer) {
                o_in = pruned.data();
                xo = o_in + num_out * Hq * D;
                res = xo + num_out * H;
                nrm = res + num_out * H;
                gu = nrm + num_out * H;
                ac = gu + num_out * 2 * I;
#pragma omp for schedule(static)
                for (int64_t i = 0; i < num_out; ++i) {
                    std::memcpy(o_in + i * Hq * D, attn + out_rows[i] * Hq * D, size_t(Hq * D) * sizeof(float));
                    std::memcpy(res + i * H, residual[0] + out_rows[i] * H, size_t(H) * sizeof(float));
                }
                rows = num_out;
            }
            product(o_in, Hq * D, kOW, kOFmt, kOAmx, kOI8, kOI14, kOQ4, nullptr, H, xo);
            clock.mark(kPhaseO);
            // MLP block
            if (small) {
                small_norm(fptr(kPostNorm), false);
                if (int8_product(kGateUpI8)) {
                    product(own_normed.data(), H, kGateUpW, kGateUpFmt, kGateUpAmx, kGateUpI8, kGateUpI14, kGateUpQ4,
                            nullptr, 2 * I, gate_up);
                    clock.mark(kPhaseGateUp);
                    silu_mul_team(gate_up, T, I, act);
                    clock.mark(kPhaseSiluMul);
                } else if (q4_product(kGateUpQ4, kGateUpAmx) && I % 16 == 0) {
                    avx512::q4_panel_gated_linear_team(own_normed.data(), T, H, wptr(kGateUpQ4), I, act);
                    clock.mark(kPhaseGateUp);
                } else {
                    gated_linear_team(own_normed.data(), T, H, wptr(kGateUpW), int(w[kGateUpFmt]), I, act);
                    clock.mark(kPhaseGateUp);
                }
            } else {
                rmsnorm_team(xo, res, fptr(kPostNorm), rows, H, eps, nrm);
                clock.mark(kPhaseNorm);
                const bool tiles = int8_product(kGateUpI8) || (w[kGateUpAmx] && rows >= kAmxMinRows);
                const bool q4 = !int8_product(kGateUpI8) && q4_product(kGateUpQ4, kGateUpAmx);
                if (q4 && I % 16 == 0) {  // the activation is in it
                    avx512::q4_panel_gated_linear_team(nrm, rows, H, wptr(kGateUpQ4), I, ac);
                    clock.mark(kPhaseGateUp);
                } else if (!q4 && int14_product(kGateUpI14) && I % 32 == 0) {  // the activation is in it
                    avx512::int14_gated_linear_team(nrm, rows, H,
                                                    reinterpret_cast<const uint8_t*>(static_cast<uintptr_t>(w[kGateUpI14])),
                                                    I, ac, int14_scratch(H));
                    clock.mark(kPhaseGateUp);
                } else if (!tiles && !q4 && !int14_product(kGateUpI14) &&
                           gated_panels_team(nrm, rows, H, wptr(kGateUpW), int(w[kGateUpFmt]), I, ac, ts)) {
                    clock.mark(kPhaseGateUp);  // the activation is in it
                } else {
                    product(nrm, H, kGateUpW, kGateUpFmt, kGateUpAmx, kGateUpI8, kGateUpI14, kGateUpQ4, nullptr, 2 * I,
                            gu);
                    clock.mark(kPhaseGateUp);
                    silu_mul_team(gu, rows, I, ac);
                    clock.mark(kPhaseSiluMul);
                }
            }
            product(ac, I, kDownW, kDownFmt, kDownAmx, kDownI8, kDownI14, kDownQ4, nullptr, H, xo);
            clock.mark(kPhaseDown);
            if (pruned_layer) {
#pragma omp for schedule(static)
                for (int64_t i = 0; i < num_out; ++i) {
                    std::memcpy(x + out_rows[i] * H, xo + i * H, size_t(H) * sizeof(float));
                    std::memcpy(residual[0] + out_rows[i] * H, res + i * H, size_t(H) * sizeof(float));
                }
            }
        }
        // small steps: the running sum ends in residual[current]; hand it back in `residual`
        if (small && current == 1 && writer) std::memcpy(residual[0], residual[1], size_t(T * H) * sizeof(float));
    }
}

}  // namespace plait::avx2
