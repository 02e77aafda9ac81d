/* Run-time dispatch: detect the CPU once, point the public kernels at the best compiled-in
 * table (or the one FASTBP_ISA asked for), and own the thread-count setting. Compiled without
 * ISA flags, so nothing here can execute an instruction the CPU lacks. */
#include <omp.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"

#ifndef FASTBP_VERSION
#define FASTBP_VERSION "unknown"
#endif

static const char *const isa_names[FBP_ISA_COUNT] = {"generic", "avx2", "avx512"};

static const fbp_table_f32 *const tables_f32[FBP_ISA_COUNT] = {
    &fbp_table_f32_generic,
#ifdef FBP_HAVE_AVX2
    &fbp_table_f32_avx2,
#else
    NULL,
#endif
#ifdef FBP_HAVE_AVX512
    &fbp_table_f32_avx512,
#else
    NULL,
#endif
};
static const fbp_table_f64 *const tables_f64[FBP_ISA_COUNT] = {
    &fbp_table_f64_generic,
#ifdef FBP_HAVE_AVX2
    &fbp_table_f64_avx2,
#else
    NULL,
#endif
#ifdef FBP_HAVE_AVX512
    &fbp_table_f64_avx512,
#else
    NULL,
#endif
};

/* Until fbp_select_isa runs, the generic kernels: correct everywhere. */
static fbp_isa active_isa = FBP_ISA_GENERIC;
static const fbp_table_f32 *active_f32 = &fbp_table_f32_generic;
static const fbp_table_f64 *active_f64 = &fbp_table_f64_generic;

static int cpu_supports(fbp_isa isa) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    switch (isa) {
    case FBP_ISA_GENERIC:
        return 1;
    case FBP_ISA_AVX2: /* the kernels use FMA and F16C alongside AVX2 */
        return __builtin_cpu_supports("avx2") != 0 && __builtin_cpu_supports("fma") != 0;
    case FBP_ISA_AVX512:
        return __builtin_cpu_supports("avx512f") != 0 && __builtin_cpu_supports("avx512vl") != 0 &&
               __builtin_cpu_supports("avx512bw") != 0 && __builtin_cpu_supports("avx512dq") != 0 &&
               __builtin_cpu_supports("avx2") != 0 && __builtin_cpu_supports("fma") != 0;
    default:
        return 0;
    }
#else
    return isa == FBP_ISA_GENERIC;
#endif
}

int fbp_isa_available(fbp_isa isa) {
    if ((unsigned)isa >= FBP_ISA_COUNT || !tables_f32[isa] || !tables_f64[isa]) return 0;
    return cpu_supports(isa);
}

const char *fbp_isa_name(fbp_isa isa) {
    return (unsigned)isa < FBP_ISA_COUNT ? isa_names[isa] : "unknown";
}

fbp_isa fbp_active_isa(void) { return active_isa; }

fbp_status fbp_select_isa(const char *forced) {
    fbp_isa pick = FBP_ISA_GENERIC;
    if (forced && forced[0]) {
        int found = 0;
        for (int i = 0; i < FBP_ISA_COUNT; i++) {
            if (strcmp(forced, isa_names[i]) == 0) {
                pick = (fbp_isa)i;
                found = 1;
            }
        }
        if (!found) return FBP_ERR_INVALID;
        if (!fbp_isa_available(pick)) return FBP_ERR_UNSUPPORTED;
    } else {
        for (int i = FBP_ISA_COUNT - 1; i > 0; i--) {
            if (fbp_isa_available((fbp_isa)i)) {
                pick = (fbp_isa)i;
                break;
            }
        }
    }
    active_isa = pick;
    active_f32 = tables_f32[pick];
    active_f64 = tables_f64[pick];
    return FBP_OK;
}

/* ---- threads ------------------------------------------------------------------------------ */

static int requested_threads; /* 0: follow OpenMP's own setting */

void fbp_set_num_threads(int n) {
    __atomic_store_n(&requested_threads, n > 0 ? n : 0, __ATOMIC_RELAXED);
}

int fbp_get_num_threads(void) {
    int n = __atomic_load_n(&requested_threads, __ATOMIC_RELAXED);
    return n > 0 ? n : omp_get_max_threads();
}

static int flush_denormal = 1;

void fbp_set_flush_denormal(int on) {
    __atomic_store_n(&flush_denormal, on != 0, __ATOMIC_RELAXED);
}

int fbp_get_flush_denormal(void) { return __atomic_load_n(&flush_denormal, __ATOMIC_RELAXED); }

static int transposed_a_paths = 1;

void fbp_set_transposed_a_paths(int on) {
    __atomic_store_n(&transposed_a_paths, on != 0, __ATOMIC_RELAXED);
}

int fbp_get_transposed_a_paths(void) {
    return __atomic_load_n(&transposed_a_paths, __ATOMIC_RELAXED);
}

int fbp_team_size(int64_t work, int64_t grain) {
    int64_t useful = grain > 0 ? work / grain : work;
    /* before asking OpenMP anything: a tiny network's step makes a dozen of these calls */
    if (useful < 2) return 1;
    if (omp_in_parallel()) return 1; /* nested calls run inside the caller's team */
    int64_t n = fbp_get_num_threads();
    if (useful < n) n = useful;
    return n < 1 ? 1 : (int)n;
}

const char *fbp_openmp_info(void) {
    static char info[64];
    if (!info[0]) {
#if defined(__clang__)
        const char *runtime = "libomp";
#elif defined(__GNUC__)
        const char *runtime = "libgomp";
#else
        const char *runtime = "unknown";
#endif
        snprintf(info, sizeof info, "%s (OpenMP spec %d)", runtime, (int)_OPENMP);
    }
    return info;
}

/* ---- the public kernels: forward to the active table -------------------------------------- */

#define FBP_FORWARDERS(T, SFX, TABLE)                                                              \
    fbp_status fbp_gemm_##SFX(T *c, const T *a, const T *b, const T *bias, int64_t m, int64_t n,   \
                              int64_t k, int64_t rs_a, int64_t cs_a, int64_t rs_b, int64_t cs_b,   \
                              int64_t ldc, T alpha, T beta, fbp_activation act) {                  \
        return TABLE->gemm(c, a, b, bias, m, n, k, rs_a, cs_a, rs_b, cs_b, ldc, alpha, beta, act); \
    }                                                                                              \
    fbp_status fbp_activation_forward_##SFX(T *y, const T *x, int64_t n, fbp_activation act) {     \
        return TABLE->activation_forward(y, x, n, act);                                            \
    }                                                                                              \
    fbp_status fbp_activation_backward_##SFX(T *dz, T *dbias, const T *dy, const T *y,             \
                                             int64_t rows, int64_t cols, fbp_activation act,       \
                                             int accumulate) {                                     \
        return TABLE->activation_backward(dz, dbias, dy, y, rows, cols, act, accumulate);          \
    }                                                                                              \
    fbp_status fbp_softmax_xent_##SFX(double *loss, T *dlogits, const T *logits,                   \
                                      const int64_t *labels, int64_t rows, int64_t classes,        \
                                      double scale) {                                              \
        return TABLE->softmax_xent(loss, dlogits, logits, labels, rows, classes, scale);           \
    }                                                                                              \
    fbp_status fbp_mse_##SFX(double *loss, T *dpred, const T *pred, const T *target, int64_t n,    \
                             double scale) {                                                       \
        return TABLE->mse(loss, dpred, pred, target, n, scale);                                    \
    }                                                                                              \
    fbp_status fbp_sgd_step_##SFX(T *param, T *momentum_buf, const T *grad, int64_t n, double lr,  \
                                  double momentum, double dampening, double weight_decay,          \
                                  int nesterov, int first_step) {                                  \
        return TABLE->sgd_step(param, momentum_buf, grad, n, lr, momentum, dampening,              \
                               weight_decay, nesterov, first_step);                                \
    }                                                                                              \
    fbp_status fbp_adam_step_##SFX(T *param, T *exp_avg, T *exp_avg_sq, const T *grad, int64_t n,  \
                                   double lr, double beta1, double beta2, double eps,              \
                                   double weight_decay, int decoupled, int64_t step) {             \
        return TABLE->adam_step(param, exp_avg, exp_avg_sq, grad, n, lr, beta1, beta2, eps,        \
                                weight_decay, decoupled, step);                                    \
    }

FBP_FORWARDERS(float, f32, active_f32)
FBP_FORWARDERS(double, f64, active_f64)

/* The internal kernels (internal.h), the same way. */
#define FBP_INTERNAL_FORWARDERS(T, SFX, TABLE)                                                     \
    fbp_status fbp_small_step_##SFX(const fbp_small_net *net, double *loss, int64_t rows,          \
                                    fbp_loss kind, fbp_optimizer *opt) {                           \
        return TABLE->small_step(net, loss, rows, kind, opt);                                      \
    }                                                                                              \
    fbp_status fbp_gemm_dact_##SFX(T *dz, T *dbias, const T *a, const T *b, const T *y, int64_t m, \
                                   int64_t n, int64_t k, int64_t rs_a, int64_t cs_a, int64_t rs_b, \
                                   int64_t cs_b, fbp_activation act, int accumulate) {             \
        return TABLE->gemm_dact(dz, dbias, a, b, y, m, n, k, rs_a, cs_a, rs_b, cs_b, act,          \
                                accumulate);                                                       \
    }                                                                                              \
    fbp_status fbp_gemm_sgd_##SFX(T *c, const T *a, const T *b, int64_t m, int64_t n, int64_t k,   \
                                  int64_t rs_a, int64_t cs_a, int64_t rs_b, int64_t cs_b,          \
                                  T *param, double lr, double weight_decay, int keep_grad) {       \
        return TABLE->gemm_sgd(c, a, b, m, n, k, rs_a, cs_a, rs_b, cs_b, param, lr, weight_decay,  \
                               keep_grad);                                                         \
    }                                                                                              \
    fbp_status fbp_gemm_check_a_##SFX(T *c, const T *a, const T *b, const T *bias, int64_t m,      \
                                      int64_t n, int64_t k, int64_t rs_a, int64_t cs_a,            \
                                      int64_t rs_b, int64_t cs_b, int64_t ldc, T alpha, T beta,    \
                                      fbp_activation act, int *a_finite) {                         \
        return TABLE->gemm_check_a(c, a, b, bias, m, n, k, rs_a, cs_a, rs_b, cs_b, ldc, alpha,     \
                                   beta, act, a_finite);                                           \
    }                                                                                              \
    int fbp_copy_finite_##SFX(T *dst, const T *src, int64_t n) {                                   \
        return TABLE->copy_finite(dst, src, n);                                                    \
    }                                                                                              \
    fbp_status fbp_gemm_rows_##SFX(T *c, const T *a, const int64_t *a_rows, const T *b,            \
                                   const int64_t *b_rows, const T *bias, int64_t m, int64_t n,     \
                                   int64_t k, int64_t rs_a, int64_t cs_a, int64_t rs_b,            \
                                   int64_t cs_b, int64_t ldc, fbp_activation act, T *param,        \
                                   double lr, double weight_decay, int keep_grad, int *a_finite) { \
        return TABLE->gemm_rows(c, a, a_rows, b, b_rows, bias, m, n, k, rs_a, cs_a, rs_b, cs_b,    \
                                ldc, act, param, lr, weight_decay, keep_grad, a_finite);           \
    }                                                                                              \
    fbp_status fbp_fma_probe_##SFX(double *flops, int64_t iters, int threads) {                    \
        return TABLE->fma_probe(flops, iters, threads);                                            \
    }

FBP_INTERNAL_FORWARDERS(float, f32, active_f32)
FBP_INTERNAL_FORWARDERS(double, f64, active_f64)

const char *fbp_version(void) { return FASTBP_VERSION; }
