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
    FBP_ERR_NONFINITE = 4,   /* a training loss became NaN or infinite */
    FBP_ERR_STATE = 5,       /* called out of order (e.g. backward without a training forward) */
    FBP_ERR_INTERRUPTED = 6, /* a caller's callback asked to stop (it reports its own error) */
    FBP_ERR_NONFINITE_INPUT = 7, /* an input batch holds NaN or infinity (see each call) */
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
/* Whether the optimizer updates (sgd_step, adam_step, and so fit and train_step) run with the
 * x86 flush-to-zero and denormals-are-zero modes (default 1): a subnormal operand (|x| below
 * FLT_MIN = 1.2e-38 for float, DBL_MIN for double) reads as 0 and a subnormal result is stored
 * as 0. A moment decaying toward 0 otherwise spends ~150 steps as a subnormal, each multiply
 * taking a ~100-cycle microcode assist. Set per call; the caller's own FP mode is restored.
 * Not available (a no-op) on CPUs without SSE's MXCSR. */
void fbp_set_flush_denormal(int on);
int fbp_get_flush_denormal(void);
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
     * dbias[c] = sum_r dz[r,c] (+= with accumulate) when dbias != NULL. dz may equal dy. */       \
    fbp_status fbp_activation_backward_##SFX(T *dz, T *dbias, const T *dy, const T *y,             \
                                             int64_t rows, int64_t cols, fbp_activation act,       \
                                             int accumulate);                                      \
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

/* ---- the model plan: forward, backward, loss, update and the epoch loop (train.c) -----------
 * A model is a list of ops over one flat parameter buffer (and one of gradients, and one of
 * non-trained buffers such as BatchNorm's running statistics). Python builds the list once;
 * forward, backward, train_step and fit all run this one implementation. */

typedef enum { FBP_F32 = 0, FBP_F64 = 1 } fbp_dtype;

typedef enum {
    FBP_OP_LINEAR = 0,     /* y = act(x @ W.T + b); W (out, in) at `weight`, b at `bias` or -1 */
    FBP_OP_ACTIVATION = 1, /* y = act(x) */
    FBP_OP_DROPOUT = 2,    /* training: y = x * mask / (1 - p); eval: y = x */
    FBP_OP_BATCHNORM = 3,  /* torch's BatchNorm1d; gamma at `weight`, beta at `bias` (or -1) */
} fbp_op_kind;

typedef struct {
    int32_t kind;       /* fbp_op_kind */
    int32_t activation; /* fbp_activation: LINEAR's fused activation, or ACTIVATION's */
    int64_t in_features, out_features;
    int64_t weight, bias; /* element offsets into params/grads; -1 = absent */
    int64_t running;      /* BATCHNORM: running_mean at buffers[running], running_var after it */
    double p;             /* DROPOUT: drop probability. BATCHNORM: eps */
    double momentum;      /* BATCHNORM: running-statistics momentum */
} fbp_op;

typedef enum {
    FBP_LOSS_MSE = 0,           /* mean over all elements, like torch.nn.MSELoss() */
    FBP_LOSS_MSE_SUM = 1,       /* MSELoss(reduction="sum") */
    FBP_LOSS_CROSS_ENTROPY = 2, /* softmax + NLL on int64 labels, mean over the batch */
} fbp_loss;

typedef enum { FBP_OPT_SGD = 0, FBP_OPT_ADAM = 1, FBP_OPT_ADAMW = 2 } fbp_optimizer_kind;

/* An optimizer over a plan's whole flat parameter buffer. */
typedef struct {
    int32_t kind; /* fbp_optimizer_kind */
    int32_t nesterov;
    double lr, momentum, dampening, weight_decay, beta1, beta2, eps;
    int64_t step;          /* updates taken so far; each update increments it */
    void *state1, *state2; /* flat like params: SGD momentum buffer / Adam exp_avg, exp_avg_sq */
} fbp_optimizer;

typedef struct fbp_plan fbp_plan;

/* Plans of small Linear-only networks train through one fused kernel per step (small.c), with
 * the same bits as the general walk. 0 turns it off, for tests that compare the two. */
void fbp_set_small_step(int on);
/* A Linear's input gradient applies the Linear below's activation backward in its epilogue
 * (same bits). 0 runs the two kernels in turn, for tests that compare the two. */
void fbp_set_dact_fusion(int on);
/* fit's shuffled batches are read from X through the order by the first Linear's products
 * (fbp_gemm_rows), not gathered into the workspace first, when that layer is above the GEMM's
 * direct path (same bits). 0 gathers every batch, for tests that compare the two. */
void fbp_set_indexed_batches(int on);
/* A training step (train_step, fit) with plain SGD (momentum 0) updates each Linear's weights in
 * the epilogue of their gradient's product (same bits). 0 runs the products and then one update
 * pass, for tests that compare the two. */
void fbp_set_update_fusion(int on);
/* The GEMM reads a transposed A (a weight gradient's dZ.T) in place when its rows are short,
 * and computes a narrow C with such an A as its transpose (same bits). 0 packs every
 * transposed A, for tests that compare the two. */
void fbp_set_transposed_a_paths(int on);
/* Whether a training step of `batch` rows runs that kernel: every op Linear with at most 256
 * weights, batch x the largest layer's weights within the GEMM's direct path, not turned off. */
int fbp_plan_small_step_applies(const fbp_plan *plan, int64_t batch);

/* Validates the op list (sizes chain, offsets inside the buffers) and copies it. */
fbp_status fbp_plan_create(fbp_plan **plan, fbp_dtype dtype, const fbp_op *ops, int32_t n_ops,
                           int64_t n_params, int64_t n_buffers);
void fbp_plan_destroy(fbp_plan *plan);
/* The caller owns the buffers and keeps them alive while the plan is used. */
void fbp_plan_bind(fbp_plan *plan, void *params, void *grads, void *buffers);
void fbp_plan_set_seed(fbp_plan *plan, uint64_t seed);
/* Dropout's stream: the seed and the count of masks drawn from it (a caller that undoes
 * training restores both). */
void fbp_plan_dropout_state(const fbp_plan *plan, uint64_t *seed, uint64_t *draws);
void fbp_plan_set_dropout_state(fbp_plan *plan, uint64_t seed, uint64_t draws);
int64_t fbp_plan_batchnorm_batches(const fbp_plan *plan, int32_t op);
void fbp_plan_set_batchnorm_batches(fbp_plan *plan, int32_t op, int64_t n);

/* Where a plan's time goes: wall-clock seconds, summed over every call since profiling was
 * turned on, per op and phase (FBP_PROFILE_* columns of op_seconds) and for the per-step work
 * outside the ops. Off by default; while on, each op reads the clock once or twice (~20 ns a
 * read), which changes no result. A Linear's weight-gradient column holds its activation
 * backward, weight and bias gradients and the SGD update fused into them; its input-gradient
 * column the input-gradient product (with the layer below's activation backward when fused).
 * Other ops' backward counts as input gradient. A network small enough for the fused step
 * (fbp_plan_small_step_applies) trains in one kernel, timed whole in `fused_steps`. */
enum { FBP_PROFILE_FORWARD, FBP_PROFILE_GRAD_INPUT, FBP_PROFILE_GRAD_WEIGHTS, FBP_PROFILE_COLUMNS };
typedef struct {
    double loss;        /* the training loss and its gradient, in steps */
    double update;      /* the optimizer pass after the backward */
    double batches;     /* train_batches' per-batch copies and label checks */
    double fused_steps; /* whole fused small-network steps */
    int64_t forwards, backwards, losses, updates, batch_count, fused_step_count;
    int64_t indexed_batch_count; /* of batch_count: shuffled ones read through the order */
} fbp_profile_totals;
/* on: zero the counters and start; off: stop, keeping them. */
void fbp_plan_set_profiling(fbp_plan *plan, int on);
/* op_seconds: n_ops x FBP_PROFILE_COLUMNS, row-major. */
void fbp_plan_read_profile(const fbp_plan *plan, double *op_seconds, fbp_profile_totals *totals);

/* Forward pass on x (batch, in). Keeps what backward needs; out (batch, out) may be NULL. */
fbp_status fbp_plan_forward(fbp_plan *plan, void *out, const void *x, int64_t batch, int training);
/* An eval-mode forward of x (batch, in) into out (batch, out), x read in place (no backward can
 * follow an eval forward, so nothing of x is kept). check_x: as fbp_plan_evaluate's. */
fbp_status fbp_plan_predict(fbp_plan *plan, void *out, const void *x, int64_t batch, int check_x);
/* Backward from dL/dout (batch, out) of the last training forward: gradients accumulate into
 * grads; dx (batch, in) is written when not NULL. */
fbp_status fbp_plan_backward(fbp_plan *plan, void *dx, const void *dy, int64_t batch);
/* Loss of the last forward's output against target: T (batch, out) for MSE, int64 labels for
 * cross-entropy. dout (batch, out) receives dL/dout when not NULL. */
fbp_status fbp_plan_loss(fbp_plan *plan, double *loss, void *dout, const void *target,
                         int64_t batch, fbp_loss loss_kind);
/* One optimizer update of the whole parameter buffer from the current gradients. */
fbp_status fbp_plan_update(fbp_plan *plan, fbp_optimizer *opt);
/* zero_grad, forward, loss, backward, update in one call. An x holding NaN or infinity returns
 * FBP_ERR_NONFINITE_INPUT with nothing changed (a later backward still reads the last batch). */
fbp_status fbp_plan_train_step(fbp_plan *plan, double *loss, const void *x, const void *target,
                               int64_t batch, fbp_loss loss_kind, fbp_optimizer *opt);
/* zero_grad, forward (training), loss and backward, no update: grads = grad_scale * the
 * gradient of the mean loss over these rows, *loss that mean loss. row_offset places the rows in a
 * larger global batch (dropout masks are drawn per global element, so shards of a batch draw what
 * the whole batch would). batch 0 (an empty shard) zeroes grads and keeps the dropout stream in
 * step. A non-finite loss returns FBP_ERR_NONFINITE with *loss set and grads zero.
 *
 * grads_ready, when not NULL, is called with ctx and an op's index as soon as that op's parameter
 * gradients are final (ops with parameters only, last op first), on the calling thread between
 * kernels: a data-parallel caller starts reducing them while the earlier layers are still being
 * differentiated. A nonzero return stops the backward with FBP_ERR_INTERRUPTED. It is not
 * called for an empty shard or a non-finite loss. */
typedef int (*fbp_grads_ready_fn)(void *ctx, int32_t op);
fbp_status fbp_plan_compute_gradients(fbp_plan *plan, double *loss, const void *x,
                                      const void *target, int64_t batch, int64_t row_offset,
                                      fbp_loss loss_kind, double grad_scale,
                                      fbp_grads_ready_fn grads_ready, void *ctx);
/* Batches [first, first + count) of an epoch over rows order[...] of X (n, in) and targets Y
 * ((n, out) values, or n int64 labels): gather, train_step. order NULL: the rows in order.
 * loss_sum += loss * rows of each batch. Stops at the first non-finite loss, reporting its batch in
 * *bad_batch (else -1). check_x: each batch's rows of X are checked for NaN/inf as they are read,
 * before its step; a batch that fails stops the call with FBP_ERR_NONFINITE_INPUT, its index in
 * *bad_batch, and is not trained on (the batches before it were: undoing them is the caller's
 * part). */
fbp_status fbp_plan_train_batches(fbp_plan *plan, double *loss_sum, int64_t *bad_batch,
                                  const void *X, const void *Y, int64_t n, const int64_t *order,
                                  int64_t batch_size, int64_t first, int64_t count,
                                  fbp_loss loss_kind, fbp_optimizer *opt, int check_x);
/* `epochs` whole epochs of train_batches over all rows: epoch e first fills order with
 * fbp_shuffle(order, n, shuffle_seeds[e]) when shuffle_seeds is not NULL, then trains every
 * batch. order may be NULL (the rows in order) only without shuffle_seeds. loss_sums[e] = sum of
 * loss * rows, seconds[e] = the epoch's wall time. Stops at the first non-finite loss
 * (FBP_ERR_NONFINITE), reporting its epoch and batch (else -1): what fit does for a short epoch,
 * without returning to Python between epochs. check_x: the call's first epoch checks X as
 * train_batches does (every row is in one of its batches, so later epochs need not). */
fbp_status fbp_plan_train_epochs(fbp_plan *plan, double *loss_sums, double *seconds,
                                 int64_t *bad_epoch, int64_t *bad_batch, const void *X,
                                 const void *Y, int64_t n, int64_t *order, int64_t batch_size,
                                 int64_t epochs, const uint64_t *shuffle_seeds, fbp_loss loss_kind,
                                 fbp_optimizer *opt, int check_x);
/* Eval-mode loss sum and (cross-entropy) count of correct argmax predictions over all rows.
 * check_x: X's rows are checked for NaN/inf as each batch's forward reads them; a bad one stops
 * the call with FBP_ERR_NONFINITE_INPUT (the plan's activations are then partly overwritten,
 * as by any evaluation; nothing else is changed). */
fbp_status fbp_plan_evaluate(fbp_plan *plan, double *loss_sum, int64_t *correct, const void *X,
                             const void *Y, int64_t n, int64_t batch_size, fbp_loss loss_kind,
                             int check_x);
/* A seeded permutation of [0, n) (Fisher-Yates over a splitmix64 stream). */
void fbp_shuffle(int64_t *order, int64_t n, uint64_t seed);
/* 1 when none of x[0..n) is NaN or infinite. Reads only; no allocation. */
int fbp_all_finite_f32(const float *x, int64_t n);
int fbp_all_finite_f64(const double *x, int64_t n);

#ifdef __cplusplus
}
#endif
#endif /* FASTBP_H */
