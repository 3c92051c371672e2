// The argument block of `decoder_stack`: a step's pointers and sizes as one int64 array (fields
// below, in this order), and one row of int64s per layer for its weights. The Python side builds
// both by field name (`stack_fields()` / `layer_fields()` return the names in order), so the two
// never drift apart.
#pragma once

#include <cstdint>

namespace plait {

#define PLAIT_STACK_FIELDS(X)                                                                        \
    X(kNumLayers) X(kTokens) X(kHidden) X(kHeads) X(kKvHeads) X(kHeadDim) X(kIntermediate)           \
    X(kCacheFmt) X(kNumThreads)                                                                     \
    /* activations and scratch, float32: x, residual [T, H]; qkv [T, (Hq + 2 Hkv) D]; attn and  */  \
    /* out_prefix [T, Hq D]; normed [T, H]; gate_up [T, 2 I]; act [T, I]; lse_* [T, Hq]          */  \
    X(kX) X(kResidual) X(kQkv) X(kAttn) X(kNormed) X(kGateUp) X(kAct)                               \
    X(kPositions) X(kRopeTable) X(kLoc)                                                             \
    /* every request over its own keys (see `attention` in kernels.h) */                            \
    X(kMainQRows) X(kMainQOff) X(kMainQLen) X(kMainSlots) X(kMainSlotOff) X(kMainKvLen)             \
    X(kMainNumSeqs) X(kMainCausal)                                                                  \
    /* cascade decode: each group over its shared prefix (kPreNumSeqs = 0: none), merged into   */  \
    /* the rows kCascadeRows through the two passes' log-sum-exps                              */  \
    X(kPreQRows) X(kPreQOff) X(kPreQLen) X(kPreSlots) X(kPreSlotOff) X(kPreKvLen) X(kPreNumSeqs)     \
    X(kCascadeRows) X(kNumCascadeRows) X(kOutPrefix) X(kLsePrefix) X(kLseOwn)                       \
    /* the layers' AMX weights (kQkvAmx...): 1 packed with their lo parts (three products), 0 not */ \
    X(kAmxExact)                                                                                    \
    /* steps of this many rows take the layers' AMX int8 packing (kQkvI8...) where they have one */  \
    X(kInt8MinRows) X(kInt8MaxRows)                                                                 \
    /* 1: prefill and extend attention on integer codes where it can (kAttnInt16), 0: float32 */     \
    X(kIntAttention)                                                                                \
    /* the rows whose hidden states the step returns (kNumOutRows of them, int64; kNumOutRows = 0: */ \
    /* all): steps of more than the decode rows without cascade run the last layer's output      */  \
    /* product and MLP for these rows only; the other rows of x and residual are left stale    */  \
    X(kOutRows) X(kNumOutRows)

#define PLAIT_LAYER_FIELDS(X)                                                                        \
    X(kQkvW) X(kQkvFmt) X(kQkvBias) X(kOW) X(kOFmt) X(kGateUpW) X(kGateUpFmt) X(kDownW) X(kDownFmt)  \
    X(kInNorm) X(kPostNorm) X(kQNorm) X(kKNorm) X(kKCache) X(kVCache)                                \
    /* the projections' weights packed for AMX (0: none; linear_amx.cpp) */                          \
    X(kQkvAmx) X(kOAmx) X(kGateUpAmx) X(kDownAmx)                                                    \
    /* ... and for AMX's int8 tiles (0: none; linear_amx_int8.cpp) */                                \
    X(kQkvI8) X(kOI8) X(kGateUpI8) X(kDownI8)                                                        \
    /* ... and rounded to 14 bits per row in the int16 panels' order, for steps of more than 8 rows */ \
    /* (0: none; int14_panel_pack in linear_avx512.cpp) */                                           \
    X(kQkvI14) X(kOI14) X(kGateUpI14) X(kDownI14)                                                   \
    /* ... and their 4-bit codes in panels of 16 columns, for steps of up to 8 rows */               \
    /* (0: none; q4_panel_pack in linear_avx512.cpp) */                                              \
    X(kQkvQ4) X(kOQ4) X(kGateUpQ4) X(kDownQ4)

#define PLAIT_ENUM_ENTRY(name) name,
enum StackField : int { PLAIT_STACK_FIELDS(PLAIT_ENUM_ENTRY) kNumStackFields };
enum LayerField : int { PLAIT_LAYER_FIELDS(PLAIT_ENUM_ENTRY) kNumLayerFields };
#undef PLAIT_ENUM_ENTRY

// The phases `stack_profile` splits a step's time into.
#define PLAIT_STACK_PHASES(X) \
    X(kPhaseNorm) X(kPhaseQkv) X(kPhaseRopeStore) X(kPhaseAttention) X(kPhaseO) X(kPhaseGateUp) X(kPhaseSiluMul) X(kPhaseDown)

#define PLAIT_ENUM_ENTRY(name) name,
enum StackPhase : int { PLAIT_STACK_PHASES(PLAIT_ENUM_ENTRY) kNumStackPhases };
#undef PLAIT_ENUM_ENTRY

namespace avx2 {
// The seconds each phase took since the last call (summed over steps and layers) and the number of
// steps, then reset; `enable` turns the clock on or off for the steps that follow.
void stack_profile(bool enable, double* seconds, int64_t* steps);

// Runs all layers of the stack for one step (see stack_avx2.cpp): on return `x` and `residual`
// hold the last layer's output and the running sum, for the final norm.
void decoder_stack(const int64_t* args, const int64_t* layers, float eps, float scale);
}  // namespace avx2

}  // namespace plait
