// Plait's CPU kernels: the products, attention and small fused operations of a decoder step,
// reading weights in their stored format (GGUF blocks or 16-bit floats) and the KV pool in place.
//
// Every kernel takes raw pointers and sizes (the Python side passes tensors' data pointers after
// checking shapes, dtypes and contiguity) and computes in float32. Threads come from the OpenMP
// runtime PyTorch already loaded, so the kernels and PyTorch's own operations share one pool.
#pragma once

#include <cstddef>
#include <cstdint>

namespace plait {

// How a weight matrix [N, K] (N output rows of K inputs) is stored. The block formats are GGUF's:
// each row is K / 32 blocks, each block an fp16 scale `d` (and for Q4_1 an fp16 offset `m`) and its
// 32 codes: Q8_0 `w = d * q` (int8), Q4_0 `w = d * (q - 8)`, Q4_1 `w = d * q + m` (4-bit, the first 16
// values in the low nibbles of the 16 bytes, the last 16 in the high nibbles).
enum WeightFormat : int {
    kF32 = 0,
    kBF16 = 1,
    kF16 = 2,
    kQ8_0 = 3,
    kQ4_0 = 4,
    kQ4_1 = 5,
    // Q8_0 and Q4_1 with their block constants as float32 (d, then m for Q4_1), then the same codes:
    // 36 and 24 bytes a block. The same values and products; a block's constants are two loads
    // instead of two float16 conversions, which the batch-1 products pay per 32 weights.
    kQ8_0F = 6,
    kQ4_1F = 7,
};

// Added to a block format's code (kQ8_0, kQ4_0, kQ4_1): products of up to 8 rows round each 32 values
// of x to int8 with one float scale and multiply them with the weight's codes in integer arithmetic
// (the rounding llama.cpp's quantized products apply), about twice the rate of decoding the codes to
// float. Other formats and more rows ignore it.
constexpr int kInt8Dot = 0x100;
// The same with x rounded to int16 per 32 values (an error of at most 2^-16 of the block's largest
// value, against 2^-8 for int8): nearly the float32 product, at most of the integer path's speed.
constexpr int kInt16Dot = 0x200;
// Added to a block format's code: products of more than 8 rows round x to int16 per 32 values too and
// multiply in integers, where the CPU has AVX-512 VNNI (linear_avx512.cpp's int16 panels; elsewhere
// the float32 panels run).
constexpr int kInt16Panels = 0x400;
constexpr int kProductFlags = kInt8Dot | kInt16Dot | kInt16Panels;

// KV pool element types. A pool is [slots, Hkv, row] with one row per (token, KV head): D values of
// the float types, or for kCacheI8 D int8 codes followed by the row's float32 scale (D + 4 bytes;
// value = code * scale, the scale max|x| / 127 of the row).
enum CacheFormat : int { kCacheF32 = 0, kCacheBF16 = 1, kCacheF16 = 2, kCacheI8 = 3 };

inline int64_t cache_row_bytes(int fmt, int64_t D) {
    switch (fmt) {
        case kCacheBF16:
        case kCacheF16: return D * 2;
        case kCacheI8: return D + 4;
        default: return D * 4;
    }
}

constexpr int kBlock = 32;  // values per quantization block

inline size_t row_bytes(int fmt, int64_t k) {
    switch (fmt) {
        case kF32: return size_t(k) * 4;
        case kBF16:
        case kF16: return size_t(k) * 2;
        case kQ8_0: return size_t(k / kBlock) * 34;
        case kQ4_0: return size_t(k / kBlock) * 18;
        case kQ4_1: return size_t(k / kBlock) * 20;
        case kQ8_0F: return size_t(k / kBlock) * 36;
        case kQ4_1F: return size_t(k / kBlock) * 24;
    }
    return 0;
}

// Team forms: every kernel below is also available as `<name>_team(..., TeamScratch&)`, which splits
// its work over the threads of the enclosing OpenMP parallel region (orphaned worksharing, ending in
// a barrier) and must be called by all of them. `decoder_stack` runs a whole step in one region
// that way, so threads are woken once per step rather than once per operation. The plain forms
// open their own region of `nthreads`.
struct TeamScratch;

namespace avx2 {

// y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]); x: [M, K] float32, y: rows of `ldy` floats.
void linear(const float* x, int64_t M, int64_t K, const uint8_t* w, int fmt, int64_t N, const float* bias,
            float* y, int64_t ldy, int nthreads);

// out[i, :] = w[ids[i], :] as float32.
void embedding(const int64_t* ids, int64_t n, const uint8_t* w, int fmt, int64_t K, float* out, int nthreads);

// Without residual: out = rmsnorm(x) * weight. With it: residual += x; out = rmsnorm(residual) * weight.
void rmsnorm(const float* x, float* residual, const float* weight, int64_t M, int64_t H, float eps, float* out,
             int nthreads);

// out[m, i] = silu(x[m, i]) * x[m, I + i]; x: [M, 2I].
void silu_mul(const float* x, int64_t M, int64_t I, float* out, int nthreads);

// y = x w^T (+ bias) as linear() computes it, taking the int16 panels from `packed` (avx512::int16_panel_pack
// of w) where linear() would run the int16 panels; elsewhere linear() itself over w's rows.
void linear_packed(const float* x, int64_t M, int64_t K, const uint8_t* w, const uint8_t* packed, int fmt, int64_t N,
                   const float* bias, float* y, int64_t ldy, int nthreads);

// y = x w^T (+ bias) on a weight's int14 packing (avx512::int14_panel_pack; see int14_linear_team).
void int14_linear(const float* x, int64_t M, int64_t K, const uint8_t* packed, int64_t N, const float* bias, float* y,
                  int64_t ldy, int nthreads);
// out [M, I] = silu(x gate^T) * (x up^T) on a gate/up weight's int14 packing (I % 32 == 0).
void int14_gated_linear(const float* x, int64_t M, int64_t K, const uint8_t* packed, int64_t I, float* out,
                        int nthreads);

// y = x w^T (+ bias) on a 4-bit weight's panels (avx512::q4_panel_pack; see q4_panel_linear_team).
void q4_panel_linear(const float* x, int64_t M, int64_t K, const uint8_t* packed, int64_t N, const float* bias, float* y,
                     int64_t ldy, int nthreads);
// out [M, I] = silu(x gate^T) * (x up^T) on a gate/up weight's 4-bit panels (I % 16 == 0).
void q4_panel_gated_linear(const float* x, int64_t M, int64_t K, const uint8_t* packed, int64_t I, float* out,
                           int nthreads);

// out [M, I] = silu(x gate^T) * (x up^T) for a weight [2I, K] of gate rows then up rows: what a decoder
// stack's MLP computes (the fused forms where they run, else the product then silu_mul).
void gated_linear(const float* x, int64_t M, int64_t K, const uint8_t* w, int fmt, int64_t I, float* out, int nthreads);

// Rotates q [M, Hq, D] and k [M, Hkv, D] in place (rows `q_stride` / `k_stride` floats apart; the
// half-split layout, cos/sin from `table` [max_pos, D] as [cos | sin] halves), then stores k and
// v [M, Hkv, D] (rows `v_stride` apart) into the pool at slots `loc` (pools [slots, Hkv, D]).
void rope_store(float* q, float* k, const float* v, int64_t M, int64_t Hq, int64_t Hkv, int64_t D,
                int64_t q_stride, int64_t k_stride, int64_t v_stride, const int64_t* positions, const float* table,
                void* k_cache, void* v_cache, int cache_fmt, const int64_t* loc, int nthreads);

// How an attention call computes its tasks of many query rows (prefill, extend); decode tasks read the
// pool in place in float32 whatever the mode.
enum AttentionMode : int {
    kAttnFloat = 0,     // float32 products
    kAttnAmxExact = 1,  // AMX tiles, three bfloat16 passes (head size 64; only where the module's amx())
    kAttnAmxBf16 = 2,   // AMX tiles, one bfloat16 pass
    kAttnInt16 = 3,     // 13/14-bit codes on AVX-512 VNNI (avx512::attend_rows_int), float where it cannot
};

// The attention of a set of "query sequences" over KV slot lists in the pool, one online softmax per
// (sequence, KV head). Sequence s has `q_len[s]` query rows, listed at `q_rows + q_off[s]` (row
// indices of q [rows, Hq, D], rows `q_row_stride` floats apart), and attends the `kv_len[s]` slots
// listed at `slots + slot_off[s]`; when `causal`, its query i sees the first
// `kv_len[s] - q_len[s] + 1 + i` of them, else all. Writes out [rows, Hq, D] (float32, at the same
// row indices) and, when lse is not null, the log-sum-exp of the scaled scores [rows, Hq]. `mode` says
// how tasks of many query rows (prefill, extend) compute (AttentionMode).
void attention(const float* q, int64_t q_row_stride, const int64_t* q_rows, const int64_t* q_off,
               const int64_t* q_len, const int64_t* slots, const int64_t* slot_off, const int64_t* kv_len,
               int64_t num_seqs, bool causal, const void* k_cache, const void* v_cache, int cache_fmt, int64_t Hq,
               int64_t Hkv, int64_t D, float scale, float* out, float* lse, int nthreads, int mode = 0);

}  // namespace avx2

namespace avx512 {
// Whether products of more than 8 rows run on AVX-512 (panel_linear_team) instead of AVX2: the CPU has
// AVX-512 F/BW/DQ/VL and PLAIT_DISABLE_CPU_AVX512 is not set. set_enabled turns it off or back on
// (only where the CPU has it) and returns the previous setting.
bool enabled();
bool set_enabled(bool on);
// Team form of y = x w^T (+ bias) for M > 8 rows of x, any weight format (linear_avx512.cpp).
void panel_linear_team(const float* x, int64_t M, int64_t K, const uint8_t* w, int fmt, int64_t N, const float* bias,
                       float* y, int64_t ldy);
// Decode-sized products (M <= 8 rows) of a block-format weight with int16 x (fmt has kInt16Dot), where
// decode_takes(fmt) and decode_enabled(): the AVX2 kernels' arithmetic on AVX-512 VNNI; the gated form
// writes silu(gate) * up as gated_linear_team does (linear_avx512.cpp).
bool decode_enabled();
bool decode_takes(int fmt);
void decode_linear_team(const float* x, int64_t M, int64_t K, const uint8_t* w, int fmt, int64_t N, const float* bias,
                        float* y, int64_t ldy);
void decode_gated_linear_team(const float* x, int64_t M, int64_t K, const uint8_t* w, int fmt, int64_t I, float* out);
// Products of more than 8 rows of a block-format weight with x rounded to int16 per block of 32 (fmt
// has kInt16Panels), where int16_panels_take(fmt) and decode_enabled(): exact integer block sums on
// VNNI, scaled per block as the decode products do. `scratch`: int16_panel_scratch(M, K) int16s on a
// 64-byte line, shared by the team (x's codes, scales and sums; written here).
bool int16_panels_take(int fmt);
inline size_t int16_panel_scratch(int64_t M, int64_t K) { return size_t(M * K + 4 * M * (K / kBlock)); }
void int16_panel_linear_team(const float* x, int64_t M, int64_t K, const uint8_t* w, int fmt, int64_t N,
                             const float* bias, float* y, int64_t ldy, int16_t* scratch);
// The same products of an 8-bit weight (int16_panel_packs(fmt)) from its panels' codes laid out once
// in the panel's order (`packed`: int16_panel_pack's output for w, int16_panel_bytes(N, K) bytes, as
// many as the stored rows), so that a weight multiplied by many rows every step (the LM head) does not
// transpose its rows' blocks each time: the same bits.
bool int16_panel_packs(int fmt);
size_t int16_panel_bytes(int64_t N, int64_t K);
void int16_panel_pack(const uint8_t* w, int fmt, int64_t N, int64_t K, uint8_t* out);
void int16_packed_linear_team(const float* x, int64_t M, int64_t K, const uint8_t* packed, int fmt, int64_t N,
                              const float* bias, float* y, int64_t ldy, int16_t* scratch);
// out [M, I] = silu(x gate^T) * (x up^T) for the gate rows [0, I) and up rows [I, 2I) of w, with the same
// products and the same activation bits as int16_panel_linear_team then silu_mul, without writing the
// [M, 2I] product (same scratch).
void int16_gated_panel_team(const float* x, int64_t M, int64_t K, const uint8_t* w, int fmt, int64_t I, float* out,
                            int16_t* scratch);
// Products of many rows on a block weight rounded once to 14-bit codes per row (one scale per output
// column) and laid out in the panels' order (int14_panel_pack of a format int14_packs(fmt) takes;
// int14_panel_bytes(N, K) bytes), x rounded to 14 bits per block of 32: one FMA a block where the int16
// panels take three (linear_avx512.cpp). Scratch as int16_panel_scratch(M, K). The gated form needs
// I % 32 == 0 (the up rows' panels start at panel I / 32 of the whole gate/up weight's packing).
bool int14_packs(int fmt);
size_t int14_panel_bytes(int64_t N, int64_t K);
void int14_panel_pack(const uint8_t* w, int fmt, int64_t N, int64_t K, uint8_t* out);
void int14_linear_team(const float* x, int64_t M, int64_t K, const uint8_t* packed, int64_t N, const float* bias,
                       float* y, int64_t ldy, int16_t* scratch);
void int14_gated_linear_team(const float* x, int64_t M, int64_t K, const uint8_t* packed, int64_t I, float* out,
                             int16_t* scratch);
// Decode-sized products on a 4-bit weight (q4_panel_packs(fmt)) laid out once in panels of 16 output
// columns (q4_panel_pack; q4_panel_bytes(N, K) bytes, as many as the stored rows with float constants):
// x rounded as the decode kernels round it, exact integer block sums with the columns in the lanes. Any
// M (8 rows at a time); the gated form needs I % 16 == 0 (the up rows' panels start at panel I / 16).
// Up to this many rows these panels beat the int14 and int16 panels' products with the weights from memory
// (48-64 rows on a 2-core Zen 4); the decoder stack and linear_packed take them up to here.
constexpr int64_t kColumnPanelMaxRows = 48;
bool q4_panel_packs(int fmt);
size_t q4_panel_bytes(int64_t N, int64_t K);
void q4_panel_pack(const uint8_t* w, int fmt, int64_t N, int64_t K, uint8_t* out);
void q4_panel_linear_team(const float* x, int64_t M, int64_t K, const uint8_t* packed, int64_t N, const float* bias,
                          float* y, int64_t ldy);
void q4_panel_gated_linear_team(const float* x, int64_t M, int64_t K, const uint8_t* packed, int64_t I, float* out);
// The same decode-sized products (any M, 8 rows at a time) on an 8-bit weight's int16 panels
// (int16_panel_pack): the LM head of a decode batch.
void q8_panel_linear_team(const float* x, int64_t M, int64_t K, const uint8_t* packed, int64_t N, const float* bias,
                          float* y, int64_t ldy);
// A decode attention task (attention_avx2.cpp's blocks_direct): R <= 3 query rows for each of nh KV heads
// from `head`, keys [k0, end) listed in slots (the sequence's), read in place, a segment at a time;
// q [nh][R][D] (scaled), running o [nh][R][D], mx and l [nh][R]; seg_scores [nh][R][256].
struct DecodeTask {
    const int64_t* slots;
    int64_t k0, end, head, nh, R, G, first_visible, D, Hkv;
    int fmt;
    const void *k_cache, *v_cache;
    const float* q;
    float *o, *mx, *l, *seg_scores;
};
void decode_attention(const DecodeTask& task);  // attention_avx512.cpp; D % 16 == 0
// An attention task of R query rows (G a KV head) over keys [k0, end) of one KV head, 128 keys at a
// time, into the running output o [R][D], maxima mx and sums l; row r sees keys below
// first_visible + r / G (so none at or past end). kt, v: D * 128 floats each; s: 12 * 128
// (attention_avx512.cpp; D % 16 == 0).
void attend_rows(const int64_t* slots, int64_t k0, int64_t end, const void* k_cache, const void* v_cache,
                 int fmt, int64_t Hkv, int64_t head, int64_t D, const float* q, int64_t R, int64_t G,
                 int64_t first_visible, float* kt, float* v, float* s, float* o, float* mx, float* l);
// Whether attend_rows can run on integer codes (kAttnInt16; attend_rows_int in team.h): AVX-512 VNNI
// enabled, D % 32 == 0 and D <= 128.
bool attend_rows_in_integers(int64_t D);
}  // namespace avx512

namespace amx {
// y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) on AMX tiles, w packed by the Python side
// (kernels.amx_pack: per 32 columns and 32 inputs, the bfloat16 hi and lo parts of w in tile layout);
// `exact`: x split into bfloat16 hi and lo parts, three tile products; else w packed without its lo
// part, x rounded to bfloat16, one product (linear_amx.cpp). K a multiple of 32.
void linear(const float* x, int64_t M, int64_t K, const uint16_t* packed, int64_t N, const float* bias, float* y,
            int64_t ldy, int nthreads, bool exact);
// y = x w^T (+ bias) for a Q4_1 (q8: Q8_0) weight with float constants repacked by
// kernels.amx_int8_pack: x rounded to int16 per block of 32, its bytes times the codes on AMX's int8
// tiles (linear_amx_int8.cpp).
void int8_linear(const float* x, int64_t M, int64_t K, const uint8_t* packed, int64_t N, const float* bias, float* y,
                 int64_t ldy, int nthreads, bool q8);
}  // namespace amx
}  // namespace plait
