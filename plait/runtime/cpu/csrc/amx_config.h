// Whether this compiler builds Plait's AMX kernels (linear_amx.cpp, attention_amx.cpp).
#pragma once

// Compilers that know AMX's intrinsics (GCC 11, Clang 12 and later) build the AMX kernels; with
// older ones the module reports no AMX and the stubs below are never called.
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)
#define PLAIT_HAVE_AMX 1
#else
#define PLAIT_HAVE_AMX 0
#endif
