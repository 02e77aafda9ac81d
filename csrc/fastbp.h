/* fastbp: the one public C API.
 *
 * Conventions (after llm.c): outputs first, then inputs, then weights, then sizes.
 * `d` prefixes gradients. All sizes and strides are int64_t and counted in elements.
 * Matrices are row-major unless a stride pair says otherwise. Every function returns an
 * fbp_status; none of them prints, aborts or exits. The Python layer validates shapes and
 * dtypes before calling; the C layer still refuses negative sizes and NULL pointers. */
#ifndef FASTBP_H
#define FASTBP_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    FBP_OK = 0,
    FBP_ERR_INVALID = 1,     /* a size, stride, pointer or enum value is invalid */
    FBP_ERR_NOMEM = 2,       /* an aligned allocation failed */
    FBP_ERR_UNSUPPORTED = 3, /* the requested ISA is not available on this CPU/build */
} fbp_status;

typedef enum {
    FBP_ACT_IDENTITY = 0,
    FBP_ACT_SIGMOID = 1,
    FBP_ACT_RELU = 2,
    FBP_ACT_TANH = 3,
} fbp_activation;

typedef enum {
    FBP_ISA_GENERIC = 0,
    FBP_ISA_AVX2 = 1,
    FBP_ISA_AVX512 = 2,
    FBP_ISA_COUNT = 3,
} fbp_isa;

/* ---- dispatch and threads ------------------------------------------------------------ */

/* Detects the CPU and selects the best kernel table, or `forced` ("generic", "avx2",
 * "avx512"; NULL or "" = best). Safe to call again: the last successful call wins. */
fbp_status fbp_select_isa(const char *forced);
fbp_isa fbp_active_isa(void);
const char *fbp_isa_name(fbp_isa isa);
/* Nonzero when the ISA's kernels are compiled in and the CPU (and OS) support them. */
int fbp_isa_available(fbp_isa isa);

/* 0 = follow OpenMP (OMP_NUM_THREADS, omp_set_num_threads, threadpoolctl). */
void fbp_set_num_threads(int n);
int fbp_get_num_threads(void);
/* Name and version of the OpenMP runtime the kernels were built against. */
const char *fbp_openmp_info(void);

/* ---- kernels ----------------------------------------------------------------------------
 * Each kernel exists for float (_f32) and double (_f64) with the same argument list.
 *
 * GEMM with fused epilogue:
 *   C[m,n] = act(alpha * A'[m,k] @ B'[k,n] + beta * C + bias[n])
 * A' is addressed as a[i*rs_a + p*cs_a], B' as b[p*rs_b + j*cs_b] (so a transpose is a stride
 * swap; negative strides are fine). C is c[i*ldc + j], ldc >= n. bias may be NULL. When
 * beta == 0, C is not read (it may hold NaN). Results do not depend on the thread count:
 * threads split M and N, never K. */
#define FBP_DECLARE_KERNELS(T, SFX)                                                                \
    fbp_status fbp_gemm_##SFX(T *c, const T *a, const T *b, const T *bias, int64_t m, int64_t n,   \
                              int64_t k, int64_t rs_a, int64_t cs_a, int64_t rs_b, int64_t cs_b,   \
                              int64_t ldc, T alpha, T beta, fbp_activation act);                   \
    /* y[i] = act(x[i]); y may equal x. */                                                         \
    fbp_status fbp_activation_forward_##SFX(T *y, const T *x, int64_t n, fbp_activation act);      \
    /* dz[r,c] = dy[r,c] * act'(y[r,c]) computed from the activation's output y;                   \
     * dbias[c] = sum_r dz[r,c] when dbias != NULL. dz may equal dy. All rows contiguous. */       \
    fbp_status fbp_activation_backward_##SFX(T *dz, T *dbias, const T *dy, const T *y,             \
                                             int64_t rows, int64_t cols, fbp_activation act);      \
    /* Softmax + cross-entropy on integer labels. loss = scale * sum_r -log softmax(x_r)[y_r];     \
     * dlogits = scale * (softmax(x) - onehot(y)). Labels must lie in [0, classes). */             \
    fbp_status fbp_softmax_xent_##SFX(double *loss, T *dlogits, const T *logits,                   \
                                      const int64_t *labels, int64_t rows, int64_t classes,        \
                                      double scale);                                               \
    /* loss = scale * sum (p - t)^2; dpred = 2 * scale * (p - t). dpred may be NULL. */            \
    fbp_status fbp_mse_##SFX(double *loss, T *dpred, const T *pred, const T *target, int64_t n,    \
                             double scale);                                                        \
    /* torch.optim.SGD on a flat buffer. momentum_buf may be NULL when momentum == 0;              \
     * first_step = 1 initialises it with the gradient, as torch does. */                          \
    fbp_status fbp_sgd_step_##SFX(T *param, T *momentum_buf, const T *grad, int64_t n, double lr,  \
                                  double momentum, double dampening, double weight_decay,          \
                                  int nesterov, int first_step);                                   \
    /* torch.optim.Adam (decoupled = 0) / AdamW (decoupled = 1); step counts from 1. */            \
    fbp_status fbp_adam_step_##SFX(T *param, T *exp_avg, T *exp_avg_sq, const T *grad, int64_t n,  \
                                   double lr, double beta1, double beta2, double eps,              \
                                   double weight_decay, int decoupled, int64_t step);

FBP_DECLARE_KERNELS(float, f32)
FBP_DECLARE_KERNELS(double, f64)

#ifdef __cplusplus
}
#endif
#endif /* FASTBP_H */
