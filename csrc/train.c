/* The model plan: a list of ops (linear with fused activation, activation, dropout, batchnorm)
 * over one flat parameter buffer, walked forward and backward by the same code for forward(),
 * backward(), train_step() and fit(). Workspace for a batch size is allocated once and reused:
 * a step allocates nothing. The arithmetic is in the kernels (gemm.c, activation.c, loss.c,
 * optim.c, reached through the dispatch table); this file is glue, compiled once, and includes
 * itself once per dtype. */
#ifndef FBP_TRAIN_PASS
#include <math.h>
#include <omp.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* Bytes of batch rows per thread before the gather is split. */
#define GATHER_THREAD_GRAIN (1 << 17)

/* What a step's products depend on for their threads' scratch: its batch rows, the calling
 * thread (whose OpenMP pool runs them), the thread count and the ISA (see update_fusable). */
typedef struct {
    int64_t rows; /* -1: no step yet */
    pthread_t caller;
    int threads;
    fbp_isa isa;
} step_key;

struct fbp_plan {
    fbp_dtype dtype;
    int32_t n_ops;
    fbp_op *ops;
    int64_t n_params, n_buffers;
    int64_t in_features, out_features, max_width;
    void *params, *grads, *buffers;

    /* Workspace for up to `capacity` rows, one aligned block. */
    int64_t capacity;
    char *workspace;
    void *input; /* capacity x in_features: a copy of the batch, when one is needed */
    /* train_step's copies of its batch, each step_rows x in_features in one block: a step fills
     * the one the last step's batch is not in, checking it while it copies, so that a refused
     * batch leaves that one (which a later backward reads) as it was */
    char *step_inputs;
    int64_t step_rows;
    const void *batch; /* the rows the last forward read: input, or the caller's X in place */
    /* during one of fit's shuffled steps whose first layer reads its rows through the order
     * (fbp_gemm_rows, see train_batch_range): those rows of batch (then X itself); else NULL */
    const int64_t *batch_rows;
    /* while set, each forward checks its batch for NaN/inf (fit's first epoch, predict,
     * evaluate): in its first product when op 0 is a Linear (fbp_gemm_check_a), else in a pass
     * of its own, and stops with FBP_ERR_NONFINITE_INPUT */
    int check_input;
    void **outs;           /* per op: capacity x out_features */
    void **masks;          /* per dropout op: capacity x width scale factors (0 or 1/(1-p)) */
    double **bn_stats;     /* per batchnorm op: mean[width], invstd[width] of the last batch */
    void *grad_a, *grad_b; /* capacity x max_width: dL/d(activation), ping-pong */
    void *target;          /* capacity x out_features values, or capacity int64 labels */

    const void **cur_out; /* what each op's output is in the last forward (eval dropout aliases) */
    int64_t *bn_batches;  /* BatchNorm's num_batches_tracked, per op */
    int64_t last_batch;   /* rows of the last forward; -1 = none */
    int last_training;
    uint64_t seed, dropout_calls;
    int64_t row_offset; /* the batch's first row within a sharded global batch (dropout masks) */

    /* The fused small-network step (small.c): when every op is a Linear of at most
     * FBP_SMALL_MAX_WEIGHTS weights, the largest in x out, else 0. */
    int64_t small_weights;

    /* The update in the weight-gradient products (fbp_gemm_sgd): the Linear weights' ranges
     * of the flat buffer in ascending order, n_fused of them (0 when two overlap), and what the
     * last successful step ran with, whose products sized its threads' scratch. */
    int64_t *fused_at, *fused_len;
    int32_t n_fused;
    step_key last_step;

    /* fbp_plan_set_profiling: n_ops x FBP_PROFILE_COLUMNS seconds, and the rest */
    int profiling;
    double *op_seconds;
    fbp_profile_totals profile;
};

static int small_step_enabled = 1;

void fbp_set_small_step(int on) {
    __atomic_store_n(&small_step_enabled, on != 0, __ATOMIC_RELAXED);
}

static int dact_fusion_enabled = 1;

static int indexed_batches_enabled = 1;

void fbp_set_indexed_batches(int on) {
    __atomic_store_n(&indexed_batches_enabled, on != 0, __ATOMIC_RELAXED);
}

void fbp_set_dact_fusion(int on) {
    __atomic_store_n(&dact_fusion_enabled, on != 0, __ATOMIC_RELAXED);
}

static int update_fusion_enabled = 1;

void fbp_set_update_fusion(int on) {
    __atomic_store_n(&update_fusion_enabled, on != 0, __ATOMIC_RELAXED);
}

/* Whether a step's weight update can run in the weight-gradient products (fbp_gemm_sgd): plain
 * SGD, whose update needs no state, and the same batch rows, calling thread, thread count and
 * ISA as the plan's last step. The update then runs inside the backward, layer by layer, so a
 * product failing there would leave some layers updated; a product fails only when a thread's
 * scratch cannot grow, and scratch only grows, so a step that repeats the last one's products
 * on the same threads needs no more. */
static int update_fusable(const fbp_plan *plan, const fbp_optimizer *opt, const step_key *step) {
    const step_key *last = &plan->last_step;
    return plan->n_fused > 0 && opt->kind == FBP_OPT_SGD && opt->momentum == 0 &&
           __atomic_load_n(&update_fusion_enabled, __ATOMIC_RELAXED) && last->rows == step->rows &&
           pthread_equal(last->caller, step->caller) && last->threads == step->threads &&
           last->isa == step->isa;
}

static size_t dtype_size(fbp_dtype dtype) {
    return dtype == FBP_F64 ? sizeof(double) : sizeof(float);
}

static size_t align_up(size_t x) { return (x + FBP_ALIGN - 1) / FBP_ALIGN * FBP_ALIGN; }

/* splitmix64: a tiny, well-mixed 64-bit generator; stateless by index for dropout masks, so the
 * mask of element i does not depend on which thread draws it. */
static inline uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

static inline double uniform01(uint64_t bits) { return (double)(bits >> 11) * 0x1.0p-53; }

/* SplitMix64 as its authors run it: the state steps by the golden-ratio constant and each draw
 * mixes the state, so the draws are independent of each other. Feeding each output back as the
 * next state (as this did) chained the ~13-cycle mix from element to element: 1000 rows 3.5 ->
 * 1.3 us, 60,000 rows 211 -> 77 us. */
void fbp_shuffle(int64_t *order, int64_t n, uint64_t seed) {
    for (int64_t i = 0; i < n; i++) order[i] = i;
    uint64_t state = splitmix64(seed);
    for (int64_t i = n - 1; i > 0; i--) {
        state += 0x9E3779B97F4A7C15ull;
        const uint64_t draw = splitmix64(state);
        /* multiply-shift maps 64 random bits to [0, i] with negligible bias for any n < 2^40 */
        int64_t j = (int64_t)(((unsigned __int128)draw * (uint64_t)(i + 1)) >> 64);
        int64_t t = order[i];
        order[i] = order[j];
        order[j] = t;
    }
}

/* Finiteness of a whole data set, checked before fit/predict touch it: an exponent-bits test
 * the compiler vectorises, in blocks so a NaN near the front ends the scan early, blocks split
 * over threads for big arrays (the answer is a bool: no order to keep). numpy's
 * isfinite(X).all() allocated and filled a bool array of X's size: 55 ms of a 0.44 s W3 epoch. */
#define ALL_FINITE_BLOCK 4096
#define ALL_FINITE_GRAIN (1 << 22) /* elements per thread: ~1 ms of memory traffic */
#define DEFINE_ALL_FINITE(SFX, T, U, EXP)                                                          \
    static int all_finite_range_##SFX(const T *x, int64_t lo, int64_t hi) {                        \
        for (int64_t b = lo; b < hi; b += ALL_FINITE_BLOCK) {                                      \
            const int64_t e = hi - b < ALL_FINITE_BLOCK ? hi : b + ALL_FINITE_BLOCK;               \
            U bad = 0;                                                                             \
            for (int64_t i = b; i < e; i++) {                                                      \
                U bits;                                                                            \
                memcpy(&bits, x + i, sizeof bits);                                                 \
                bad |= (bits & EXP) == EXP;                                                        \
            }                                                                                      \
            if (bad) return 0;                                                                     \
        }                                                                                          \
        return 1;                                                                                  \
    }                                                                                              \
    int fbp_all_finite_##SFX(const T *x, int64_t n) {                                              \
        if (n <= 0) return 1;                                                                      \
        const int team = fbp_team_size(n, ALL_FINITE_GRAIN);                                       \
        if (team <= 1) return all_finite_range_##SFX(x, 0, n);                                     \
        int ok = 1;                                                                                \
        _Pragma("omp parallel num_threads(team) reduction(&& : ok)") {                             \
            int64_t lo, hi;                                                                        \
            fbp_split_range(n, omp_get_num_threads(), omp_get_thread_num(), &lo, &hi);             \
            ok = all_finite_range_##SFX(x, lo, hi);                                                \
        }                                                                                          \
        return ok;                                                                                 \
    }
DEFINE_ALL_FINITE(f32, float, uint32_t, 0x7f800000u)
DEFINE_ALL_FINITE(f64, double, uint64_t, 0x7ff0000000000000ull)

static int valid_activation(int32_t a) { return a >= FBP_ACT_IDENTITY && a <= FBP_ACT_TANH; }

static int within(int64_t offset, int64_t count, int64_t size) {
    return offset >= 0 && count >= 0 && offset <= size && count <= size - offset;
}

fbp_status fbp_plan_create(fbp_plan **out, fbp_dtype dtype, const fbp_op *ops, int32_t n_ops,
                           int64_t n_params, int64_t n_buffers) {
    if (!out) return FBP_ERR_INVALID;
    *out = NULL;
    if ((dtype != FBP_F32 && dtype != FBP_F64) || !ops || n_ops <= 0 || n_params < 0 ||
        n_buffers < 0)
        return FBP_ERR_INVALID;
    int64_t max_width = ops[0].in_features;
    for (int32_t i = 0; i < n_ops; i++) {
        const fbp_op *op = &ops[i];
        if (op->in_features <= 0 || op->out_features <= 0) return FBP_ERR_INVALID;
        if (i > 0 && op->in_features != ops[i - 1].out_features) return FBP_ERR_INVALID;
        if (!valid_activation(op->activation)) return FBP_ERR_INVALID;
        switch (op->kind) {
        case FBP_OP_LINEAR:
            if (op->in_features > INT64_MAX / op->out_features) return FBP_ERR_INVALID;
            if (!within(op->weight, op->in_features * op->out_features, n_params))
                return FBP_ERR_INVALID;
            if (op->bias != -1 && !within(op->bias, op->out_features, n_params))
                return FBP_ERR_INVALID;
            break;
        case FBP_OP_ACTIVATION:
            if (op->in_features != op->out_features) return FBP_ERR_INVALID;
            break;
        case FBP_OP_DROPOUT:
            if (op->in_features != op->out_features || !(op->p >= 0 && op->p < 1))
                return FBP_ERR_INVALID;
            break;
        case FBP_OP_BATCHNORM:
            if (op->in_features != op->out_features || !(op->p > 0) ||
                !(op->momentum >= 0 && op->momentum <= 1))
                return FBP_ERR_INVALID;
            if ((op->weight != -1 && !within(op->weight, op->out_features, n_params)) ||
                (op->bias != -1 && !within(op->bias, op->out_features, n_params)) ||
                !within(op->running, 2 * op->out_features, n_buffers))
                return FBP_ERR_INVALID;
            break;
        default:
            return FBP_ERR_INVALID;
        }
        if (op->out_features > max_width) max_width = op->out_features;
    }
    fbp_plan *plan = calloc(1, sizeof *plan);
    if (!plan) return FBP_ERR_NOMEM;
    plan->ops = malloc((size_t)n_ops * sizeof *plan->ops);
    plan->outs = calloc((size_t)n_ops, sizeof *plan->outs);
    plan->masks = calloc((size_t)n_ops, sizeof *plan->masks);
    plan->bn_stats = calloc((size_t)n_ops, sizeof *plan->bn_stats);
    plan->cur_out = calloc((size_t)n_ops, sizeof *plan->cur_out);
    plan->bn_batches = calloc((size_t)n_ops, sizeof *plan->bn_batches);
    plan->fused_at = malloc((size_t)n_ops * sizeof *plan->fused_at);
    plan->fused_len = malloc((size_t)n_ops * sizeof *plan->fused_len);
    plan->op_seconds = calloc((size_t)n_ops * FBP_PROFILE_COLUMNS, sizeof *plan->op_seconds);
    if (!plan->ops || !plan->outs || !plan->masks || !plan->bn_stats || !plan->cur_out ||
        !plan->bn_batches || !plan->fused_at || !plan->fused_len || !plan->op_seconds) {
        fbp_plan_destroy(plan);
        return FBP_ERR_NOMEM;
    }
    memcpy(plan->ops, ops, (size_t)n_ops * sizeof *ops);
    plan->dtype = dtype;
    plan->n_ops = n_ops;
    plan->n_params = n_params;
    plan->n_buffers = n_buffers;
    plan->in_features = ops[0].in_features;
    plan->out_features = ops[n_ops - 1].out_features;
    plan->max_width = max_width;
    plan->last_batch = -1;
    for (int32_t i = 0; i < n_ops; i++) {
        const int64_t weights = ops[i].in_features * ops[i].out_features;
        if (ops[i].kind != FBP_OP_LINEAR || weights > FBP_SMALL_MAX_WEIGHTS) {
            plan->small_weights = 0;
            break;
        }
        if (weights > plan->small_weights) plan->small_weights = weights;
    }
    /* insertion sort by offset; a weight shared between layers would be updated twice */
    for (int32_t i = 0; i < n_ops; i++) {
        if (ops[i].kind != FBP_OP_LINEAR) continue;
        int32_t at = plan->n_fused++;
        for (; at > 0 && plan->fused_at[at - 1] > ops[i].weight; at--) {
            plan->fused_at[at] = plan->fused_at[at - 1];
            plan->fused_len[at] = plan->fused_len[at - 1];
        }
        plan->fused_at[at] = ops[i].weight;
        plan->fused_len[at] = ops[i].in_features * ops[i].out_features;
    }
    for (int32_t i = 1; i < plan->n_fused; i++)
        if (plan->fused_at[i] < plan->fused_at[i - 1] + plan->fused_len[i - 1]) plan->n_fused = 0;
    plan->last_step.rows = -1;
    *out = plan;
    return FBP_OK;
}

void fbp_plan_destroy(fbp_plan *plan) {
    if (!plan) return;
    free(plan->workspace);
    free(plan->step_inputs);
    free(plan->ops);
    free(plan->outs);
    free(plan->masks);
    free(plan->bn_stats);
    free(plan->cur_out);
    free(plan->bn_batches);
    free(plan->fused_at);
    free(plan->fused_len);
    free(plan->op_seconds);
    free(plan);
}

void fbp_plan_set_profiling(fbp_plan *plan, int on) {
    if (on) {
        memset(plan->op_seconds, 0,
               (size_t)plan->n_ops * FBP_PROFILE_COLUMNS * sizeof *plan->op_seconds);
        memset(&plan->profile, 0, sizeof plan->profile);
    }
    plan->profiling = on != 0;
}

void fbp_plan_read_profile(const fbp_plan *plan, double *op_seconds, fbp_profile_totals *totals) {
    if (op_seconds)
        memcpy(op_seconds, plan->op_seconds,
               (size_t)plan->n_ops * FBP_PROFILE_COLUMNS * sizeof *op_seconds);
    if (totals) *totals = plan->profile;
}

/* The profile's clock: a lap adds the time since *t to *seconds and restarts *t. Both do
 * nothing while profiling is off, so an unprofiled step pays one predictable branch per op. */
static inline double profile_start(const fbp_plan *plan) {
    return plan->profiling ? omp_get_wtime() : 0;
}

static inline void profile_lap(const fbp_plan *plan, double *seconds, double *t) {
    if (!plan->profiling) return;
    const double now = omp_get_wtime();
    *seconds += now - *t;
    *t = now;
}

/* Counts an optimizer update in the profile. */
static void profile_update(fbp_plan *plan, double since) {
    if (!plan->profiling) return;
    profile_lap(plan, &plan->profile.update, &since);
    plan->profile.updates++;
}

/* Where op i's time in phase `column` adds up. */
static inline double *op_slot(fbp_plan *plan, int32_t i, int column) {
    return &plan->op_seconds[(size_t)i * FBP_PROFILE_COLUMNS + (size_t)column];
}

void fbp_plan_bind(fbp_plan *plan, void *params, void *grads, void *buffers) {
    plan->params = params;
    plan->grads = grads;
    plan->buffers = buffers;
}

void fbp_plan_set_seed(fbp_plan *plan, uint64_t seed) {
    plan->seed = seed;
    plan->dropout_calls = 0;
}

void fbp_plan_dropout_state(const fbp_plan *plan, uint64_t *seed, uint64_t *draws) {
    *seed = plan->seed;
    *draws = plan->dropout_calls;
}

void fbp_plan_set_dropout_state(fbp_plan *plan, uint64_t seed, uint64_t draws) {
    plan->seed = seed;
    plan->dropout_calls = draws;
}

int64_t fbp_plan_batchnorm_batches(const fbp_plan *plan, int32_t op) {
    return op >= 0 && op < plan->n_ops ? plan->bn_batches[op] : 0;
}

void fbp_plan_set_batchnorm_batches(fbp_plan *plan, int32_t op, int64_t n) {
    if (op >= 0 && op < plan->n_ops) plan->bn_batches[op] = n;
}

/* An activation buffer (an op's output, grad_a, grad_b) of rows x width, with one vector of
 * slack after it: the fused small step stores whole vectors, in ascending order, so that the
 * loads after them forward from the stores instead of waiting for masked ones to reach the
 * cache (W2: 0.19 -> 0.17 us per step). */
static size_t activation_bytes(size_t rows, int64_t width, size_t elem) {
    return align_up(rows * (size_t)width * elem) + FBP_ALIGN;
}

/* Size the workspace for `rows` rows; grows only, so steady-state steps never allocate. */
static fbp_status reserve(fbp_plan *plan, int64_t rows) {
    if (rows <= plan->capacity) return FBP_OK;
    const size_t t = dtype_size(plan->dtype);
    const size_t r = (size_t)rows;
    size_t total = align_up(r * (size_t)plan->in_features * t);
    for (int32_t i = 0; i < plan->n_ops; i++) {
        const fbp_op *op = &plan->ops[i];
        total += activation_bytes(r, op->out_features, t);
        if (op->kind == FBP_OP_DROPOUT) total += align_up(r * (size_t)op->out_features * t);
        if (op->kind == FBP_OP_BATCHNORM)
            total += align_up(2 * (size_t)op->out_features * sizeof(double));
    }
    total += 2 * activation_bytes(r, plan->max_width, t);
    size_t target_elem = (size_t)plan->out_features * t;
    if (target_elem < sizeof(int64_t)) target_elem = sizeof(int64_t);
    total += align_up(r * target_elem);

    char *block = NULL;
    if (posix_memalign((void **)&block, FBP_ALIGN, total) != 0) return FBP_ERR_NOMEM;
    free(plan->workspace);
    plan->workspace = block;
    plan->capacity = rows;
    plan->last_batch = -1; /* the saved activations are gone */
    char *p = block;
    plan->input = p;
    plan->batch = p;
    p += align_up(r * (size_t)plan->in_features * t);
    for (int32_t i = 0; i < plan->n_ops; i++) {
        const fbp_op *op = &plan->ops[i];
        plan->outs[i] = p;
        p += activation_bytes(r, op->out_features, t);
        if (op->kind == FBP_OP_DROPOUT) {
            plan->masks[i] = p;
            p += align_up(r * (size_t)op->out_features * t);
        }
        if (op->kind == FBP_OP_BATCHNORM) {
            plan->bn_stats[i] = (double *)p;
            p += align_up(2 * (size_t)op->out_features * sizeof(double));
        }
    }
    plan->grad_a = p;
    p += activation_bytes(r, plan->max_width, t);
    plan->grad_b = p;
    p += activation_bytes(r, plan->max_width, t);
    plan->target = p;
    return FBP_OK;
}

/* A row of a batch gather, or a batch's targets. Copies of 4, 8 or 16 bytes (one or two
 * values, a label) have a constant size, which compiles to a move, instead of a call into libc:
 * W2 copies two 4-byte rows per 0.16 us step (W2 3.32 -> 3.21 ms, W1 104 -> 98 us), and its
 * targets once its rows were read in place (3.24 -> 3.10 ms). */
static inline void copy_row(void *dst, const void *src, size_t bytes) {
    switch (bytes) {
    case 4:
        memcpy(dst, src, 4);
        break;
    case 8:
        memcpy(dst, src, 8);
        break;
    case 16:
        memcpy(dst, src, 16);
        break;
    default:
        memcpy(dst, src, bytes);
    }
}

/* A small network whose every product takes the direct GEMM trains through the fused step
 * (small.c), with the same bits as the general walk. */
int fbp_plan_small_step_applies(const fbp_plan *plan, int64_t batch) {
    return plan->small_weights && batch > 0 &&
           (double)batch * (double)plan->small_weights <= FBP_GEMM_DIRECT_MAX_MACS &&
           __atomic_load_n(&small_step_enabled, __ATOMIC_RELAXED);
}

#define FBP_TRAIN_PASS 1
#define REAL float
#define SFX f32
#include "train.c"
#undef REAL
#undef SFX
#define REAL double
#define SFX f64
#include "train.c"
#undef REAL
#undef SFX

#define DISPATCH(call) (plan->dtype == FBP_F64 ? FBP_CAT(call, _f64) : FBP_CAT(call, _f32))

fbp_status fbp_plan_forward(fbp_plan *plan, void *out, const void *x, int64_t batch, int training) {
    if (!plan || !x || batch <= 0 || !plan->params) return FBP_ERR_INVALID;
    return DISPATCH(forward_public)(plan, out, x, batch, training);
}

fbp_status fbp_plan_predict(fbp_plan *plan, void *out, const void *x, int64_t batch, int check_x) {
    if (!plan || !out || !x || batch <= 0 || !plan->params) return FBP_ERR_INVALID;
    return DISPATCH(predict)(plan, out, x, batch, check_x);
}

fbp_status fbp_plan_backward(fbp_plan *plan, void *dx, const void *dy, int64_t batch) {
    if (!plan || !dy || batch <= 0 || !plan->grads) return FBP_ERR_INVALID;
    if (plan->last_batch != batch || !plan->last_training) return FBP_ERR_STATE;
    return DISPATCH(backward_public)(plan, dx, dy, batch);
}

fbp_status fbp_plan_loss(fbp_plan *plan, double *loss, void *dout, const void *target,
                         int64_t batch, fbp_loss loss_kind) {
    if (!plan || !loss || !target || batch <= 0) return FBP_ERR_INVALID;
    if (plan->last_batch != batch) return FBP_ERR_STATE;
    return DISPATCH(loss_public)(plan, loss, dout, target, batch, loss_kind);
}

fbp_status fbp_plan_update(fbp_plan *plan, fbp_optimizer *opt) {
    if (!plan || !opt || !plan->params || !plan->grads) return FBP_ERR_INVALID;
    return DISPATCH(update)(plan, opt);
}

fbp_status fbp_plan_train_step(fbp_plan *plan, double *loss, const void *x, const void *target,
                               int64_t batch, fbp_loss loss_kind, fbp_optimizer *opt) {
    if (!plan || !loss || !x || !target || !opt || batch <= 0 || !plan->params || !plan->grads)
        return FBP_ERR_INVALID;
    return DISPATCH(train_step_public)(plan, loss, x, target, batch, loss_kind, opt);
}

fbp_status fbp_plan_compute_gradients(fbp_plan *plan, double *loss, const void *x,
                                      const void *target, int64_t batch, int64_t row_offset,
                                      fbp_loss loss_kind, double grad_scale,
                                      fbp_grads_ready_fn grads_ready, void *ctx) {
    if (!plan || !loss || batch < 0 || row_offset < 0 || !isfinite(grad_scale) || !plan->params ||
        !plan->grads || (batch > 0 && (!x || !target)))
        return FBP_ERR_INVALID;
    if (loss_kind != FBP_LOSS_MSE && loss_kind != FBP_LOSS_MSE_SUM &&
        loss_kind != FBP_LOSS_CROSS_ENTROPY)
        return FBP_ERR_INVALID;
    if (batch == 0) { /* an empty shard: no gradient, and the dropout stream kept in step */
        memset(plan->grads, 0, (size_t)plan->n_params * dtype_size(plan->dtype));
        for (int32_t i = 0; i < plan->n_ops; i++)
            if (plan->ops[i].kind == FBP_OP_DROPOUT && plan->ops[i].p != 0) plan->dropout_calls++;
        plan->last_batch = -1;
        *loss = 0;
        return FBP_OK;
    }
    return DISPATCH(compute_gradients_public)(plan, loss, x, target, batch, row_offset, loss_kind,
                                              grad_scale, grads_ready, ctx);
}

fbp_status fbp_plan_train_batches(fbp_plan *plan, double *loss_sum, int64_t *bad_batch,
                                  const void *X, const void *Y, int64_t n, const int64_t *order,
                                  int64_t batch_size, int64_t first, int64_t count,
                                  fbp_loss loss_kind, fbp_optimizer *opt, int check_x) {
    if (!plan || !loss_sum || !bad_batch || !X || !Y || !opt || n <= 0 || batch_size <= 0 ||
        first < 0 || count < 0 || !plan->params || !plan->grads)
        return FBP_ERR_INVALID;
    return DISPATCH(train_batches)(plan, loss_sum, bad_batch, X, Y, n, order, batch_size, first,
                                   count, loss_kind, opt, check_x);
}

fbp_status fbp_plan_train_epochs(fbp_plan *plan, double *loss_sums, double *seconds,
                                 int64_t *bad_epoch, int64_t *bad_batch, const void *X,
                                 const void *Y, int64_t n, int64_t *order, int64_t batch_size,
                                 int64_t epochs, const uint64_t *shuffle_seeds, fbp_loss loss_kind,
                                 fbp_optimizer *opt, int check_x) {
    if (!plan || !loss_sums || !seconds || !bad_epoch || !bad_batch || !X || !Y || !opt || n <= 0 ||
        batch_size <= 0 || epochs < 0 || !plan->params || !plan->grads || (shuffle_seeds && !order))
        return FBP_ERR_INVALID;
    *bad_epoch = -1;
    *bad_batch = -1;
    const int64_t n_batches = (n + batch_size - 1) / batch_size;
    for (int64_t e = 0; e < epochs; e++) {
        const double t0 = omp_get_wtime();
        if (shuffle_seeds) fbp_shuffle(order, n, shuffle_seeds[e]);
        loss_sums[e] = 0;
        const fbp_status st =
            DISPATCH(train_batches)(plan, &loss_sums[e], bad_batch, X, Y, n, order, batch_size, 0,
                                    n_batches, loss_kind, opt, check_x && e == 0);
        seconds[e] = omp_get_wtime() - t0;
        if (st == FBP_ERR_NONFINITE || st == FBP_ERR_NONFINITE_INPUT) *bad_epoch = e;
        if (st != FBP_OK) return st;
    }
    return FBP_OK;
}

fbp_status fbp_plan_evaluate(fbp_plan *plan, double *loss_sum, int64_t *correct, const void *X,
                             const void *Y, int64_t n, int64_t batch_size, fbp_loss loss_kind,
                             int check_x) {
    if (!plan || !loss_sum || !correct || !X || !Y || n <= 0 || batch_size <= 0 || !plan->params)
        return FBP_ERR_INVALID;
    plan->check_input = check_x;
    const fbp_status st =
        DISPATCH(evaluate)(plan, loss_sum, correct, X, Y, n, batch_size, loss_kind);
    plan->check_input = 0;
    return st;
}

#else /* FBP_TRAIN_PASS: the body, once per dtype */

#define KERNEL(name) FBP_CAT(FBP_CAT(fbp_, name), FBP_CAT(_, SFX))
#define TFN(name) FBP_CAT(name, FBP_CAT(_, SFX))

/* The op's input: the batch for op 0, else the previous op's output. */
static inline const REAL *TFN(op_input)(const fbp_plan *plan, int32_t i) {
    return i == 0 ? (const REAL *)plan->batch : (const REAL *)plan->cur_out[i - 1];
}

static void TFN(batchnorm_forward)(const fbp_plan *plan, int32_t i, REAL *y, const REAL *x,
                                   int64_t rows, int training) {
    const fbp_op *op = &plan->ops[i];
    const int64_t n = op->out_features;
    const REAL *gamma = op->weight >= 0 ? (const REAL *)plan->params + op->weight : NULL;
    const REAL *beta = op->bias >= 0 ? (const REAL *)plan->params + op->bias : NULL;
    REAL *running_mean = (REAL *)plan->buffers + op->running;
    REAL *running_var = running_mean + n;
    double *mean = plan->bn_stats[i], *invstd = mean + n;
    if (training) {
        /* Sums in double, rows in order: the statistics do not depend on threads. */
        for (int64_t j = 0; j < n; j++) mean[j] = 0, invstd[j] = 0;
        for (int64_t r = 0; r < rows; r++)
            for (int64_t j = 0; j < n; j++) mean[j] += x[r * n + j];
        for (int64_t j = 0; j < n; j++) mean[j] /= (double)rows;
        for (int64_t r = 0; r < rows; r++)
            for (int64_t j = 0; j < n; j++) {
                double d = x[r * n + j] - mean[j];
                invstd[j] += d * d; /* the sum of squares, for now */
            }
        const double m = op->momentum;
        for (int64_t j = 0; j < n; j++) {
            double var = invstd[j] / (double)rows;
            running_mean[j] = (REAL)((1 - m) * running_mean[j] + m * mean[j]);
            running_var[j] =
                (REAL)((1 - m) * running_var[j] + m * var * (double)rows / (double)(rows - 1));
            invstd[j] = 1 / sqrt(var + op->p);
        }
    } else {
        for (int64_t j = 0; j < n; j++) {
            mean[j] = running_mean[j];
            invstd[j] = 1 / sqrt((double)running_var[j] + op->p);
        }
    }
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < n; j++) {
            double v = (x[r * n + j] - mean[j]) * invstd[j];
            y[r * n + j] = (REAL)(v * (gamma ? gamma[j] : 1) + (beta ? beta[j] : 0));
        }
}

/* In place: g holds dL/dy on entry and dL/dx on return. x is the op's input. */
static void TFN(batchnorm_backward)(const fbp_plan *plan, int32_t i, REAL *g, const REAL *x,
                                    int64_t rows, int accumulate) {
    const fbp_op *op = &plan->ops[i];
    const int64_t n = op->out_features;
    const REAL *gamma = op->weight >= 0 ? (const REAL *)plan->params + op->weight : NULL;
    REAL *dgamma = op->weight >= 0 ? (REAL *)plan->grads + op->weight : NULL;
    REAL *dbeta = op->bias >= 0 ? (REAL *)plan->grads + op->bias : NULL;
    const double *mean = plan->bn_stats[i], *invstd = mean + n;
    /* sum_dy and sum_dy_xhat per feature, reusing the grad_b scratch as doubles would alias:
     * keep them on the stack in chunks of 256 features. */
    enum { CHUNK = 256 };
    double sum_dy[CHUNK], sum_dy_xhat[CHUNK];
    for (int64_t j0 = 0; j0 < n; j0 += CHUNK) {
        const int64_t j1 = j0 + CHUNK < n ? j0 + CHUNK : n;
        for (int64_t j = j0; j < j1; j++) sum_dy[j - j0] = 0, sum_dy_xhat[j - j0] = 0;
        for (int64_t r = 0; r < rows; r++)
            for (int64_t j = j0; j < j1; j++) {
                double dy = g[r * n + j];
                sum_dy[j - j0] += dy;
                sum_dy_xhat[j - j0] += dy * (x[r * n + j] - mean[j]) * invstd[j];
            }
        for (int64_t j = j0; j < j1; j++) {
            if (dbeta) dbeta[j] = (accumulate ? dbeta[j] : 0) + (REAL)sum_dy[j - j0];
            if (dgamma) dgamma[j] = (accumulate ? dgamma[j] : 0) + (REAL)sum_dy_xhat[j - j0];
        }
        for (int64_t r = 0; r < rows; r++)
            for (int64_t j = j0; j < j1; j++) {
                double scale = (gamma ? gamma[j] : 1) * invstd[j];
                double xhat = (x[r * n + j] - mean[j]) * invstd[j];
                double dy = g[r * n + j];
                g[r * n + j] = (REAL)(scale * (dy - sum_dy[j - j0] / (double)rows -
                                               xhat * sum_dy_xhat[j - j0] / (double)rows));
            }
    }
}

/* Forward from plan->batch (rows x in). */
static fbp_status TFN(forward)(fbp_plan *plan, int64_t rows, int training) {
    const REAL *params = plan->params;
    double t = profile_start(plan);
    /* plan->check_input: -1 until checked, then 1 (finite) or 0 */
    int batch_finite = plan->check_input ? -1 : 1;
    for (int32_t i = 0; i < plan->n_ops; i++) {
        const fbp_op *op = &plan->ops[i];
        const REAL *x = TFN(op_input)(plan, i);
        REAL *y = plan->outs[i];
        const int64_t in = op->in_features, out = op->out_features, size = rows * out;
        fbp_status st = FBP_OK;
        if (i == 0 && batch_finite < 0 && op->kind != FBP_OP_LINEAR) {
            batch_finite = FBP_CAT(fbp_all_finite_, SFX)(x, rows * in);
            if (!batch_finite) return FBP_ERR_NONFINITE_INPUT; /* before op 0 changes a thing */
        }
        switch (op->kind) {
        case FBP_OP_LINEAR:
            /* y = act(x @ W.T + b): B' = W.T is W read with strides (1, in). */
            if (i == 0 && plan->batch_rows) { /* the batch's rows of X, through the order */
                st = KERNEL(gemm_rows)(y, x, plan->batch_rows, params + op->weight, NULL,
                                       op->bias >= 0 ? params + op->bias : NULL, rows, out, in, in,
                                       1, 1, in, out, (fbp_activation)op->activation, NULL, 0, 0, 0,
                                       batch_finite < 0 ? &batch_finite : NULL);
                for (int64_t r = 0; st == FBP_OK && batch_finite < 0 && r < rows; r++)
                    if (!FBP_CAT(fbp_all_finite_, SFX)(x + plan->batch_rows[r] * in, in))
                        batch_finite = 0; /* a path that did not check: never, by the sizes */
                if (batch_finite < 0) batch_finite = 1;
                break;
            }
            if (i == 0 && batch_finite < 0) {
                st = KERNEL(gemm_check_a)(
                    y, x, params + op->weight, op->bias >= 0 ? params + op->bias : NULL, rows, out,
                    in, in, 1, 1, in, out, 1, 0, (fbp_activation)op->activation, &batch_finite);
                if (st == FBP_OK && batch_finite < 0) /* a product too small to check */
                    batch_finite = FBP_CAT(fbp_all_finite_, SFX)(x, rows * in);
                break;
            }
            st = KERNEL(gemm)(y, x, params + op->weight, op->bias >= 0 ? params + op->bias : NULL,
                              rows, out, in, in, 1, 1, in, out, 1, 0,
                              (fbp_activation)op->activation);
            break;
        case FBP_OP_ACTIVATION:
            st = KERNEL(activation_forward)(y, x, size, (fbp_activation)op->activation);
            break;
        case FBP_OP_DROPOUT:
            if (!training || op->p == 0) {
                y = (REAL *)x; /* the identity: alias, no copy */
                break;
            }
            {
                REAL *mask = plan->masks[i];
                const REAL keep_scale = (REAL)(1 / (1 - op->p));
                /* drawn by the element's index in the global batch: a shard draws the mask the
                 * whole batch would have drawn for its rows */
                const uint64_t stream = splitmix64(plan->seed ^ splitmix64(++plan->dropout_calls)) +
                                        (uint64_t)(plan->row_offset * out);
                for (int64_t e = 0; e < size; e++) {
                    mask[e] = uniform01(splitmix64(stream + (uint64_t)e)) >= op->p ? keep_scale : 0;
                    y[e] = x[e] * mask[e];
                }
            }
            break;
        case FBP_OP_BATCHNORM:
            if (training && rows < 2) return FBP_ERR_INVALID;
            TFN(batchnorm_forward)(plan, i, y, x, rows, training);
            if (training) plan->bn_batches[i]++;
            break;
        }
        if (st != FBP_OK) return st;
        /* a bad batch stops after the first Linear, which only wrote its output */
        if (!batch_finite) return FBP_ERR_NONFINITE_INPUT;
        plan->cur_out[i] = y;
        profile_lap(plan, op_slot(plan, i, FBP_PROFILE_FORWARD), &t);
    }
    plan->last_batch = rows;
    plan->last_training = training;
    if (plan->profiling) plan->profile.forwards++;
    return FBP_OK;
}

/* Backward with dL/dout already in plan->grad_a. Writes dL/dx to dx when not NULL. Adds the
 * parameter gradients to grads (accumulate: torch's .grad semantics) or overwrites them (every
 * parameter belongs to an op, so none is left stale). Calls grads_ready (when not NULL) after
 * each op whose parameter gradients are then final. fused (not NULL only without accumulate
 * and grads_ready, see TFN(step)): the step's plain-SGD optimizer, applied to each Linear's
 * weights in their gradient's product (fbp_gemm_sgd), which stores those weights' gradients
 * only with keep_grads. */
static fbp_status TFN(backward)(fbp_plan *plan, REAL *dx, int64_t rows, int accumulate,
                                fbp_grads_ready_fn grads_ready, void *ctx,
                                const fbp_optimizer *fused, int keep_grads) {
    REAL *params = plan->params;
    REAL *grads = plan->grads;
    REAL *g = plan->grad_a, *spare = plan->grad_b;
    /* The layer below's activation backward runs in this layer's input-gradient product
     * (fbp_gemm_dact) when that layer is a Linear too: one pass over dZ and Y fewer, and each
     * thread then handles the columns its part of the product wrote. */
    const int fuse = __atomic_load_n(&dact_fusion_enabled, __ATOMIC_RELAXED);
    int dz_ready = 0; /* g already holds this op's dZ (and its bias gradient is done) */
    for (int32_t i = plan->n_ops - 1; i >= 0; i--) {
        const fbp_op *op = &plan->ops[i];
        double since = profile_start(plan);
        const REAL *x = TFN(op_input)(plan, i);
        const REAL *y = plan->cur_out[i];
        const int64_t in = op->in_features, out = op->out_features;
        const int need_dx = i > 0 || dx != NULL;
        fbp_status st = FBP_OK;
        switch (op->kind) {
        case FBP_OP_LINEAR:
            /* dZ = dY * act'(Y) in place, db += colsum(dZ); dW += dZ.T @ X; dX = dZ @ W */
            if (!dz_ready)
                st = KERNEL(activation_backward)(g, op->bias >= 0 ? grads + op->bias : NULL, g, y,
                                                 rows, out, (fbp_activation)op->activation,
                                                 accumulate);
            dz_ready = 0;
            /* the first layer of a shuffled fit step: X's rows through the order (no accumulate) */
            const int64_t *x_rows = i == 0 ? plan->batch_rows : NULL;
            if (st == FBP_OK && !fused && x_rows)
                st = accumulate ? FBP_ERR_STATE
                                : KERNEL(gemm_rows)(grads + op->weight, g, NULL, x, x_rows, NULL,
                                                    out, in, rows, 1, out, in, 1, in,
                                                    FBP_ACT_IDENTITY, NULL, 0, 0, 0, NULL);
            else if (st == FBP_OK && !fused)
                st = KERNEL(gemm)(grads + op->weight, g, x, NULL, out, in, rows, 1, out, in, 1, in,
                                  1, accumulate ? 1 : 0, FBP_ACT_IDENTITY);
            /* dW and db are final: their reduction can overlap the dX product below */
            if (st == FBP_OK && grads_ready && grads_ready(ctx, i)) return FBP_ERR_INTERRUPTED;
            profile_lap(plan, op_slot(plan, i, FBP_PROFILE_GRAD_WEIGHTS), &since);
            if (st == FBP_OK && need_dx) {
                const fbp_op *below = i > 0 ? &plan->ops[i - 1] : NULL;
                if (fuse && below && below->kind == FBP_OP_LINEAR) {
                    st = KERNEL(gemm_dact)(spare, below->bias >= 0 ? grads + below->bias : NULL, g,
                                           params + op->weight, plan->cur_out[i - 1], rows, in, out,
                                           out, 1, in, 1, (fbp_activation)below->activation,
                                           accumulate);
                    dz_ready = 1;
                } else {
                    st = KERNEL(gemm)(spare, g, params + op->weight, NULL, rows, in, out, out, 1,
                                      in, 1, in, 1, 0, FBP_ACT_IDENTITY);
                }
            }
            if (need_dx) profile_lap(plan, op_slot(plan, i, FBP_PROFILE_GRAD_INPUT), &since);
            /* after dX, which reads the weights the update changes */
            if (st == FBP_OK && fused && x_rows)
                st = KERNEL(gemm_rows)(grads + op->weight, g, NULL, x, x_rows, NULL, out, in, rows,
                                       1, out, in, 1, in, FBP_ACT_IDENTITY, params + op->weight,
                                       fused->lr, fused->weight_decay, keep_grads, NULL);
            else if (st == FBP_OK && fused)
                st = KERNEL(gemm_sgd)(grads + op->weight, g, x, out, in, rows, 1, out, in, 1,
                                      params + op->weight, fused->lr, fused->weight_decay,
                                      keep_grads);
            profile_lap(plan, op_slot(plan, i, FBP_PROFILE_GRAD_WEIGHTS), &since);
            if (st == FBP_OK && need_dx) {
                REAL *t = g;
                g = spare;
                spare = t;
            }
            break;
        case FBP_OP_ACTIVATION:
            st = KERNEL(activation_backward)(g, NULL, g, y, rows, out,
                                             (fbp_activation)op->activation, 0);
            break;
        case FBP_OP_DROPOUT:
            if (op->p != 0) {
                const REAL *mask = plan->masks[i];
                for (int64_t e = 0; e < rows * out; e++) g[e] *= mask[e];
            }
            break;
        case FBP_OP_BATCHNORM:
            TFN(batchnorm_backward)(plan, i, g, x, rows, accumulate);
            if (grads_ready && (op->weight >= 0 || op->bias >= 0) && grads_ready(ctx, i))
                return FBP_ERR_INTERRUPTED;
            break;
        }
        if (st != FBP_OK) return st;
        if (op->kind != FBP_OP_LINEAR)
            profile_lap(plan, op_slot(plan, i, FBP_PROFILE_GRAD_INPUT), &since);
    }
    if (dx) memcpy(dx, g, (size_t)(rows * plan->in_features) * sizeof(REAL));
    if (plan->profiling) plan->profile.backwards++;
    return FBP_OK;
}

static fbp_status TFN(loss)(fbp_plan *plan, double *loss, REAL *dout, const void *target,
                            int64_t rows, fbp_loss kind) {
    const REAL *y = plan->cur_out[plan->n_ops - 1];
    const int64_t n = rows * plan->out_features;
    switch (kind) {
    case FBP_LOSS_MSE:
    case FBP_LOSS_MSE_SUM:
        return KERNEL(mse)(loss, dout, y, target, n, kind == FBP_LOSS_MSE ? 1.0 / (double)n : 1.0);
    case FBP_LOSS_CROSS_ENTROPY:
        /* the kernel always writes the gradient: use the spare gradient buffer when unwanted */
        return KERNEL(softmax_xent)(loss, dout ? dout : (REAL *)plan->grad_b, y, target, rows,
                                    plan->out_features, 1.0 / (double)rows);
    default:
        return FBP_ERR_INVALID;
    }
}

/* The optimizer over params[at, at + n); opt->step is not changed. */
static fbp_status TFN(update_range)(fbp_plan *plan, const fbp_optimizer *opt, int64_t at,
                                    int64_t n) {
    REAL *p = (REAL *)plan->params + at, *g = (REAL *)plan->grads + at;
    REAL *s1 = opt->state1 ? (REAL *)opt->state1 + at : NULL;
    REAL *s2 = opt->state2 ? (REAL *)opt->state2 + at : NULL;
    switch (opt->kind) {
    case FBP_OPT_SGD:
        return KERNEL(sgd_step)(p, s1, g, n, opt->lr, opt->momentum, opt->dampening,
                                opt->weight_decay, opt->nesterov, opt->step == 0);
    case FBP_OPT_ADAM:
    case FBP_OPT_ADAMW:
        return KERNEL(adam_step)(p, s1, s2, g, n, opt->lr, opt->beta1, opt->beta2, opt->eps,
                                 opt->weight_decay, opt->kind == FBP_OPT_ADAMW, opt->step + 1);
    default:
        return FBP_ERR_INVALID;
    }
}

static fbp_status TFN(update)(fbp_plan *plan, fbp_optimizer *opt) {
    const double since = profile_start(plan);
    const fbp_status st = TFN(update_range)(plan, opt, 0, plan->n_params);
    if (st == FBP_OK) opt->step++;
    profile_update(plan, since);
    return st;
}

/* The update of what the weight-gradient products did not update: the gaps between the Linear
 * weights (biases, BatchNorm's parameters). */
static fbp_status TFN(update_rest)(fbp_plan *plan, fbp_optimizer *opt) {
    const double since = profile_start(plan);
    int64_t at = 0;
    for (int32_t f = 0; f <= plan->n_fused; f++) {
        const int64_t end = f < plan->n_fused ? plan->fused_at[f] : plan->n_params;
        if (end > at) {
            const fbp_status st = TFN(update_range)(plan, opt, at, end - at);
            if (st != FBP_OK) return st;
        }
        if (f < plan->n_fused) at = plan->fused_at[f] + plan->fused_len[f];
    }
    opt->step++;
    profile_update(plan, since);
    return FBP_OK;
}

/* What the fused step needs of the plan: valid until the workspace or the buffers change. */
static fbp_small_net TFN(small_net)(const fbp_plan *plan) {
    const fbp_small_net net = {plan->ops,      plan->n_ops, plan->params, plan->grads,
                               plan->n_params, plan->batch, plan->target, plan->outs,
                               plan->grad_a,   plan->grad_b};
    return net;
}

/* The fused step; opt NULL: gradients only. Leaves the plan as forward and backward would. */
static fbp_status TFN(small_step)(fbp_plan *plan, const fbp_small_net *net, double *loss,
                                  int64_t rows, fbp_loss kind, fbp_optimizer *opt) {
    /* fit's first-epoch check (plan->check_input): the fused step has no forward to check in,
     * and reads so few values that a pass of its own is cheap */
    if (plan->check_input &&
        !FBP_CAT(fbp_all_finite_, SFX)((const REAL *)net->input, rows * plan->in_features))
        return FBP_ERR_NONFINITE_INPUT;
    double since = profile_start(plan);
    const fbp_status st = KERNEL(small_step)(net, loss, rows, kind, opt);
    if (plan->profiling) {
        profile_lap(plan, &plan->profile.fused_steps, &since);
        plan->profile.fused_step_count++;
    }
    for (int32_t i = 0; i < plan->n_ops; i++) plan->cur_out[i] = plan->outs[i];
    plan->last_batch = rows;
    plan->last_training = 1;
    if (st != FBP_OK) memset(plan->grads, 0, (size_t)plan->n_params * sizeof(REAL));
    return st;
}

/* zero_grad, forward, loss, backward on the batch at plan->batch and plan->target:
 * grads = grad_scale * d(mean loss)/d(params). A non-finite loss stops before backward (grads
 * zeroed) with FBP_ERR_NONFINITE. Backward overwrites the gradients, so a successful step needs
 * no zeroing pass over them (a memset of the whole buffer: 22 us of a W3 step). */
static fbp_status TFN(compute_gradients)(fbp_plan *plan, double *loss, int64_t rows, fbp_loss kind,
                                         double grad_scale, fbp_grads_ready_fn grads_ready,
                                         void *ctx, const fbp_optimizer *fused, int keep_grads) {
    if (fbp_plan_small_step_applies(plan, rows) && !grads_ready && grad_scale == 1 && !fused) {
        const fbp_small_net net = TFN(small_net)(plan);
        return TFN(small_step)(plan, &net, loss, rows, kind, NULL);
    }
    fbp_status st = TFN(forward)(plan, rows, 1);
    double since = profile_start(plan);
    if (st == FBP_OK) st = TFN(loss)(plan, loss, plan->grad_a, plan->target, rows, kind);
    if (plan->profiling) {
        profile_lap(plan, &plan->profile.loss, &since);
        plan->profile.losses++;
    }
    if (st == FBP_OK && !isfinite(*loss)) st = FBP_ERR_NONFINITE; /* weights stay valid */
    if (st != FBP_OK) {
        memset(plan->grads, 0, (size_t)plan->n_params * sizeof(REAL));
        return st;
    }
    if (grad_scale != 1) { /* backward is linear in dL/dout: scale the seed, not every grad */
        REAL *g = plan->grad_a;
        const REAL s = (REAL)grad_scale;
        for (int64_t e = 0; e < rows * plan->out_features; e++) g[e] *= s;
    }
    return TFN(backward)(plan, NULL, rows, 0, grads_ready, ctx, fused, keep_grads);
}

/* One step on the batch at plan->batch and plan->target. last: no later step of the same call
 * overwrites the gradients, so they must be stored (a fused step need not store its Linear
 * weights' gradients otherwise; .grad after a call still holds its last step's). */
static fbp_status TFN(step)(fbp_plan *plan, double *loss, int64_t rows, fbp_loss kind,
                            fbp_optimizer *opt, int last) {
    if (fbp_plan_small_step_applies(plan, rows)) {
        const fbp_small_net net = TFN(small_net)(plan);
        return TFN(small_step)(plan, &net, loss, rows, kind, opt);
    }
    const step_key step = {rows, pthread_self(), fbp_get_num_threads(), fbp_active_isa()};
    const int fused = update_fusable(plan, opt, &step);
    fbp_status st =
        TFN(compute_gradients)(plan, loss, rows, kind, 1.0, NULL, NULL, fused ? opt : NULL, last);
    if (st == FBP_OK) {
        plan->last_step = step;
        st = fused ? TFN(update_rest)(plan, opt) : TFN(update)(plan, opt);
    }
    return st;
}

static size_t TFN(target_row_bytes)(const fbp_plan *plan, fbp_loss kind) {
    return kind == FBP_LOSS_CROSS_ENTROPY ? sizeof(int64_t)
                                          : (size_t)plan->out_features * sizeof(REAL);
}

static fbp_status TFN(forward_public)(fbp_plan *plan, void *out, const void *x, int64_t rows,
                                      int training) {
    fbp_status st = reserve(plan, rows);
    if (st != FBP_OK) return st;
    memcpy(plan->input, x, (size_t)(rows * plan->in_features) * sizeof(REAL));
    plan->batch = plan->input;
    st = TFN(forward)(plan, rows, training);
    if (st == FBP_OK && out)
        memcpy(out, plan->cur_out[plan->n_ops - 1],
               (size_t)(rows * plan->out_features) * sizeof(REAL));
    return st;
}

static fbp_status TFN(backward_public)(fbp_plan *plan, void *dx, const void *dy, int64_t rows) {
    memcpy(plan->grad_a, dy, (size_t)(rows * plan->out_features) * sizeof(REAL));
    return TFN(backward)(plan, dx, rows, 1, NULL, NULL, NULL, 1);
}

static fbp_status TFN(loss_public)(fbp_plan *plan, double *loss, void *dout, const void *target,
                                   int64_t rows, fbp_loss kind) {
    if (kind == FBP_LOSS_CROSS_ENTROPY) {
        const int64_t *labels = target;
        for (int64_t r = 0; r < rows; r++)
            if (labels[r] < 0 || labels[r] >= plan->out_features) return FBP_ERR_INVALID;
    }
    return TFN(loss)(plan, loss, dout, target, rows, kind);
}

/* x is checked for NaN and infinity in the pass that copies it (fbp_copy_finite: a separate
 * scan before it was 2% of W3's train_step loop at one thread, 4% at two); see step_inputs. */
static fbp_status TFN(train_step_public)(fbp_plan *plan, double *loss, const void *x,
                                         const void *target, int64_t rows, fbp_loss kind,
                                         fbp_optimizer *opt) {
    const int64_t n = rows * plan->in_features;
    if (rows > plan->capacity || plan->step_rows < plan->capacity) {
        /* The first step, or one after the workspace grew (which drops the saved activations,
         * so no batch needs keeping): check before anything changes, then size the copies. */
        if (!FBP_CAT(fbp_all_finite_, SFX)(x, n)) return FBP_ERR_NONFINITE_INPUT;
        fbp_status st = reserve(plan, rows);
        if (st != FBP_OK) return st;
        const size_t bytes =
            align_up((size_t)plan->capacity * (size_t)plan->in_features * sizeof(REAL));
        char *block = NULL;
        if (posix_memalign((void **)&block, FBP_ALIGN, 2 * bytes) != 0) return FBP_ERR_NOMEM;
        free(plan->step_inputs);
        plan->step_inputs = block;
        plan->step_rows = plan->capacity;
        memcpy(block, x, (size_t)n * sizeof(REAL));
        plan->batch = block;
    } else {
        const size_t half =
            align_up((size_t)plan->step_rows * (size_t)plan->in_features * sizeof(REAL));
        REAL *first = (REAL *)plan->step_inputs, *second = (REAL *)(plan->step_inputs + half);
        REAL *free_copy = plan->batch == first ? second : first;
        if (!KERNEL(copy_finite)(free_copy, x, n)) return FBP_ERR_NONFINITE_INPUT;
        plan->batch = free_copy;
    }
    memcpy(plan->target, target, (size_t)rows * TFN(target_row_bytes)(plan, kind));
    return TFN(step)(plan, loss, rows, kind, opt, 1);
}

static fbp_status TFN(compute_gradients_public)(fbp_plan *plan, double *loss, const void *x,
                                                const void *target, int64_t rows,
                                                int64_t row_offset, fbp_loss kind,
                                                double grad_scale, fbp_grads_ready_fn grads_ready,
                                                void *ctx) {
    fbp_status st = reserve(plan, rows);
    if (st != FBP_OK) return st;
    if (kind == FBP_LOSS_CROSS_ENTROPY) {
        const int64_t *labels = target;
        for (int64_t r = 0; r < rows; r++)
            if (labels[r] < 0 || labels[r] >= plan->out_features) return FBP_ERR_INVALID;
    }
    memcpy(plan->input, x, (size_t)(rows * plan->in_features) * sizeof(REAL));
    plan->batch = plan->input;
    memcpy(plan->target, target, (size_t)rows * TFN(target_row_bytes)(plan, kind));
    plan->row_offset = row_offset;
    st = TFN(compute_gradients)(plan, loss, rows, kind, grad_scale, grads_ready, ctx, NULL, 1);
    plan->row_offset = 0;
    return st;
}

static inline void TFN(gather_row)(fbp_plan *plan, const void *X, const void *Y, int64_t src,
                                   int64_t r, size_t x_row, size_t y_row) {
    copy_row((char *)plan->input + (size_t)r * x_row, (const char *)X + (size_t)src * x_row, x_row);
    copy_row((char *)plan->target + (size_t)r * y_row, (const char *)Y + (size_t)src * y_row,
             y_row);
}

/* Batches of rows `order[first * batch_size ...]` (order NULL: the rows in order) of X and Y;
 * see train_batches below. */
static fbp_status TFN(train_batch_range)(fbp_plan *plan, double *loss_sum, int64_t *bad_batch,
                                         const void *X, const void *Y, int64_t n,
                                         const int64_t *order, int64_t batch_size, int64_t first,
                                         int64_t count, fbp_loss kind, fbp_optimizer *opt) {
    *bad_batch = -1;
    const int64_t rows_max = batch_size < n ? batch_size : n;
    fbp_status st = reserve(plan, rows_max);
    if (st != FBP_OK) return st;
    const size_t x_row = (size_t)plan->in_features * sizeof(REAL);
    const size_t y_row = TFN(target_row_bytes)(plan, kind);
    /* looked up once per call, not per batch: a tiny network's whole step is ~0.17 us */
    const int small = fbp_plan_small_step_applies(plan, rows_max);
    fbp_small_net net = TFN(small_net)(plan);
    /* A shuffled batch whose first op is a Linear above the GEMM's direct path is not gathered:
     * that layer's forward and weight gradient read its rows of X through the order while
     * packing them (fbp_gemm_rows), as they pack a copy, with the same bits. The gather was a
     * pass of its own bound by memory bandwidth: W3's 128 rows of 3 KiB ~88 us a step at one
     * thread, the products then reading the copy from cache. */
    const fbp_op *first_op = &plan->ops[0];
    const int indexable = !small && first_op->kind == FBP_OP_LINEAR &&
                          __atomic_load_n(&indexed_batches_enabled, __ATOMIC_RELAXED);
    for (int64_t b = first; b < first + count; b++) {
        const int64_t start = b * batch_size;
        if (start >= n) return FBP_ERR_INVALID;
        const int64_t rows = n - start < batch_size ? n - start : batch_size;
        const int64_t *idx = order ? order + start : NULL;
        double since = profile_start(plan);
        int consecutive = 1;
        int64_t first_row = start;
        if (idx) {
            for (int64_t r = 0; r < rows; r++) {
                if (idx[r] < 0 || idx[r] >= n) return FBP_ERR_INVALID;
                consecutive &= idx[r] == idx[0] + r;
            }
            first_row = idx[0];
        }
        const void *targets = plan->target;
        const int64_t *through = NULL; /* the rows' order, for the first layer's products */
        if (consecutive) {
            /* Consecutive rows (an epoch in order, or data shuffled beforehand) are read in place:
             * X streams from memory once, into the first product, instead of into a copy the
             * product then reads (W3: 43 us of a 1-thread step copied 400 KB). The fused step
             * reads Y's rows in place too (W1's 40 bytes: a call into libc per step); the
             * general walk's loss reads plan->target. */
            plan->batch = (const char *)X + (size_t)first_row * x_row;
            targets = (const char *)Y + (size_t)first_row * y_row;
            if (!small) copy_row(plan->target, targets, (size_t)rows * y_row);
        } else if (indexable &&
                   (double)rows * (double)first_op->in_features * (double)first_op->out_features >
                       FBP_GEMM_DIRECT_MAX_MACS) {
            for (int64_t r = 0; r < rows; r++) /* the targets alone */
                copy_row((char *)plan->target + (size_t)r * y_row,
                         (const char *)Y + (size_t)idx[r] * y_row, y_row);
            plan->batch = X;
            through = idx;
            if (plan->profiling) plan->profile.indexed_batch_count++;
        } else {
            /* The gather reads rows scattered over X (memory-bound: W3's 128 x 3 KiB took 25-90
             * us on one thread as the machine's speed drifted); it splits by rows above
             * GATHER_THREAD_GRAIN bytes. */
            const int gather_threads = fbp_team_size(rows * (int64_t)x_row, GATHER_THREAD_GRAIN);
            if (gather_threads > 1) {
#pragma omp parallel for num_threads(gather_threads) schedule(static)
                for (int64_t r = 0; r < rows; r++)
                    TFN(gather_row)(plan, X, Y, idx[r], r, x_row, y_row);
            } else { /* not even an if(0) region: a trip through libgomp per batch (W2: +75%) */
                for (int64_t r = 0; r < rows; r++)
                    TFN(gather_row)(plan, X, Y, idx[r], r, x_row, y_row);
            }
            plan->batch = plan->input;
        }
        if (kind == FBP_LOSS_CROSS_ENTROPY) {
            const int64_t *labels = targets;
            for (int64_t r = 0; r < rows; r++)
                if (labels[r] < 0 || labels[r] >= plan->out_features) return FBP_ERR_INVALID;
        }
        if (plan->profiling) {
            profile_lap(plan, &plan->profile.batches, &since);
            plan->profile.batch_count++;
        }
        double loss = 0;
        net.input = plan->batch;
        net.target = targets;
        plan->batch_rows = through; /* the order is the caller's: for this step only */
        st = small ? TFN(small_step)(plan, &net, &loss, rows, kind, opt)
                   : TFN(step)(plan, &loss, rows, kind, opt, b == first + count - 1);
        plan->batch_rows = NULL;
        if (st == FBP_ERR_NONFINITE || st == FBP_ERR_NONFINITE_INPUT) *bad_batch = b;
        if (st != FBP_OK) return st;
        *loss_sum += loss * (double)rows;
    }
    return FBP_OK;
}

/* The caller's rows are not kept past the call: a later backward has no input to read. */
static void TFN(release_batch)(fbp_plan *plan) {
    plan->batch_rows = NULL;
    if (plan->batch != plan->input) {
        plan->batch = plan->input;
        plan->last_batch = -1;
    }
}

static fbp_status TFN(train_batches)(fbp_plan *plan, double *loss_sum, int64_t *bad_batch,
                                     const void *X, const void *Y, int64_t n, const int64_t *order,
                                     int64_t batch_size, int64_t first, int64_t count,
                                     fbp_loss kind, fbp_optimizer *opt, int check_x) {
    plan->check_input = check_x; /* read by each step (TFN(forward), TFN(small_step)) */
    const fbp_status st = TFN(train_batch_range)(plan, loss_sum, bad_batch, X, Y, n, order,
                                                 batch_size, first, count, kind, opt);
    plan->check_input = 0;
    TFN(release_batch)(plan);
    return st;
}

static fbp_status TFN(predict)(fbp_plan *plan, void *out, const void *x, int64_t rows,
                               int check_x) {
    fbp_status st = reserve(plan, rows);
    if (st != FBP_OK) return st;
    plan->batch = x;
    plan->check_input = check_x;
    st = TFN(forward)(plan, rows, 0);
    plan->check_input = 0;
    if (st == FBP_OK)
        memcpy(out, plan->cur_out[plan->n_ops - 1],
               (size_t)(rows * plan->out_features) * sizeof(REAL));
    TFN(release_batch)(plan);
    return st;
}

static fbp_status TFN(evaluate)(fbp_plan *plan, double *loss_sum, int64_t *correct, const void *X,
                                const void *Y, int64_t n, int64_t batch_size, fbp_loss kind) {
    const int64_t rows_max = batch_size < n ? batch_size : n;
    fbp_status st = reserve(plan, rows_max);
    if (st != FBP_OK) return st;
    const size_t x_row = (size_t)plan->in_features * sizeof(REAL);
    const size_t y_row = TFN(target_row_bytes)(plan, kind);
    const int64_t classes = plan->out_features;
    *loss_sum = 0;
    *correct = 0;
    for (int64_t start = 0; start < n; start += batch_size) {
        const int64_t rows = n - start < batch_size ? n - start : batch_size;
        plan->batch = (const char *)X + (size_t)start * x_row; /* read in place */
        const void *target = (const char *)Y + (size_t)start * y_row;
        st = TFN(forward)(plan, rows, 0);
        double loss = 0;
        if (st == FBP_OK) st = TFN(loss_public)(plan, &loss, NULL, target, rows, kind);
        if (st != FBP_OK) break;
        *loss_sum += loss * (double)rows;
        if (kind == FBP_LOSS_CROSS_ENTROPY) {
            const REAL *logits = plan->cur_out[plan->n_ops - 1];
            const int64_t *labels = target;
            for (int64_t r = 0; r < rows; r++) {
                int64_t best = 0;
                for (int64_t c = 1; c < classes; c++)
                    if (logits[r * classes + c] > logits[r * classes + best]) best = c;
                *correct += best == labels[r];
            }
        }
    }
    TFN(release_batch)(plan);
    return st;
}

#undef KERNEL
#undef TFN
#endif /* FBP_TRAIN_PASS */
