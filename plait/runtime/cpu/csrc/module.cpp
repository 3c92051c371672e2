// Python bindings of the CPU kernels: plain functions over integers (data pointers, sizes) and
// floats, called through METH_FASTCALL so a call costs well under a microsecond. The Python side
// (plait/runtime/cpu/kernels.py) checks every tensor before handing its pointer over. Each call
// releases the GIL while it computes.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <atomic>
#include <cstdlib>
#include <string>

#include <sys/syscall.h>
#include <unistd.h>

#include "amx_config.h"
#include "kernels.h"
#include "stack.h"

namespace {

#define PLAIT_NAME_ENTRY(name) #name,
const char* const kStackFieldNames[] = {PLAIT_STACK_FIELDS(PLAIT_NAME_ENTRY)};
const char* const kLayerFieldNames[] = {PLAIT_LAYER_FIELDS(PLAIT_NAME_ENTRY)};
#undef PLAIT_NAME_ENTRY
// "kPhaseRopeStore" -> "rope_store"
const char* const kStackPhaseNames[] = {"norm", "qkv", "rope_store", "attention", "o", "gate_up", "silu_mul", "down"};
static_assert(sizeof(kStackPhaseNames) / sizeof(kStackPhaseNames[0]) == plait::kNumStackPhases);

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return false;
#endif
}

// AMX tiles with bfloat16 products (and AVX-512 BF16 for the conversions), granted to this process.
bool cpu_has_amx() {
#if defined(__x86_64__) && defined(__linux__) && PLAIT_HAVE_AMX
    __builtin_cpu_init();
    if (!cpu_has_avx2() || !__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
        !__builtin_cpu_supports("avx512bf16") || !__builtin_cpu_supports("amx-tile") ||
        !__builtin_cpu_supports("amx-bf16"))
        return false;
    // Linux gives a process AMX's tile data only on request (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA).
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
}

// Argument readers; on a wrong type they set the Python error, which the caller checks once.
int64_t i64(PyObject* o) { return PyLong_AsLongLong(o); }
template <typename T>
T* ptr(PyObject* o) {
    return reinterpret_cast<T*>(static_cast<uintptr_t>(PyLong_AsUnsignedLongLong(o)));
}
float f32(PyObject* o) { return static_cast<float>(PyFloat_AsDouble(o)); }

bool check_args(const char* name, Py_ssize_t nargs, Py_ssize_t expected) {
    if (nargs != expected) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd arguments (%zd given)", name, expected, nargs);
        return false;
    }
    return true;
}

PyObject* done() {
    if (PyErr_Occurred()) return nullptr;
    Py_RETURN_NONE;
}

PyObject* py_isa(PyObject*, PyObject*) { return PyUnicode_FromString(cpu_has_avx2() ? "avx2" : "none"); }

// linear(x, M, K, w, fmt, N, bias, y, ldy, nthreads)
PyObject* py_linear(PyObject*, PyObject* const* a, Py_ssize_t n) {
    if (!check_args("linear", n, 10)) return nullptr;
    auto x = ptr<const float>(a[0]);
    auto M = i64(a[1]), K = i64(a[2]);
    auto w = ptr<const uint8_t>(a[3]);
    int fmt = int(i64(a[4]));
    auto N = i64(a[5]);
    auto bias = ptr<const float>(a[6]);
    auto y = ptr<float>(a[7]);
    auto ldy = i64(a[8]);
    int nthreads = int(i64(a[9]));
    if (PyErr_Occurred()) return nullptr;
    Py_BEGIN_ALLOW_THREADS plait::avx2::linear(x, M, K, w, fmt, N, bias, y, ldy, nthreads);
    Py_END_ALLOW_THREADS return done();
}

// int16_panel_bytes(N, K): the bytes int16_panel_pack writes for a weight [N, K]
PyObject* py_int16_panel_bytes(PyObject*, PyObject* const* a, Py_ssize_t n) {
    if (!check_args("int16_panel_bytes", n, 2)) return nullptr;
    auto N = i64(a[0]), K = i64(a[1]);
    if (PyErr_Occurred()) return nullptr;
    return PyLong_FromSize_t(plait::avx512::int16_panel_bytes(N, K));
}

// int16_panel_pack(w, fmt, N, K, out); only where vnni() is True
PyObject* py_int16_panel_pack(PyObject*, PyObject* const* a, Py_ssize_t n) {
    if (!check_args("int16_panel_pack", n, 5)) return nullptr;
    auto w = ptr<const uint8_t>(a[0]);
    int fmt = int(i64(a[1]));
    auto N = i64(a[2]), K = i64(a[3]);
    auto out = ptr<uint8_t>(a[4]);
    if (PyErr_Occurred()) return nullptr;
    Py_BEGIN_ALLOW_THREADS plait::avx512::int16_panel_pack(w, fmt, N, K, out);
    Py_END_ALLOW_THREADS return done();
}

// int14_panel_bytes(N, K): the bytes int14_panel_pack writes for a weight [N, K]
PyObject* py_int14_panel_bytes(PyObject*, PyObject* const* a, Py_ssize_t n) {
    if (!check_args("int14_panel_bytes", n, 2)) return nullptr;
    auto N = i64(a[0]), K = i64(a[1]);
    if (PyErr_Occurred()) return nullptr;
    return PyLong_FromSize_t(plait::avx512::int14_panel_bytes(N, K));
}

// int14_panel_pack(w, fmt, N, K, out); only where vnni() is True and int14_packs(fmt)
PyObject* py_int14_panel_pack(PyObject*, PyObject* const* a, Py_ssize_t n) {
    if (!check_args("int14_panel_pack", n, 5)) return nullptr;
    auto w = ptr<const uint8_t>(a[0]);
    int fmt = int(i64(a[1]));
    auto N = i64(a[2]), K = i64(a[3]);
    auto out = ptr<uint8_t>(a[4]);
    if (PyErr_Occurred()) return nullptr;
    if (!plait::avx512::int14_packs(fmt)) {
        PyErr_SetString(PyExc_ValueError, "int14 panels are packed from block formats");
        return nullptr;
    }
    Py_BEGIN_ALLOW_THREADS plait::avx512::int14_panel_pack(w, fmt, N, K, out);
    Py_END_ALLOW_THREADS return done();
}

// int14_linear(x, M, K, packed, N, bias, y, ldy, nthreads); only where vnni() is True
PyObject* py_int14_linear(PyObject*, PyObject* const* a, Py_ssize_t n) {
    if (!check_args("int14_linear", n, 9)) return nullptr;
    auto x = ptr<const float>(a[0]);
    auto M = i64(a[1]), K = i64(a[2]);
    auto packed = ptr<const uint8_t>(a[3]);
    auto N = i64(a[4]);
    auto bias = ptr<const float>(a[5]);
    auto y = ptr<float>(a[6]);
    auto ldy = i64(a[7]);
    int nthreads = int(i64(a[8]));
    if (PyErr_Occurred()) return nullptr;
    Py_BEGIN_ALLOW_THREADS plait::avx2::int14_linear(x, M, K, packed, N, bias, y, ldy, nthreads);
    Py_END_ALLOW_THREADS return done();
}

// int14_gated_linear(x, M, K, packed, I, out, nthreads); only where vnni() is True, I % 32 == 0
PyObject* py_int14_gated_linear(PyObject*, PyObject* const* a, Py_ssize_t n) {
    if (!check_args("int14_gated_linear", n, 7)) return nullptr;
    auto x = ptr<const float>(a[0]);
    auto M = i64(a[1]), K = i64(a[2]);
    auto packed = ptr<const uint8_t>(a[3]);
    auto I = i64(a[4]);
    auto out = ptr<float>(a[5]);
    int nthreads = int(i64(a[6]));
    if (PyErr_Occurred()) return nullptr;
    Py_BEGIN_ALLOW_THREADS plait::avx2::int14_gated_linear(x, M, K, packed, I, out, nthreads);
    Py_END_ALLOW_THREADS return done();
}

// q4_panel_bytes(N, K): the bytes q4_panel_pack writes for a weight [N, K]
PyObject* py_q4_panel_bytes(PyObject*, PyObject* const* a, Py_ssize_t n) {
    if (!check_args("q4_panel_bytes", n, 2)) return nullptr;
    auto N = i64(a[0]), K = i64(a[1]);
    if (PyErr_Occurred()) return nullptr;
    return PyLong_FromSize_t(plait::avx512::q4_panel_bytes(N, K));
}

// q4_panel_pack(w, fmt, N, K, out); only where vnni() is True and q4_panel_packs(fmt)
PyObject* py_q4_panel_pack(PyObject*, PyObject* const* a, Py_ssize_t n) {
    if (!check_args("q4_panel_pack", n, 5)) return nullptr;
    auto w = ptr<const uint8_t>(a[0]);
    int fmt = int(i64(a[1]));
    auto N = i64(a[2]), K = i64(a[3]);
    auto out = ptr<uint8_t>(a[4]);
    if (PyErr_Occurred()) return nullptr;
    if (!plait::avx512::q4_panel_packs(fmt)) {
        PyErr_SetString(PyExc_ValueError, "4-bit panels are packed from 4-bit block formats");
        return nullptr;
    }
    Py_BEGIN_ALLOW_THREADS plait::avx512::q4_panel_pack(w, fmt, N, K, out);
    Py_END_ALLOW_THREADS return done();
}

// q4_panel_linear(x, M, K, packed, N, bias, y, ldy, nthreads); only where vnni() is True
PyObject* py_q4_panel_linear(PyObject*, PyObject* const* a, Py_ssize_t n) {
    if (!check_args("q4_panel_linear", n, 9)) return nullptr;
    auto x = ptr<const float>(a[0]);
    auto M = i64(a[1]), K = i64(a[2]);
    auto packed = ptr<const uint8_t>(a[3]);
    auto N = i64(a[4]);
    auto bias = ptr<const float>(a[5]);
    auto y = ptr<float>(a[6]);
    auto ldy = i64(a[7]);
    int nthreads = int(i64(a[8]));
    if (PyErr_Occurred()) return nullptr;
    Py_BEGIN_ALLOW_THREADS plait::avx2::q4_panel_linear(x, M, K, packed, N, bias, y, ldy, nthreads);
    Py_END_ALLOW_THREADS return done();
}

// q4_panel_gated_linear(x, M, K, packed, I, out, nthreads); only where vnni() is True, I % 16 == 0
PyObject* py_q4_panel_gated_linear(PyObject*, PyObject* const* a, Py_ssize_t n) {
    if (!check_args("q4_panel_gated_linear", n, 7)) return nullptr;
    auto x = ptr<const float>(a[0]);
    auto M = i64(a[1]), K = i64(a[2]);
    auto packed = ptr<const uint8_t>(a[3]);
    auto I = i64(a[4]);
    auto out = ptr<float>(a[5]);
    int nthreads = int(i64(a[6]));
    if (PyErr_Occurred()) return nullptr;
    Py_BEGIN_ALLOW_THREADS plait::avx2::q4_panel_gated_linear(x, M, K, packed, I, out, nthreads);
    Py_END_ALLOW_THREADS return done();
}

// linear_packed(x, M, K, w, packed, fmt, N, bias, y, ldy, nthreads)
PyObject* py_linear_packed(PyObject*, PyObject* const* a, Py_ssize_t n) {
    if (!check_args("linear_packed", n, 11)) return nullptr;
    auto x = ptr<const float>(a[0]);
    auto M = i64(a[1]), K = i64(a[2]);
    auto w = ptr<const uint8_t>(a[3]);
    auto packed = ptr<const uint8_t>(a[4]);
    int fmt = int(i64(a[5]));
    auto N = i64(a[6]);
    auto bias = ptr<const float>(a[7]);
    auto y = ptr<float>(a[8]);
    auto ldy = i64(a[9]);
    int nthreads = int(i64(a[10]));
    if (PyErr_Occurred()) return nullptr;
    Py_BEGIN_ALLOW_THREADS plait::avx2::linear_packed(x, M, K, w, packed, fmt, N, bias, y, ldy, nthreads);
    Py_END_ALLOW_THREADS return done();
}

// AMX's int8 tile products besides (int8_linear): only after amx() returned True.
PyObject* py_amx_int8(PyObject*, PyObject*) {
#if defined(__x86_64__) && defined(__linux__) && PLAIT_HAVE_AMX
    __builtin_cpu_init();
    return PyBool_FromLong(cpu_has_amx() && __builtin_cpu_supports("amx-int8") && __builtin_cpu_supports("avx512dq"));
#else
    Py_RETURN_FALSE;
#endif
}

// amx_int8_linear(x, M, K, packed, N, bias, y, ldy, nthreads, q8); only after amx_int8() returned True
PyObject* py_amx_int8_linear(PyObject*, PyObject* const* a, Py_ssize_t n) {
    if (!check_args("amx_int8_linear", n, 10)) return nullptr;
    auto x = ptr<const float>(a[0]);
    auto M = i64(a[1]), K = i64(a[2]);
    auto packed = ptr<const uint8_t>(a[3]);
    auto N = i64(a[4]);
    auto bias = ptr<const float>(a[5]);
    auto y = ptr<float>(a[6]);
    auto ldy = i64(a[7]);
    int nthreads = int(i64(a[8]));
    bool q8 = i64(a[9]) != 0;
    if (PyErr_Occurred()) return nullptr;
    Py_BEGIN_ALLOW_THREADS plait::amx::int8_linear(x, M, K, packed, N, bias, y, ldy, nthreads, q8);
    Py_END_ALLOW_THREADS return done();
}

PyObject* py_amx(PyObject*, PyObject*) {
    static const bool ok = cpu_has_amx();
    return PyBool_FromLong(ok);
}

// amx_linear(x, M, K, packed, N, bias, y, ldy, nthreads, exact); only after amx() returned True
PyObject* py_amx_linear(PyObject*, PyObject* const* a, Py_ssize_t n) {
    if (!check_args("amx_linear", n, 10)) return nullptr;
    auto x = ptr<const float>(a[0]);
    auto M = i64(a[1]), K = i64(a[2]);
    auto packed = ptr<const uint16_t>(a[3]);
    auto N = i64(a[4]);
    auto bias = ptr<const float>(a[5]);
    auto y = ptr<float>(a[6]);
    auto ldy = i64(a[7]);
    int nthreads = int(i64(a[8]));
    bool exact = i64(a[9]) != 0;
    if (PyErr_Occurred()) return nullptr;
    Py_BEGIN_ALLOW_THREADS plait::amx::linear(x, M, K, packed, N, bias, y, ldy, nthreads, exact);
    Py_END_ALLOW_THREADS return done();
}

// embedding(ids, n, w, fmt, K, out, nthreads)
PyObject* py_embedding(PyObject*, PyObject* const* a, Py_ssize_t n) {
    if (!check_args("embedding", n, 7)) return nullptr;
    auto ids = ptr<const int64_t>(a[0]);
    auto count = i64(a[1]);
    auto w = ptr<const uint8_t>(a[2]);
    int fmt = int(i64(a[3]));
    auto K = i64(a[4]);
    auto out = ptr<float>(a[5]);
    int nthreads = int(i64(a[6]));
    if (PyErr_Occurred()) return nullptr;
    Py_BEGIN_ALLOW_THREADS plait::avx2::embedding(ids, count, w, fmt, K, out, nthreads);
    Py_END_ALLOW_THREADS return done();
}

// rmsnorm(x, residual, weight, M, H, eps, out, nthreads)
PyObject* py_rmsnorm(PyObject*, PyObject* const* a, Py_ssize_t n) {
    if (!check_args("rmsnorm", n, 8)) return nullptr;
    auto x = ptr<const float>(a[0]);
    auto residual = ptr<float>(a[1]);
    auto weight = ptr<const float>(a[2]);
    auto M = i64(a[3]), H = i64(a[4]);
    float eps = f32(a[5]);
    auto out = ptr<float>(a[6]);
    int nthreads = int(i64(a[7]));
    if (PyErr_Occurred()) return nullptr;
    Py_BEGIN_ALLOW_THREADS plait::avx2::rmsnorm(x, residual, weight, M, H, eps, out, nthreads);
    Py_END_ALLOW_THREADS return done();
}

// silu_mul(x, M, I, out, nthreads)
PyObject* py_silu_mul(PyObject*, PyObject* const* a, Py_ssize_t n) {
    if (!check_args("silu_mul", n, 5)) return nullptr;
    auto x = ptr<const float>(a[0]);
    auto M = i64(a[1]), I = i64(a[2]);
    auto out = ptr<float>(a[3]);
    int nthreads = int(i64(a[4]));
    if (PyErr_Occurred()) return nullptr;
    Py_BEGIN_ALLOW_THREADS plait::avx2::silu_mul(x, M, I, out, nthreads);
    Py_END_ALLOW_THREADS return done();
}

// gated_linear(x, M, K, w, fmt, I, out, nthreads)
PyObject* py_gated_linear(PyObject*, PyObject* const* a, Py_ssize_t n) {
    if (!check_args("gated_linear", n, 8)) return nullptr;
    auto x = ptr<const float>(a[0]);
    auto M = i64(a[1]), K = i64(a[2]);
    auto w = ptr<const uint8_t>(a[3]);
    int fmt = int(i64(a[4]));
    auto I = i64(a[5]);
    auto out = ptr<float>(a[6]);
    int nthreads = int(i64(a[7]));
    if (PyErr_Occurred()) return nullptr;
    Py_BEGIN_ALLOW_THREADS plait::avx2::gated_linear(x, M, K, w, fmt, I, out, nthreads);
    Py_END_ALLOW_THREADS return done();
}

// rope_store(q, k, v, M, Hq, Hkv, D, q_stride, k_stride, v_stride, positions, table, k_cache, v_cache,
//            cache_fmt, loc, nthreads)
PyObject* py_rope_store(PyObject*, PyObject* const* a, Py_ssize_t n) {
    if (!check_args("rope_store", n, 17)) return nullptr;
    auto q = ptr<float>(a[0]);
    auto k = ptr<float>(a[1]);
    auto v = ptr<const float>(a[2]);
    auto M = i64(a[3]), Hq = i64(a[4]), Hkv = i64(a[5]), D = i64(a[6]);
    auto qs = i64(a[7]), ks = i64(a[8]), vs = i64(a[9]);
    auto positions = ptr<const int64_t>(a[10]);
    auto table = ptr<const float>(a[11]);
    auto kc = ptr<void>(a[12]);
    auto vc = ptr<void>(a[13]);
    int fmt = int(i64(a[14]));
    auto loc = ptr<const int64_t>(a[15]);
    int nthreads = int(i64(a[16]));
    if (PyErr_Occurred()) return nullptr;
    Py_BEGIN_ALLOW_THREADS plait::avx2::rope_store(q, k, v, M, Hq, Hkv, D, qs, ks, vs, positions, table, kc, vc, fmt,
                                                   loc, nthreads);
    Py_END_ALLOW_THREADS return done();
}

// attention(q, q_row_stride, q_rows, q_off, q_len, slots, slot_off, kv_len, num_seqs, causal, k_cache,
//           v_cache, cache_fmt, Hq, Hkv, D, scale, out, lse, nthreads)
PyObject* py_attention(PyObject*, PyObject* const* a, Py_ssize_t n) {
    if (!check_args("attention", n, 21)) return nullptr;
    auto q = ptr<const float>(a[0]);
    auto q_row_stride = i64(a[1]);
    auto q_rows = ptr<const int64_t>(a[2]);
    auto q_off = ptr<const int64_t>(a[3]);
    auto q_len = ptr<const int64_t>(a[4]);
    auto slots = ptr<const int64_t>(a[5]);
    auto slot_off = ptr<const int64_t>(a[6]);
    auto kv_len = ptr<const int64_t>(a[7]);
    auto num_seqs = i64(a[8]);
    bool causal = PyObject_IsTrue(a[9]) == 1;
    auto kc = ptr<const void>(a[10]);
    auto vc = ptr<const void>(a[11]);
    int fmt = int(i64(a[12]));
    auto Hq = i64(a[13]), Hkv = i64(a[14]), D = i64(a[15]);
    float scale = f32(a[16]);
    auto out = ptr<float>(a[17]);
    auto lse = ptr<float>(a[18]);
    int nthreads = int(i64(a[19]));
    int mode = int(i64(a[20]));
    if (PyErr_Occurred()) return nullptr;
    Py_BEGIN_ALLOW_THREADS plait::avx2::attention(q, q_row_stride, q_rows, q_off, q_len, slots, slot_off, kv_len,
                                                  num_seqs, causal, kc, vc, fmt, Hq, Hkv, D, scale, out, lse,
                                                  nthreads, mode);
    Py_END_ALLOW_THREADS return done();
}

// decoder_stack(args, layers, eps, scale): pointers to the int64 argument block and layer table.
PyObject* py_decoder_stack(PyObject*, PyObject* const* a, Py_ssize_t n) {
    if (!check_args("decoder_stack", n, 4)) return nullptr;
    auto args = ptr<const int64_t>(a[0]);
    auto layers = ptr<const int64_t>(a[1]);
    float eps = f32(a[2]), scale = f32(a[3]);
    if (PyErr_Occurred()) return nullptr;
    Py_BEGIN_ALLOW_THREADS plait::avx2::decoder_stack(args, layers, eps, scale);
    Py_END_ALLOW_THREADS return done();
}

// stack_profile(enable) -> (steps, {phase: seconds}) since the last call; turns the clock on or off.
PyObject* py_stack_profile(PyObject*, PyObject* arg) {
    const int enable = PyObject_IsTrue(arg);
    if (enable < 0) return nullptr;
    double seconds[plait::kNumStackPhases];
    int64_t steps = 0;
    plait::avx2::stack_profile(enable == 1, seconds, &steps);
    PyObject* phases = PyDict_New();
    if (phases == nullptr) return nullptr;
    for (int p = 0; p < plait::kNumStackPhases; ++p) {
        PyObject* v = PyFloat_FromDouble(seconds[p]);
        if (v == nullptr || PyDict_SetItemString(phases, kStackPhaseNames[p], v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(phases);
            return nullptr;
        }
        Py_DECREF(v);
    }
    return Py_BuildValue("(LN)", static_cast<long long>(steps), phases);
}

PyObject* names_tuple(const char* const* names, int count) {
    PyObject* t = PyTuple_New(count);
    if (t == nullptr) return nullptr;
    for (int i = 0; i < count; ++i) {
        // "kMainQRows" -> "main_q_rows"
        std::string out;
        for (const char* c = names[i] + 1; *c; ++c) {
            if (*c >= 'A' && *c <= 'Z') {
                if (!out.empty()) out += '_';
                out += char(*c - 'A' + 'a');
            } else {
                out += *c;
            }
        }
        PyTuple_SET_ITEM(t, i, PyUnicode_FromString(out.c_str()));
    }
    return t;
}


PyObject* py_stack_fields(PyObject*, PyObject*) { return names_tuple(kStackFieldNames, plait::kNumStackFields); }
PyObject* py_layer_fields(PyObject*, PyObject*) { return names_tuple(kLayerFieldNames, plait::kNumLayerFields); }

// avx512(on=None) -> whether products of more than 8 rows run on AVX-512; with a bool, turns them on
// (where the CPU has AVX-512) or off and returns the previous setting.
PyObject* py_avx512(PyObject*, PyObject* const* a, Py_ssize_t n) {
    if (n > 1) {
        PyErr_SetString(PyExc_TypeError, "avx512 takes at most one argument");
        return nullptr;
    }
    if (n == 0) return PyBool_FromLong(plait::avx512::enabled());
    const int on = PyObject_IsTrue(a[0]);
    if (on < 0) return nullptr;
    return PyBool_FromLong(plait::avx512::set_enabled(on));
}

PyObject* py_vnni(PyObject*, PyObject*) { return PyBool_FromLong(plait::avx512::decode_enabled()); }

PyMethodDef methods[] = {
    {"stack_fields", py_stack_fields, METH_NOARGS, "Names of decoder_stack's argument fields, in order."},
    {"layer_fields", py_layer_fields, METH_NOARGS, "Names of decoder_stack's per-layer fields, in order."},
    {"decoder_stack", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_decoder_stack)), METH_FASTCALL,
     nullptr},
    {"stack_profile", py_stack_profile, METH_O,
     "stack_profile(enable) -> (steps, {phase: seconds}) since the last call, and the clock on or off."},
    {"isa", py_isa, METH_NOARGS, "The instruction set the kernels run with on this CPU: 'avx2' or 'none'."},
    {"avx512", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_avx512)), METH_FASTCALL,
     "avx512(on=None): whether products of more than 8 rows run on AVX-512; a bool sets it (returns the old)."},
    {"vnni", py_vnni, METH_NOARGS,
     "Whether the integer products on AVX-512 VNNI run here (the CPU has it and the AVX-512 kernels are on)."},
    {"amx", py_amx, METH_NOARGS, "Whether this CPU and OS run the AMX products (amx_linear, the stack's AMX weights)."},
    {"amx_int8", py_amx_int8, METH_NOARGS, "Whether AMX's int8 tiles run here too (amx_int8_linear)."},
    {"amx_int8_linear", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_amx_int8_linear)), METH_FASTCALL,
     nullptr},
    {"amx_linear", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_amx_linear)), METH_FASTCALL, nullptr},
    {"linear", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_linear)), METH_FASTCALL, nullptr},
    {"linear_packed", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_linear_packed)), METH_FASTCALL,
     nullptr},
    {"int16_panel_bytes", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_int16_panel_bytes)),
     METH_FASTCALL, nullptr},
    {"int16_panel_pack", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_int16_panel_pack)),
     METH_FASTCALL, nullptr},
    {"int14_panel_bytes", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_int14_panel_bytes)),
     METH_FASTCALL, nullptr},
    {"int14_panel_pack", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_int14_panel_pack)),
     METH_FASTCALL, nullptr},
    {"int14_linear", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_int14_linear)), METH_FASTCALL,
     nullptr},
    {"int14_gated_linear", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_int14_gated_linear)),
     METH_FASTCALL, nullptr},
    {"q4_panel_bytes", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_q4_panel_bytes)), METH_FASTCALL,
     nullptr},
    {"q4_panel_pack", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_q4_panel_pack)), METH_FASTCALL,
     nullptr},
    {"q4_panel_linear", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_q4_panel_linear)), METH_FASTCALL,
     nullptr},
    {"q4_panel_gated_linear", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_q4_panel_gated_linear)),
     METH_FASTCALL, nullptr},
    {"gated_linear", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_gated_linear)), METH_FASTCALL,
     nullptr},
    {"embedding", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_embedding)), METH_FASTCALL, nullptr},
    {"rmsnorm", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_rmsnorm)), METH_FASTCALL, nullptr},
    {"silu_mul", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_silu_mul)), METH_FASTCALL, nullptr},
    {"rope_store", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_rope_store)), METH_FASTCALL, nullptr},
    {"attention", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_attention)), METH_FASTCALL, nullptr},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_kernels", "Plait's CPU kernels (see kernels.h).", -1, methods};

}  // namespace

namespace plait::avx512 {
namespace {
bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_cpu_init();
    return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
    return false;
#endif
}

bool env_off(const char* name) {
    const char* v = std::getenv(name);
    return v != nullptr && *v != '\0' && std::string(v) != "0";
}

const bool g_supported = cpu_has_avx512();
const bool g_vnni = g_supported && __builtin_cpu_supports("avx512vnni");
std::atomic<bool> g_enabled{g_supported && !env_off("PLAIT_DISABLE_CPU_AVX512")};
}  // namespace

bool enabled() { return g_enabled.load(std::memory_order_relaxed); }

bool decode_enabled() { return g_vnni && enabled(); }

bool set_enabled(bool on) { return g_enabled.exchange(on && g_supported); }
}  // namespace plait::avx512

PyMODINIT_FUNC PyInit__kernels() { return PyModule_Create(&module_def); }
