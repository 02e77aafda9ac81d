/* Activations: forward y = act(x) and backward dz = dy * act'(y) fused with the bias gradient,
 * side by side. The derivative is taken from the stored output y (sigmoid y(1-y), tanh 1-y^2,
 * relu y > 0), so the forward pass never keeps its pre-activation.
 * Compiled once per ISA; includes itself once per dtype (see kernel.h). */
#ifndef FBP_TEMPLATE_PASS
#include <omp.h>

#include "kernel.h"

/* Elements per thread before a second thread pays for itself (sigmoid: ~20 us of work). */
#define ACT_THREAD_GRAIN (1 << 17)
/* The same for a copy from memory: 256 KiB of float32 (~25 us at one core's ~10 GB/s). */
#define COPY_THREAD_GRAIN (1 << 16)
/* How far ahead sigmoid's and tanh's forward loops prefetch x: their arithmetic kept the hardware
 * prefetcher from running far enough ahead (C harness, AVX-512 float32: sigmoid of 10^6 values
 * 0.32 -> 0.29 ns each, of 10^7 0.44 -> 0.31; tanh 0.34 -> 0.30 and 0.50 -> 0.33: relu's speed;
 * AVX2 sigmoid 0.52 -> 0.49 at 10^6; 1, 2 and 8 KiB did no better). Not relu's: it streams at
 * memory speed without, and in cache the extra instruction cost it 10% (AVX-512) to 29% (AVX2). */
#define ACT_PREFETCH_BYTES 4096

#define FBP_TEMPLATE_PASS 1
#include "activation.c"
#define FBP_DTYPE_F64 1
#include "kernel.h"
#include "activation.c"

#else /* FBP_TEMPLATE_PASS */

#include "pointwise.h"

/* One loop per activation so the switch is outside the hot loop. With PREFETCH, x is prefetched
 * ACT_PREFETCH_BYTES ahead (an address computed as an integer: it may lie past the array). */
#define ACT_LOOP(FN, PREFETCH)                                                                     \
    do {                                                                                           \
        int64_t i = 0;                                                                             \
        for (; i + VL <= n; i += VL) {                                                             \
            if (PREFETCH)                                                                          \
                __builtin_prefetch((const void *)((uintptr_t)(x + i) + ACT_PREFETCH_BYTES), 0, 3); \
            V_(vstore)(y + i, FN(V_(vload)(x + i)));                                               \
        }                                                                                          \
        if (i < n) V_(vstore_part)(y + i, FN(V_(vload_part)(x + i, n - i)), n - i);                \
    } while (0)

static void LFN(act_forward_range)(REAL *y, const REAL *x, int64_t n, fbp_activation act) {
    switch (act) {
    case FBP_ACT_SIGMOID:
        ACT_LOOP(V_(vsigmoid), 1);
        break;
    case FBP_ACT_RELU:
        ACT_LOOP(V_(vrelu), 0);
        break;
    case FBP_ACT_TANH:
        ACT_LOOP(V_(vtanh), 1);
        break;
    default:
        if (y != x) memmove(y, x, (size_t)n * sizeof(REAL));
        break;
    }
}
#undef ACT_LOOP

fbp_status KFN(activation_forward)(REAL *y, const REAL *x, int64_t n, fbp_activation act) {
    if (n < 0 || (unsigned)act > FBP_ACT_TANH) return FBP_ERR_INVALID;
    if (n == 0) return FBP_OK;
    if (!y || !x) return FBP_ERR_INVALID;
    const int nthreads = fbp_team_size(n, ACT_THREAD_GRAIN);
    if (nthreads == 1) {
        LFN(act_forward_range)(y, x, n, act);
        return FBP_OK;
    }
#pragma omp parallel num_threads(nthreads)
    {
        int64_t lo, hi; /* in whole vectors, so only the last range has a tail */
        fbp_split_range((n + VL - 1) / VL, omp_get_num_threads(), omp_get_thread_num(), &lo, &hi);
        lo *= VL;
        hi = hi * VL < n ? hi * VL : n;
        if (lo < hi) LFN(act_forward_range)(y + lo, x + lo, hi - lo, act);
    }
    return FBP_OK;
}

/* dst = src over n values; 0 when one of them is NaN or infinite (finite_acc), else 1. */
static int LFN(copy_finite_range)(REAL *restrict dst, const REAL *restrict src, int64_t n) {
    const VEC zero = V_(vbcast)(0);
    VEC s0 = zero, s1 = zero;
    int64_t i = 0;
    for (; i + 2 * VL <= n; i += 2 * VL) {
        const VEC a = V_(vload)(src + i), b = V_(vload)(src + i + VL);
        s0 = LFN(finite_acc)(s0, a);
        s1 = LFN(finite_acc)(s1, b);
        V_(vstore)(dst + i, a);
        V_(vstore)(dst + i + VL, b);
    }
    for (; i < n; i += VL) {
        const int64_t cnt = n - i < VL ? n - i : VL;
        const VEC a = V_(vload_n)(src + i, cnt);
        s0 = LFN(finite_acc)(s0, a);
        V_(vstore_n)(dst + i, a, cnt);
    }
    return LFN(acc_finite)(s0 + s1);
}

/* train_step's copy of its batch, checked as it is made: a batch from memory is copied at the
 * memory's pace, so a second thread, with its own share of the bandwidth, halves it (W3's
 * 400 KB: 37 us on one core, 19.5 on two; the plain-C pass took 48). */
int KFN(copy_finite)(REAL *restrict dst, const REAL *restrict src, int64_t n) {
    if (n <= 0) return 1;
    const int nthreads = fbp_team_size(n, COPY_THREAD_GRAIN);
    if (nthreads == 1) return LFN(copy_finite_range)(dst, src, n);
    int finite = 1;
#pragma omp parallel num_threads(nthreads) reduction(&& : finite)
    {
        int64_t lo, hi; /* whole vectors, so only the last range has a tail */
        fbp_split_range((n + VL - 1) / VL, omp_get_num_threads(), omp_get_thread_num(), &lo, &hi);
        lo *= VL;
        hi = hi * VL < n ? hi * VL : n;
        if (lo < hi) finite = LFN(copy_finite_range)(dst + lo, src + lo, hi - lo);
    }
    return finite;
}

/* Columns [c0, c1) of every row, in blocks of up to DB_VECS vectors: each block's bias
 * gradient is summed over the rows in a register (a running sum through memory waited on a
 * store-to-load forward every row, most of a tiny layer's backward). Each dbias element is still
 * summed in row order from its old value, so neither the blocking nor the split of columns
 * between threads changes a bit. */
#define DB_VECS 4
static void LFN(act_backward_cols)(REAL *dz, REAL *dbias, const REAL *dy, const REAL *y,
                                   int64_t rows, int64_t cols, int64_t c0, int64_t c1,
                                   fbp_activation act, int accumulate) {
    /* identity in place (a linear output layer's dZ = dY): only the bias sum is left to do */
    const int store = !(act == FBP_ACT_IDENTITY && dz == dy);
    for (int64_t j0 = c0; j0 < c1; j0 += DB_VECS * VL) {
        const int64_t width = c1 - j0 < DB_VECS * VL ? c1 - j0 : DB_VECS * VL;
        /* the vectors this block has, the last holding `tail` columns (a narrow layer, e.g.
         * 1 output, has one) */
        const int nvec = (int)((width + VL - 1) / VL);
        const int64_t tail = width - (int64_t)(nvec - 1) * VL;
        /* fixed-count loops (unrolled, db in registers) that skip the absent vectors */
        VEC db[DB_VECS] = {0}; /* all set before use; the zeros quiet -Wmaybe-uninitialized */
#pragma GCC unroll 4
        for (int v = 0; v < DB_VECS; v++) {
            if (v >= nvec) break;
            const int64_t j = j0 + v * VL, cnt = v < nvec - 1 ? VL : tail;
            db[v] = !dbias || !accumulate ? V_(vbcast)(0)
                    : cnt == VL           ? V_(vload)(dbias + j)
                                          : V_(vload_part)(dbias + j, cnt);
        }
        for (int64_t r = 0; r < rows; r++) {
#pragma GCC unroll 4
            for (int v = 0; v < DB_VECS; v++) {
                if (v >= nvec) break;
                const int64_t cnt = v < nvec - 1 ? VL : tail, o = r * cols + j0 + v * VL;
                if (cnt == VL) {
                    VEC g = LFN(act_grad)(V_(vload)(dy + o), V_(vload)(y + o), act);
                    if (store) V_(vstore)(dz + o, g);
                    db[v] += g;
                } else {
                    VEC g =
                        LFN(act_grad)(V_(vload_part)(dy + o, cnt), V_(vload_part)(y + o, cnt), act);
                    if (store) V_(vstore_part)(dz + o, g, cnt);
                    db[v] += g;
                }
            }
        }
        if (!dbias) continue;
#pragma GCC unroll 4
        for (int v = 0; v < DB_VECS; v++) {
            if (v >= nvec) break;
            const int64_t j = j0 + v * VL, cnt = v < nvec - 1 ? VL : tail;
            if (cnt == VL)
                V_(vstore)(dbias + j, db[v]);
            else
                V_(vstore_part)(dbias + j, db[v], cnt);
        }
    }
}
fbp_status KFN(activation_backward)(REAL *dz, REAL *dbias, const REAL *dy, const REAL *y,
                                    int64_t rows, int64_t cols, fbp_activation act,
                                    int accumulate) {
    if (rows < 0 || cols < 0 || (unsigned)act > FBP_ACT_TANH) return FBP_ERR_INVALID;
    if (cols == 0) return FBP_OK;
    if (rows == 0) {
        if (dbias && !accumulate) memset(dbias, 0, (size_t)cols * sizeof(REAL));
        return FBP_OK;
    }
    if (!dz || !dy || (!y && act != FBP_ACT_IDENTITY)) return FBP_ERR_INVALID;
    if (!y) y = dy; /* identity never reads y */
    const int64_t vcols = (cols + VL - 1) / VL;
    int nthreads = fbp_team_size(rows * cols, ACT_THREAD_GRAIN);
    if (nthreads > vcols) nthreads = (int)vcols;
    if (nthreads <= 1) {
        LFN(act_backward_cols)(dz, dbias, dy, y, rows, cols, 0, cols, act, accumulate);
        return FBP_OK;
    }
#pragma omp parallel num_threads(nthreads)
    {
        int64_t lo, hi;
        fbp_split_range(vcols, omp_get_num_threads(), omp_get_thread_num(), &lo, &hi);
        lo *= VL;
        hi = hi * VL < cols ? hi * VL : cols;
        if (lo < hi) LFN(act_backward_cols)(dz, dbias, dy, y, rows, cols, lo, hi, act, accumulate);
    }
    return FBP_OK;
}

#endif /* FBP_TEMPLATE_PASS */
