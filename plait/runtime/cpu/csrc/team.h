// Memory a kernel's threads share within one call: allocated by one thread (`omp single`) before
// the others read it. The plain kernel forms make one per call; `decoder_stack` one per step.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <new>
#include <vector>

#include "kernels.h"

namespace plait {

// Allocates on 64-byte (cache line) boundaries. An AMX tile load of rows that straddle cache lines
// runs at about half speed: a buffer that tiles are loaded from or stored to must be aligned, and
// std::vector's default allocator only aligns to 16 bytes.
template <typename T>
struct LineAligned {
    using value_type = T;
    LineAligned() = default;
    template <typename U>
    LineAligned(const LineAligned<U>&) {}
    T* allocate(size_t n) {
        void* p = std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64);
        if (!p) throw std::bad_alloc();
        return static_cast<T*>(p);
    }
    void deallocate(T* p, size_t) { std::free(p); }
    template <typename U>
    bool operator==(const LineAligned<U>&) const { return true; }
    template <typename U>
    bool operator!=(const LineAligned<U>&) const { return false; }
};

template <typename T>
using AlignedVector = std::vector<T, LineAligned<T>>;

struct AttentionTask {
    int64_t seq, head, nh, q0, nq;  // KV heads head .. head + nh (nh > 1 only when nq == 1); query rows q0 .. q0 + nq
    int64_t k0, k1;             // keys k0 .. k1
    int64_t partial;            // index of its partial result, or -1 when it writes the output itself
};

struct AttentionSplit {
    int64_t seq, head, nh, first, count;  // a (sequence, head) whose keys were split into `count` chunks
};

struct TeamScratch {
    std::vector<float> block_sums;  // linear: sums of x over each block of 32 inputs
    std::vector<AttentionTask> tasks;
    std::vector<AttentionSplit> splits;
    std::vector<float> partial_o, partial_m, partial_l;
    AlignedVector<uint16_t> amx_x;  // amx::linear_team: x's two bfloat16 parts
    AlignedVector<int16_t> x16;  // avx512 int16 panels: x's int16 codes, then its scales and sums
    AlignedVector<int8_t> amx_q;       // amx::int8_linear_team: x's int16 codes as high and low bytes
    AlignedVector<float> amx_q_scales;  // ... and per row and block the codes' scale, then x's sum
    // amx attention: per (sequence, KV head) its keys' and values' bfloat16 parts, at amx_kv_off[seq]
    AlignedVector<uint16_t> amx_kv;
    std::vector<int64_t> amx_kv_off;
    // integer attention: per (sequence, KV head) its keys' and values' codes, at int_kv_off[seq]
    AlignedVector<int32_t> int_kv;
    std::vector<int64_t> int_kv_off;
};

// One attention call's arguments (see `attention` in kernels.h), for the AMX and integer tasks.
struct AttentionCall {
    const float* q;
    int64_t q_row_stride;
    const int64_t *q_rows, *q_off, *q_len, *slots, *slot_off, *kv_len;
    int64_t num_seqs;
    bool causal;
    const void *k_cache, *v_cache;
    int fmt;
    int64_t Hq, Hkv, D;
    float scale;
    float* out;
    float* lse;
    bool exact;  // AMX tasks: three bfloat16 passes (near float32), else one (bfloat16 products)
};

// Decode steps fold the rotary embedding and the store of the new K/V into attention (one barrier
// less per layer): each task rotates its own copy of the query rows, and the task reading a
// sequence's newest key rotates and stores that key head's K and V first. k, v: the QKV product's
// rows (`kv_stride` floats apart); positions, loc: by token row.
struct RopeStore {
    const float* table;  // [max_pos, D] as [cos | sin] halves
    const int64_t* positions;
    const float *k, *v;
    int64_t kv_stride;
    void *k_cache, *v_cache;
    const int64_t* loc;
};

namespace avx2 {

void linear_team(const float* x, int64_t M, int64_t K, const uint8_t* w, int fmt, int64_t N, const float* bias,
                 float* y, int64_t ldy, TeamScratch& ts);
void rmsnorm_team(const float* x, float* residual, const float* weight, int64_t M, int64_t H, float eps, float* out);
void silu_mul_team(const float* x, int64_t M, int64_t I, float* out);
void rope_store_team(float* q, float* k, const float* v, int64_t M, int64_t Hq, int64_t Hkv, int64_t D,
                     int64_t q_stride, int64_t k_stride, int64_t v_stride, const int64_t* positions,
                     const float* table, void* k_cache, void* v_cache, int cache_fmt, const int64_t* loc);
// Fills ts.tasks / splits / partial buffers for sequences of these lengths (one thread, before the
// team runs `attention_team`; a step's plan serves all its layers).
// `amx_tasks`: the tasks of many rows may run on AMX tiles (smaller tasks then).
void plan_attention(const int64_t* q_len, const int64_t* kv_len, int64_t num_seqs, int64_t Hq, int64_t Hkv, int64_t D,
                    int nthreads, TeamScratch& ts, bool amx_tasks = false);
void attention_team(const float* q, int64_t q_row_stride, const int64_t* q_rows, const int64_t* q_off,
                    const int64_t* q_len, const int64_t* slots, const int64_t* slot_off, const int64_t* kv_len,
                    bool causal, const void* k_cache, const void* v_cache, int cache_fmt, int64_t Hq, int64_t Hkv,
                    int64_t D, float scale, float* out, float* lse, TeamScratch& ts, const RopeStore* rope,
                    int mode = 0);
// gate_up [*, 2I] -> out = silu(gate) * up [M, I] in one pass: each work item computes a gate row
// and its up row and applies the activation (decode-sized M; x is this thread's own copy).
void gated_linear_team(const float* x, int64_t M, int64_t K, const uint8_t* w, int fmt, int64_t I, float* out);
// The same for more rows where the int16 panels take the weight (avx512::int16_gated_panel_team): the
// [M, 2I] product is never written. Returns false, doing nothing, where they do not (the same answer in
// every thread); the caller then runs the product and silu_mul_team.
bool gated_panels_team(const float* x, int64_t M, int64_t K, const uint8_t* w, int fmt, int64_t I, float* out,
                       TeamScratch& ts);
// RMSNorm of small M redundantly in each thread (no barrier): out (thread-private) = norm(x + res_in)
// (or norm(x) when res_in is null); the calling thread with `write` also stores x + res_in (or x) to res_out.
void rmsnorm_private(const float* x, const float* res_in, float* res_out, bool write, const float* weight, int64_t M,
                     int64_t H, float eps, float* out);

}  // namespace avx2

namespace amx {
// Attention tasks of at least this many query rows (query tokens x heads of a KV head) run on AMX
// (attention_amx.cpp) when `attention_team` is asked to (prefill and extend steps, head size 64).
constexpr int64_t kAmxMinTaskRows = 16;
bool attention_task_fits(const AttentionCall& a, const AttentionTask& task);
// Collective (every thread of the team): the bfloat16 parts of the keys and values of the
// sequences with tasks that fit, into ts.amx_kv.
void prepare_attention(const AttentionCall& a, TeamScratch& ts);
void run_attention_task(const AttentionCall& a, const AttentionTask& task, const TeamScratch& ts);
void begin_tiles();  // this thread's tile configuration
void end_tiles();
// linear_team (see team forms above) over a weight packed for AMX (linear_amx.cpp); only where
// `amx_usable()` in the module said the CPU and the OS allow it.
void linear_team(const float* x, int64_t M, int64_t K, const uint16_t* packed, int64_t N, const float* bias, float* y,
                 int64_t ldy, TeamScratch& ts, bool exact);
// linear_team over a Q4_1 (q8: Q8_0) weight repacked for AMX's int8 tiles (linear_amx_int8.cpp): x
// rounded to int16 per block, exact integer block sums; decode-sized batches.
void int8_linear_team(const float* x, int64_t M, int64_t K, const uint8_t* packed, int64_t N, const float* bias,
                      float* y, int64_t ldy, TeamScratch& ts, bool q8 = false);
}  // namespace amx
namespace avx512 {
// Integer attention (kAttnInt16, where attend_rows_in_integers(D); attention_avx512.cpp). The team
// rounds the keys and values of every sequence with a task of more than 3 rows of one KV head, once
// (ts.int_kv), before the tasks run; such a task then reads its (sequence, KV head)'s codes,
// sequence_codes(...), in attend_rows_int (attend_rows' task over those codes).
void prepare_codes(const AttentionCall& a, TeamScratch& ts);
const int32_t* sequence_codes(const TeamScratch& ts, const AttentionTask& task, const int64_t* kv_len, int64_t D);
void attend_rows_int(const int32_t* codes, int64_t k0, int64_t end, int64_t D, const float* q, int64_t R, int64_t G,
                     int64_t first_visible, float* s, float* o, float* mx, float* l);
}  // namespace avx512

}  // namespace plait
