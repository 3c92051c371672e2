// Prefill and extend attention on AMX tiles (Intel Xeon since Sapphire Rapids).
//
// A prefill task (one sequence, one KV head, up to 96 query rows) multiplies its queries with every
// visible key and its softmax weights with the values: compute-bound, like the products of
// linear_amx.cpp, and at the vector units' float32 rate as long as a prefill's projections. Here
// both products run on the tile unit with the same three bfloat16 passes over hi/lo parts (near
// float32: the float16 cache rows are exactly hi + lo).
//
// Everything is transposed so that no tile needs a transposition per block of keys: the scores
// come out as S^T = K Q^T (keys x query rows; K's rows are A tiles as they are, Q^T's tiles are
// built once per task), the online softmax runs down the columns of S^T (16 query rows a vector),
// the weights P^T become B tiles by interleaving pairs of key rows, and the output accumulates as
// O^T = V^T P^T (dims x query rows), V^T made once per (sequence, KV head) for all its tasks.
#include "amx_config.h"
#if PLAIT_HAVE_AMX
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "team.h"

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,avx512dq,amx-tile,amx-bf16,f16c,fma")

#include "amx_tiles.h"
#include "simd_avx512.h"

namespace plait::amx {
namespace {

using avx512_helpers::exp_neg;

constexpr int kT = 64;           // keys per block (two steps of 32 in the value product)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Row d .. d + 16 of a cache row as float32 (int8 rows: codes times the row's scale).
inline __m512 load_row16(const uint8_t* row, int fmt, int64_t D, int64_t d) {
    switch (fmt) {
        case kCacheF32: return _mm512_loadu_ps(reinterpret_cast<const float*>(row) + d);
        case kCacheBF16:
            return from_bf16_bits(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row) + d / 16)));
        case kCacheF16: return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row) + d / 16));
        default: {
            float scale;
            std::memcpy(&scale, row + D, 4);
            const __m512 codes = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + d))));
            return _mm512_mul_ps(codes, _mm512_set1_ps(scale));
        }
    }
}

struct TaskScratch {
    AlignedVector<float> q, st, ot, mx, l;
    AlignedVector<uint16_t> qb, pb;
};

}  // namespace

bool attention_task_fits(const AttentionCall& a, const AttentionTask& task) {
    return a.D == 64 && task.nh == 1 && task.partial < 0 && task.k0 == 0 && task.nq * a.Hq / a.Hkv >= kAmxMinTaskRows;
}

// K rows (hi, lo) and V^T (hi, lo) of every (sequence, KV head) with a task on AMX.
void prepare_attention(const AttentionCall& a, TeamScratch& ts) {
    const int64_t D = a.D;
#pragma omp single
    {
        ts.amx_kv_off.assign(size_t(a.num_seqs), -1);
        int64_t total = 0;
        std::vector<char> big(size_t(a.num_seqs), 0);
        for (const AttentionTask& t : ts.tasks)
            if (attention_task_fits(a, t)) big[size_t(t.seq)] = 1;
        for (int64_t s = 0; s < a.num_seqs; ++s) {
            if (!big[size_t(s)]) continue;
            ts.amx_kv_off[size_t(s)] = total;
            const int64_t kv_pad = (a.kv_len[s] + kT - 1) / kT * kT;
            // per head: K hi, K lo [kv_pad, D]; then per block of kT keys V^T hi, lo [D, kT] (rows of a
            // tile 128 bytes apart: a whole-sequence V^T put them kv_pad * 2 bytes apart, the same L1
            // set for long sequences)
            total += a.Hkv * 4 * kv_pad * D;
        }
        if (int64_t(ts.amx_kv.size()) < total) ts.amx_kv.resize(size_t(total));
    }
    // one item per (sequence, head, block of 32 keys)
    int64_t items = 0;
    std::vector<int64_t> first(size_t(a.num_seqs) + 1, 0);
    for (int64_t s = 0; s < a.num_seqs; ++s) {
        first[size_t(s)] = items;
        if (ts.amx_kv_off[size_t(s)] >= 0) items += a.Hkv * ((a.kv_len[s] + kT - 1) / kT);
    }
    const int64_t row_bytes = cache_row_bytes(a.fmt, D), slot_bytes = a.Hkv * row_bytes;
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
        const int64_t s = std::upper_bound(first.begin(), first.begin() + a.num_seqs, it) - first.begin() - 1;
        const int64_t blocks = (a.kv_len[s] + kT - 1) / kT, kv_pad = blocks * kT;
        const int64_t h = (it - first[size_t(s)]) / blocks, t0 = (it - first[size_t(s)]) % blocks * kT;
        uint16_t* base = ts.amx_kv.data() + ts.amx_kv_off[size_t(s)] + h * 4 * kv_pad * D;
        uint16_t *k_hi = base, *k_lo = base + kv_pad * D;
        uint16_t* vt_hi = base + 2 * kv_pad * D + t0 / kT * 2 * D * kT;
        uint16_t* vt_lo = vt_hi + D * kT;
        const int64_t* slots = a.slots + a.slot_off[s];
        alignas(64) uint16_t v_hi[kT][64], v_lo[kT][64];  // D == 64
        for (int64_t t = t0; t < t0 + kT; ++t) {
            const bool real = t < a.kv_len[s];
            const uint8_t* krow = real ? static_cast<const uint8_t*>(a.k_cache) + slots[t] * slot_bytes + h * row_bytes : nullptr;
            const uint8_t* vrow = real ? static_cast<const uint8_t*>(a.v_cache) + slots[t] * slot_bytes + h * row_bytes : nullptr;
            for (int64_t d = 0; d < D; d += 16) {
                __m512i hi, lo;
                split16(real ? load_row16(krow, a.fmt, D, d) : _mm512_setzero_ps(), hi, lo);
                store_bf16(k_hi + t * D + d, hi);
                store_bf16(k_lo + t * D + d, lo);
                split16(real ? load_row16(vrow, a.fmt, D, d) : _mm512_setzero_ps(), hi, lo);
                store_bf16(&v_hi[t - t0][d], hi);
                store_bf16(&v_lo[t - t0][d], lo);
            }
        }
        for (int64_t d = 0; d < D; ++d)
            for (int64_t t = 0; t < kT; ++t) {
                vt_hi[d * kT + t] = v_hi[t][d];
                vt_lo[d * kT + t] = v_lo[t][d];
            }
    }
}

namespace {

template <bool kExact>
void run_task(const AttentionCall& a, const AttentionTask& task, const TeamScratch& ts) {
    static thread_local TaskScratch sc;
    const int64_t D = a.D, G = a.Hq / a.Hkv, s = task.seq;
    const int64_t R = task.nq * G, R_pad = (R + 31) / 32 * 32, qtiles = R_pad / 16;
    const int64_t kv_len = a.kv_len[s], q_len = a.q_len[s];
    const int64_t kv_pad = (kv_len + kT - 1) / kT * kT;
    const uint16_t* base = ts.amx_kv.data() + ts.amx_kv_off[size_t(s)] + task.head * 4 * kv_pad * D;
    const uint16_t *k_hi = base, *k_lo = base + kv_pad * D, *vt = base + 2 * kv_pad * D;
    sc.q.assign(size_t(R_pad * D), 0.0f);
    sc.st.resize(size_t(kT * R_pad));
    sc.ot.assign(size_t(D * R_pad), 0.0f);
    sc.mx.assign(size_t(R_pad), kNegInf);
    sc.l.assign(size_t(R_pad), 0.0f);
    sc.qb.resize(size_t(2 * (D / 32) * qtiles * kTileValues));
    sc.pb.resize(size_t(2 * 2 * qtiles * kTileValues));
    // query rows r = token * G + g, pre-scaled
    for (int64_t i = 0; i < task.nq; ++i) {
        const int64_t row = a.q_rows[a.q_off[s] + task.q0 + i];
        const float* src = a.q + row * a.q_row_stride + task.head * G * D;
        for (int64_t e = 0; e < G * D; ++e) sc.q[size_t(i * G * D + e)] = src[e] * a.scale;
    }
    // Q^T as B tiles [part][step of 32 dims][16 query rows]: row p = dims 2p, 2p + 1 of each query row
    for (int64_t ks = 0; ks < D / 32; ++ks)
        for (int64_t qt = 0; qt < qtiles; ++qt) {
            uint16_t* hi = sc.qb.data() + ((0 * (D / 32) + ks) * qtiles + qt) * kTileValues;
            uint16_t* lo = sc.qb.data() + ((1 * (D / 32) + ks) * qtiles + qt) * kTileValues;
            for (int64_t c = 0; c < 16; ++c) {
                const float* qr = sc.q.data() + (qt * 16 + c) * D + ks * 32;
                __m512i h0, l0, h1, l1;
                split16(_mm512_loadu_ps(qr), h0, l0);
                split16(_mm512_loadu_ps(qr + 16), h1, l1);
                alignas(64) uint16_t hv[32], lv[32];
                store_bf16(hv, h0);
                store_bf16(hv + 16, h1);
                store_bf16(lv, l0);
                store_bf16(lv + 16, l1);
                for (int64_t p = 0; p < 16; ++p) {
                    hi[p * 32 + c * 2] = hv[2 * p];
                    hi[p * 32 + c * 2 + 1] = hv[2 * p + 1];
                    lo[p * 32 + c * 2] = lv[2 * p];
                    lo[p * 32 + c * 2 + 1] = lv[2 * p + 1];
                }
            }
        }
    // query token i sees keys [0, visible0 + i) (all when not causal)
    const int64_t visible0 = a.causal ? kv_len - q_len + 1 + task.q0 : kv_len + task.q0;
    const int64_t end = std::min(kv_len, a.causal ? visible0 + task.nq - 1 : kv_len);
    alignas(64) int32_t limit_base[16];
    for (int64_t t0 = 0; t0 < end; t0 += kT) {
        // S^T [64 keys][R_pad] = K Q^T, 32 keys x 32 query rows at a time
        for (int64_t k0 = 0; k0 < kT; k0 += 32)
            for (int64_t c0 = 0; c0 < R_pad; c0 += 32) {
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                for (int64_t ks = 0; ks < D / 32; ++ks) {
                    const uint16_t* bh = sc.qb.data() + ((0 * (D / 32) + ks) * qtiles + c0 / 16) * kTileValues;
                    const uint16_t* bl = sc.qb.data() + ((1 * (D / 32) + ks) * qtiles + c0 / 16) * kTileValues;
                    tile_step<kExact>(k_hi + (t0 + k0) * D + ks * 32, k_lo + (t0 + k0) * D + ks * 32, D * 2, bh, bl, 16 * D);
                }
                float* st = sc.st.data() + k0 * R_pad + c0;
                _tile_stored(0, st, R_pad * 4);
                _tile_stored(1, st + 16, R_pad * 4);
                _tile_stored(2, st + 16 * R_pad, R_pad * 4);
                _tile_stored(3, st + 16 * R_pad + 16, R_pad * 4);
            }
        // online softmax down the columns, 16 query rows a vector; key t0 + j is visible to row r
        // when j < visible0 + r / G - t0 (and t0 + j < kv_len)
        for (int64_t c = 0; c < R_pad; c += 16) {
            int32_t fewest = kT;
            for (int64_t k = 0; k < 16; ++k) {
                limit_base[k] = int32_t(std::min(kv_len, visible0 + (c + k) / G) - t0);
                fewest = std::min(fewest, limit_base[k]);
            }
            __m512 m = _mm512_set1_ps(kNegInf);
            if (fewest >= kT) {  // every key of the block visible to every row
                for (int64_t j = 0; j < kT; ++j) m = _mm512_max_ps(m, _mm512_loadu_ps(sc.st.data() + j * R_pad + c));
            } else {
                const __m512i limits = _mm512_load_si512(limit_base);
                for (int64_t j = 0; j < kT; ++j) {
                    float* row = sc.st.data() + j * R_pad + c;
                    const __mmask16 vis = _mm512_cmpgt_epi32_mask(limits, _mm512_set1_epi32(int32_t(j)));
                    const __m512 v = _mm512_mask_blend_ps(vis, _mm512_set1_ps(kNegInf), _mm512_loadu_ps(row));
                    _mm512_storeu_ps(row, v);
                    m = _mm512_max_ps(m, v);
                }
            }
            const __m512 m_old = _mm512_loadu_ps(sc.mx.data() + c);
            const __m512 m_new = _mm512_max_ps(m_old, m);
            // rows with no visible key yet keep -inf maxima: their weights are 0 (exp of -inf)
            const __mmask16 live = _mm512_cmp_ps_mask(m_new, _mm512_set1_ps(kNegInf), _CMP_NEQ_OQ);
            const __m512 alpha = _mm512_mask_blend_ps(live, _mm512_set1_ps(1.0f), exp_neg(_mm512_sub_ps(m_old, m_new)));
            const __m512 shift = _mm512_mask_blend_ps(live, _mm512_setzero_ps(), m_new);
            // the weights go straight into P^T's B tiles [part][step of 32 keys][16 query rows]: row p
            // of a step holds keys 2p and 2p + 1 interleaved
            __m512 sum = _mm512_setzero_ps();
            for (int64_t j = 0; j < kT; j += 2) {
                const __m512 p0 = exp_neg(_mm512_sub_ps(_mm512_loadu_ps(sc.st.data() + j * R_pad + c), shift));
                const __m512 p1 = exp_neg(_mm512_sub_ps(_mm512_loadu_ps(sc.st.data() + (j + 1) * R_pad + c), shift));
                sum = _mm512_add_ps(sum, _mm512_add_ps(p0, p1));
                const int64_t step = j / 32, p = j % 32 / 2;
                uint16_t* bh = sc.pb.data() + ((0 * 2 + step) * qtiles + c / 16) * kTileValues + p * 32;
                if (!kExact) {  // the hi parts alone
                    _mm512_storeu_si512(bh, _mm512_or_si512(bf16_bits(p0), _mm512_slli_epi32(bf16_bits(p1), 16)));
                    continue;
                }
                __m512i h0, l0, h1, l1;
                split16(p0, h0, l0);
                split16(p1, h1, l1);
                uint16_t* bl = sc.pb.data() + ((1 * 2 + step) * qtiles + c / 16) * kTileValues + p * 32;
                _mm512_storeu_si512(bh, _mm512_or_si512(h0, _mm512_slli_epi32(h1, 16)));
                _mm512_storeu_si512(bl, _mm512_or_si512(l0, _mm512_slli_epi32(l1, 16)));
            }
            _mm512_storeu_ps(sc.l.data() + c, _mm512_fmadd_ps(_mm512_loadu_ps(sc.l.data() + c), alpha, sum));
            _mm512_storeu_ps(sc.mx.data() + c, m_new);
            if (_mm512_cmp_ps_mask(alpha, _mm512_set1_ps(1.0f), _CMP_NEQ_OQ)) {  // some row's maximum moved
                for (int64_t d = 0; d < D; ++d) {
                    float* o = sc.ot.data() + d * R_pad + c;
                    _mm512_storeu_ps(o, _mm512_mul_ps(_mm512_loadu_ps(o), alpha));
                }
            }
        }
        // O^T [D][R_pad] += V^T P^T, 32 dims x 32 query rows at a time, both steps of 32 keys
        for (int64_t d0 = 0; d0 < D; d0 += 32)
            for (int64_t c0 = 0; c0 < R_pad; c0 += 32) {
                float* ot = sc.ot.data() + d0 * R_pad + c0;
                _tile_loadd(0, ot, R_pad * 4);
                _tile_loadd(1, ot + 16, R_pad * 4);
                _tile_loadd(2, ot + 16 * R_pad, R_pad * 4);
                _tile_loadd(3, ot + 16 * R_pad + 16, R_pad * 4);
                for (int64_t step = 0; step < 2; ++step)
                    tile_step<kExact>(vt + t0 * 2 * D + d0 * kT + step * 32, vt + t0 * 2 * D + D * kT + d0 * kT + step * 32, kT * 2,
                          sc.pb.data() + ((0 * 2 + step) * qtiles + c0 / 16) * kTileValues,
                          sc.pb.data() + ((1 * 2 + step) * qtiles + c0 / 16) * kTileValues, 16 * kT);
                _tile_stored(0, ot, R_pad * 4);
                _tile_stored(1, ot + 16, R_pad * 4);
                _tile_stored(2, ot + 16 * R_pad, R_pad * 4);
                _tile_stored(3, ot + 16 * R_pad + 16, R_pad * 4);
            }
    }
    for (int64_t r = 0; r < R; ++r) {
        const int64_t token = r / G, head = task.head * G + r % G;
        const int64_t row = a.q_rows[a.q_off[s] + task.q0 + token];
        float* dst = a.out + (row * a.Hq + head) * D;
        const float l = sc.l[size_t(r)];
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        for (int64_t d = 0; d < D; ++d) dst[d] = sc.ot[size_t(d * R_pad + r)] * inv;
        if (a.lse) a.lse[row * a.Hq + head] = l > 0.0f ? sc.mx[size_t(r)] + std::log(l) : kNegInf;
    }
}

}  // namespace

void run_attention_task(const AttentionCall& a, const AttentionTask& task, const TeamScratch& ts) {
    if (a.exact) run_task<true>(a, task, ts);
    else run_task<false>(a, task, ts);
}

void begin_tiles() { load_tile_config(); }
void end_tiles() { _tile_release(); }

}  // namespace plait::amx

#else  // no AMX intrinsics in this compiler: the module reports no AMX, so nothing calls these
#include <cstdlib>

#include "team.h"

namespace plait::amx {
bool attention_task_fits(const AttentionCall&, const AttentionTask&) { return false; }
void prepare_attention(const AttentionCall&, TeamScratch&) { std::abort(); }
void run_attention_task(const AttentionCall&, const AttentionTask&, const TeamScratch&) { std::abort(); }
void begin_tiles() { std::abort(); }
void end_tiles() { std::abort(); }
}  // namespace plait::amx
#endif
