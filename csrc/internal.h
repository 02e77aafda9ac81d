/* Internal glue between dispatch.c and the per-ISA kernel objects. Not installed. */
#ifndef FASTBP_INTERNAL_H
#define FASTBP_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "fastbp.h"

/* Products up to this many multiply-adds take the GEMM's direct path (no packing, no threads),
 * which sums each element's K terms in order in one register. */
#define FBP_GEMM_DIRECT_MAX_MACS (24 * 24 * 24)

/* Up to this many outputs the squared-error loss is summed in order by one scalar loop: the
 * vectorised reduction's setup and 16-term horizontal sum cost more than the rows themselves. */
#define FBP_MSE_SEQUENTIAL_MAX 32

/* A network the fused small-network step (small.c) can train: Linear ops only (with their fused
 * activations), every weight matrix at most FBP_SMALL_MAX_WEIGHTS elements. What the step needs
 * of a plan, borrowed from it for one call. */
#define FBP_SMALL_MAX_WEIGHTS 256
typedef struct {
    const fbp_op *ops;
    int32_t n_ops;
    void *params, *grads; /* n_params each */
    int64_t n_params;
    const void *input, *target; /* rows x in_features; rows targets */
    void *const *outs;          /* per op: rows x out_features */
    void *grad_a, *grad_b;      /* rows x max_width each */
    /* outs, grad_a and grad_b have a vector of slack after them (train.c's activation_bytes):
     * the step reads and writes whole vectors that run past a row's end */
} fbp_small_net;

/* One table of kernels per ISA and dtype; each kernel object defines its two tables. */
#define FBP_TABLE_FIELDS(T)                                                                        \
    fbp_status (*gemm)(T *, const T *, const T *, const T *, int64_t, int64_t, int64_t, int64_t,   \
                       int64_t, int64_t, int64_t, int64_t, T, T, fbp_activation);                  \
    fbp_status (*activation_forward)(T *, const T *, int64_t, fbp_activation);                     \
    fbp_status (*activation_backward)(T *, T *, const T *, const T *, int64_t, int64_t,            \
                                      fbp_activation, int);                                        \
    fbp_status (*softmax_xent)(double *, T *, const T *, const int64_t *, int64_t, int64_t,        \
                               double);                                                            \
    fbp_status (*mse)(double *, T *, const T *, const T *, int64_t, double);                       \
    fbp_status (*sgd_step)(T *, T *, const T *, int64_t, double, double, double, double, int,      \
                           int);                                                                   \
    fbp_status (*adam_step)(T *, T *, T *, const T *, int64_t, double, double, double, double,     \
                            double, int, int64_t);                                                 \
    fbp_status (*small_step)(const fbp_small_net *, double *, int64_t, fbp_loss, fbp_optimizer *); \
    fbp_status (*gemm_dact)(T *, T *, const T *, const T *, const T *, int64_t, int64_t, int64_t,  \
                            int64_t, int64_t, int64_t, int64_t, fbp_activation, int);              \
    fbp_status (*gemm_sgd)(T *, const T *, const T *, int64_t, int64_t, int64_t, int64_t, int64_t, \
                           int64_t, int64_t, T *, double, double, int);                            \
    fbp_status (*gemm_check_a)(T *, const T *, const T *, const T *, int64_t, int64_t, int64_t,    \
                               int64_t, int64_t, int64_t, int64_t, int64_t, T, T, fbp_activation,  \
                               int *);                                                             \
    int (*copy_finite)(T *, const T *, int64_t);                                                   \
    fbp_status (*gemm_rows)(T *, const T *, const int64_t *, const T *, const int64_t *,           \
                            const T *, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,       \
                            int64_t, int64_t, fbp_activation, T *, double, double, int, int *);    \
    fbp_status (*fma_probe)(double *, int64_t, int);

typedef struct {
    FBP_TABLE_FIELDS(float)
} fbp_table_f32;
typedef struct {
    FBP_TABLE_FIELDS(double)
} fbp_table_f64;

extern const fbp_table_f32 fbp_table_f32_generic, fbp_table_f32_avx2, fbp_table_f32_avx512;
extern const fbp_table_f64 fbp_table_f64_generic, fbp_table_f64_avx2, fbp_table_f64_avx512;

/* The fused step of a small network on `rows` rows of net->input and net->target: forward
 * (filling net->outs), the loss (*loss, the batch mean for the MSE and cross-entropy kinds), the
 * parameter gradients (overwriting net->grads) and, when opt is not NULL, its update (opt->step
 * incremented). The same bits as the plan's general walk and the optimizer kernels. Stops with
 * FBP_ERR_NONFINITE, before any gradient, when the loss is not finite. Requires every layer's
 * rows * in * out <= FBP_GEMM_DIRECT_MAX_MACS. Forwards to the active ISA. */
fbp_status fbp_small_step_f32(const fbp_small_net *net, double *loss, int64_t rows, fbp_loss kind,
                              fbp_optimizer *opt);
fbp_status fbp_small_step_f64(const fbp_small_net *net, double *loss, int64_t rows, fbp_loss kind,
                              fbp_optimizer *opt);

/* An input gradient with the previous layer's activation backward in its epilogue: dz (m x n,
 * dense) = (A' @ B') * act'(y), and dbias = (or, with accumulate, +=) the column sums of dz when
 * not NULL. The same bits as fbp_gemm (alpha 1, beta 0) followed by fbp_activation_backward on
 * its result; it saves that pass over dz and y. Forwards to the active ISA. */
fbp_status fbp_gemm_dact_f32(float *dz, float *dbias, const float *a, const float *b,
                             const float *y, int64_t m, int64_t n, int64_t k, int64_t rs_a,
                             int64_t cs_a, int64_t rs_b, int64_t cs_b, fbp_activation act,
                             int accumulate);
fbp_status fbp_gemm_dact_f64(double *dz, double *dbias, const double *a, const double *b,
                             const double *y, int64_t m, int64_t n, int64_t k, int64_t rs_a,
                             int64_t cs_a, int64_t rs_b, int64_t cs_b, fbp_activation act,
                             int accumulate);

/* A weight gradient with plain SGD's update in its epilogue: c (m x n, dense) = A' @ B', then
 * param (m x n, dense like c) -= lr * (c + weight_decay * param), as fbp_sgd_step with momentum
 * 0 would over those m * n elements. The same bits as fbp_gemm followed by that update; each
 * block of c is applied as it becomes final, on the thread that computed it. keep_grad 0: the
 * caller has no use for the gradient, and c may be left partly or wholly as it was (the tiles of
 * a product with k within one K block are not stored). Forwards to the active ISA. */
fbp_status fbp_gemm_sgd_f32(float *c, const float *a, const float *b, int64_t m, int64_t n,
                            int64_t k, int64_t rs_a, int64_t cs_a, int64_t rs_b, int64_t cs_b,
                            float *param, double lr, double weight_decay, int keep_grad);
fbp_status fbp_gemm_sgd_f64(double *c, const double *a, const double *b, int64_t m, int64_t n,
                            int64_t k, int64_t rs_a, int64_t cs_a, int64_t rs_b, int64_t cs_b,
                            double *param, double lr, double weight_decay, int keep_grad);

/* fbp_gemm that also tells whether A' holds NaN or infinity, from the values it reads anyway:
 * *a_finite = 0 when one is not finite, 1 when all are, and is left as it was when this
 * product's path does not check (products small enough for the direct kernel: the caller
 * checks A itself then). C is computed either way. fit's check of its first epoch's batches in
 * the first layer's forward; forwards to the active ISA. */
fbp_status fbp_gemm_check_a_f32(float *c, const float *a, const float *b, const float *bias,
                                int64_t m, int64_t n, int64_t k, int64_t rs_a, int64_t cs_a,
                                int64_t rs_b, int64_t cs_b, int64_t ldc, float alpha, float beta,
                                fbp_activation act, int *a_finite);
fbp_status fbp_gemm_check_a_f64(double *c, const double *a, const double *b, const double *bias,
                                int64_t m, int64_t n, int64_t k, int64_t rs_a, int64_t cs_a,
                                int64_t rs_b, int64_t cs_b, int64_t ldc, double alpha, double beta,
                                fbp_activation act, int *a_finite);

/* dst[0..n) = src[0..n) (not overlapping); returns 0 when a value is NaN or infinite, else 1.
 * train_step's checked copy of its batch; splits over threads for large n. Forwards to the
 * active ISA. */
int fbp_copy_finite_f32(float *dst, const float *src, int64_t n);
int fbp_copy_finite_f64(double *dst, const double *src, int64_t n);

/* c (m x n, row stride ldc) = act(A' @ B' + bias) where A' (m x k) and B' (k x n) are row-major
 * with some rows gathered through an index: row i of A' is a + a_rows[i] * rs_a (a_rows NULL:
 * a + i * rs_a), row p of B' is b + b_rows[p] * rs_b; an indexed operand must have unit column
 * stride. fit reads its shuffled batches this way, from X itself, in the first layer's forward
 * (a_rows) and weight gradient (b_rows) instead of a gathered copy. param not NULL: plain SGD's
 * update in the epilogue, as fbp_gemm_sgd (ldc = n, bias NULL, act identity). a_finite not NULL:
 * as fbp_gemm_check_a. The same bits as those kernels on the gathered rows. Only for products
 * above the direct path (m * n * k > FBP_GEMM_DIRECT_MAX_MACS), else FBP_ERR_INVALID. Forwards
 * to the active ISA. */
fbp_status fbp_gemm_rows_f32(float *c, const float *a, const int64_t *a_rows, const float *b,
                             const int64_t *b_rows, const float *bias, int64_t m, int64_t n,
                             int64_t k, int64_t rs_a, int64_t cs_a, int64_t rs_b, int64_t cs_b,
                             int64_t ldc, fbp_activation act, float *param, double lr,
                             double weight_decay, int keep_grad, int *a_finite);
fbp_status fbp_gemm_rows_f64(double *c, const double *a, const int64_t *a_rows, const double *b,
                             const int64_t *b_rows, const double *bias, int64_t m, int64_t n,
                             int64_t k, int64_t rs_a, int64_t cs_a, int64_t rs_b, int64_t cs_b,
                             int64_t ldc, fbp_activation act, double *param, double lr,
                             double weight_decay, int keep_grad, int *a_finite);

/* The active ISA's GEMM micro-kernel arithmetic alone (its accumulators' multiply-add chains,
 * no loads), iters steps on each of `threads` threads at once; *flops: the operations done. For
 * the benchmark's measured FMA peak. */
fbp_status fbp_fma_probe_f32(double *flops, int64_t iters, int threads);
fbp_status fbp_fma_probe_f64(double *flops, int64_t iters, int threads);

/* Threads for a piece of work: 1 when the work is small (below `grain` units per thread), up
 * to fbp_get_num_threads(). Work is split by deterministic ranges so results never depend on
 * the count. */
int fbp_team_size(int64_t work, int64_t grain);

/* The calling thread's floating-point mode with flush-to-zero and denormals-are-zero set when
 * fbp_get_flush_denormal() (MXCSR's FTZ and DAZ bits); fbp_fp_restore puts `saved` back. Each
 * thread of a parallel region has its own mode, so each one enters and restores. */
#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
static inline unsigned fbp_fp_flush_enter(void) {
    const unsigned saved = _mm_getcsr();
    if (fbp_get_flush_denormal()) _mm_setcsr(saved | 0x8040u); /* FTZ (bit 15) | DAZ (bit 6) */
    return saved;
}
static inline void fbp_fp_restore(unsigned saved) { _mm_setcsr(saved); }
#else
static inline unsigned fbp_fp_flush_enter(void) { return 0; }
static inline void fbp_fp_restore(unsigned saved) { (void)saved; }
#endif

/* A 64-byte aligned scratch buffer owned by the calling thread, grown on demand and reused,
 * so kernels do not allocate per call. Returns NULL when the allocation fails. The pointer is
 * valid until the same thread asks again. */
/* fbp_set_transposed_a_paths' setting. */
int fbp_get_transposed_a_paths(void);

void *fbp_scratch(size_t bytes);
/* A second such buffer, for a kernel that holds one result while calling a kernel that uses
 * the first (the GEMM's transposed route). */
void *fbp_scratch_aux(size_t bytes);

#define FBP_ALIGN 64

#define FBP_CAT_(a, b) a##b
#define FBP_CAT(a, b) FBP_CAT_(a, b)
#define FBP_CAT3(a, b, c) FBP_CAT(FBP_CAT(a, b), c)

/* Split [0, total) into `parts` near-equal contiguous ranges; range `index` is [*lo, *hi). */
static inline void fbp_split_range(int64_t total, int parts, int index, int64_t *lo, int64_t *hi) {
    int64_t base = total / parts, extra = total % parts;
    *lo = index * base + (index < extra ? index : extra);
    *hi = *lo + base + (index < extra);
}

#endif /* FASTBP_INTERNAL_H */
