/* Losses: value and gradient in one pass. Softmax cross-entropy on integer labels and mean
 * squared error. The loss is accumulated in double, row by row in order (one thread: the
 * work is O(rows * classes), small next to the GEMMs around it, and a fixed order keeps the
 * value independent of the thread count).
 * Compiled once per ISA; includes itself once per dtype (see kernel.h). */
#ifndef FBP_TEMPLATE_PASS
#include <math.h>

#include "kernel.h"

#define FBP_TEMPLATE_PASS 1
#include "loss.c"
#define FBP_DTYPE_F64 1
#include "kernel.h"
#include "loss.c"

#else /* FBP_TEMPLATE_PASS */

#include "pointwise.h"

FBP_INLINE REAL LFN(hmax)(VEC v) {
    REAL lanes[FBP_VBYTES / sizeof(REAL)];
    V_(vstore)(lanes, v);
    REAL m = lanes[0];
    for (int64_t i = 1; i < VL; i++) m = lanes[i] > m ? lanes[i] : m;
    return m;
}

FBP_INLINE REAL LFN(hsum)(VEC v) {
    REAL lanes[FBP_VBYTES / sizeof(REAL)];
    V_(vstore)(lanes, v);
    REAL s = 0;
    for (int64_t i = 0; i < VL; i++) s += lanes[i];
    return s;
}

/* Fewer classes than lanes (a 10-class classifier): each row is one vector, kept in registers
 * from the logits to the gradient's single store. The arithmetic is the general loop's below,
 * value for value (a NaN loss may come out with the other sign bit): the max is exact in any
 * order, the sum adds the classes in order from a full (store-forwarded) copy of the
 * exponentials, and the label's lane subtracts rscale as g[label] -= rscale does. The general
 * loop stored the exponentials with a masked store and read them back, twice, waiting on it each
 * time: W3's 128 x 10 loss took 7.9 us per step, now 4.9 (per-op profile, one thread). With
 * gathers, whole blocks of VL rows go to softmax_xent_lanes instead and this takes the rest;
 * total carries the loss of the rows before, so the rows are summed in order. */
static double LFN(softmax_xent_narrow)(REAL *dlogits, const REAL *logits, const int64_t *labels,
                                       int64_t rows, int64_t classes, REAL rscale, double total) {
    REAL lane_index[FBP_VBYTES / sizeof(REAL)];
    for (int64_t i = 0; i < VL; i++) lane_index[i] = (REAL)i;
    const VEC lane = V_(vload)(lane_index), live = V_(vbcast)((REAL)classes);
    for (int64_t r = 0; r < rows; r++) {
        const REAL *x = logits + r * classes;
        const VEC xv = V_(vload_part)(x, classes);
        /* the max of the classes that compare above -inf, as below: padding and NaN lanes
         * become -inf (a NaN then makes its row NaN through the exponentials) */
        const VEC ninf = V_(vbcast)(-INFINITY);
        const VEC xm = V_(vselect)((lane < live) & (xv > ninf), xv, ninf);
        REAL mx = LFN(hmax)(xm);
        if (mx == -INFINITY) mx = 0;
        const VEC e = V_(vexp_nonpos)(xv - mx);
        REAL ev[FBP_VBYTES / sizeof(REAL)];
        V_(vstore)(ev, e);
        REAL sum = 0;
        for (int64_t j = 0; j < classes; j++) sum += ev[j];
        const REAL inv = rscale / sum;
        VEC g = e * inv;
        g = V_(vselect)(lane == V_(vbcast)((REAL)labels[r]), g - rscale, g);
        V_(vstore_part)(dlogits + r * classes, g, classes);
        total += log((double)sum) - ((double)x[labels[r]] - (double)mx);
    }
    return total;
}

#if FBP_HAVE_VGATHER
/* The narrow kernel's arithmetic for `groups` blocks of VL rows, one row per lane: each class is
 * a gathered column, so a row's chain of dependent steps (the max, the exponentials' sum in class
 * order, the division) runs in all lanes at once instead of once per row; the gradient goes out
 * through a small transposed copy. Every lane sees exactly the narrow kernel's operations (the max
 * of the classes above -inf, exp(x - max), the sum from 0 in class order, rscale / sum, the
 * label's rscale subtracted), so both give the same bits, and the loss adds the rows in order.
 * W3's 128 x 10 loss (per-op profile, interleaved fits): 9.3 -> 6.6 us a step at one thread,
 * 8.1 -> 4.8 at two; alone, 5.7 -> 2.8 us a call. */
static double LFN(softmax_xent_lanes)(REAL *dlogits, const REAL *logits, const int64_t *labels,
                                      int64_t groups, int64_t classes, REAL rscale, double total) {
    const VEC ninf = V_(vbcast)(-INFINITY), zero = V_(vbcast)(0);
    for (int64_t grp = 0; grp < groups; grp++) {
        const REAL *x = logits + grp * VL * classes;
        REAL *g = dlogits + grp * VL * classes;
        const int64_t *label = labels + grp * VL;
        REAL label_lanes[FBP_VBYTES / sizeof(REAL)];
        for (int64_t l = 0; l < VL; l++) label_lanes[l] = (REAL)label[l];
        const VEC label_v = V_(vload)(label_lanes);
        VEC col[FBP_VBYTES / sizeof(REAL)]; /* classes < VL columns */
        VEC mx = ninf;
        for (int64_t j = 0; j < classes; j++) {
            col[j] = V_(vgather_part)(x + j, classes, VL);
            const VEC xm = V_(vselect)(col[j] > ninf, col[j], ninf); /* NaN counts as -inf */
            mx = V_(vselect)(xm > mx, xm, mx);
        }
        mx = V_(vselect)(mx == ninf, zero, mx);
        VEC sum = zero;
        for (int64_t j = 0; j < classes; j++) {
            col[j] = V_(vexp_nonpos)(col[j] - mx);
            sum += col[j];
        }
        const VEC inv = V_(vbcast)(rscale) / sum;
        REAL out[FBP_VBYTES / sizeof(REAL)][FBP_VBYTES / sizeof(REAL)]; /* [class][row] */
        for (int64_t j = 0; j < classes; j++) {
            const VEC gj = col[j] * inv;
            V_(vstore)(out[j], V_(vselect)(label_v == V_(vbcast)((REAL)j), gj - rscale, gj));
        }
        for (int64_t l = 0; l < VL; l++)
            for (int64_t j = 0; j < classes; j++) g[l * classes + j] = out[j][l];
        REAL sums[FBP_VBYTES / sizeof(REAL)], maxes[FBP_VBYTES / sizeof(REAL)];
        V_(vstore)(sums, sum);
        V_(vstore)(maxes, mx);
        for (int64_t l = 0; l < VL; l++)
            total += log((double)sums[l]) - ((double)x[l * classes + label[l]] - (double)maxes[l]);
    }
    return total;
}
#endif

/* Softmax row by row, stable for any finite logits: exp(x - max) <= 1 never overflows. */
fbp_status KFN(softmax_xent)(double *loss, REAL *dlogits, const REAL *logits, const int64_t *labels,
                             int64_t rows, int64_t classes, double scale) {
    if (!loss || rows < 0 || classes <= 0) return FBP_ERR_INVALID;
    *loss = 0;
    if (rows == 0) return FBP_OK;
    if (!dlogits || !logits || !labels) return FBP_ERR_INVALID;
    for (int64_t r = 0; r < rows; r++)
        if (labels[r] < 0 || labels[r] >= classes) return FBP_ERR_INVALID;
    const REAL rscale = (REAL)scale;
    if (classes < VL) {
        double total = 0;
        int64_t done = 0;
#if FBP_HAVE_VGATHER
        done = rows / VL * VL;
        total = LFN(softmax_xent_lanes)(dlogits, logits, labels, rows / VL, classes, rscale, 0);
#endif
        total = LFN(softmax_xent_narrow)(dlogits + done * classes, logits + done * classes,
                                         labels + done, rows - done, classes, rscale, total);
        *loss = total * scale;
        return FBP_OK;
    }
    double total = 0;
    for (int64_t r = 0; r < rows; r++) {
        const REAL *x = logits + r * classes;
        REAL *g = dlogits + r * classes;
        /* NaN-propagating max: a NaN lane makes the whole row NaN below, as in torch. */
        VEC mv = V_(vbcast)(-INFINITY);
        int64_t j = 0;
        for (; j + VL <= classes; j += VL) {
            VEC xv = V_(vload)(x + j);
            mv = V_(vselect)(xv > mv, xv, mv);
        }
        REAL mx = LFN(hmax)(mv);
        for (; j < classes; j++) mx = x[j] > mx ? x[j] : mx;
        if (mx == -INFINITY) mx = 0; /* all -inf: exp gives 0s, and the loss inf, as in torch */
        VEC sv = V_(vbcast)(0);
        for (j = 0; j + VL <= classes; j += VL) {
            VEC e = V_(vexp_nonpos)(V_(vload)(x + j) - mx);
            V_(vstore)(g + j, e);
            sv += e;
        }
        REAL sum = LFN(hsum)(sv);
        if (j < classes) {
            const int64_t cnt = classes - j;
            VEC e = V_(vexp_nonpos)(V_(vload_part)(x + j, cnt) - mx);
            V_(vstore_part)(g + j, e, cnt);
            for (; j < classes; j++) sum += g[j]; /* padded lanes hold exp(-mx): skip them */
        }
        const REAL inv = rscale / sum;
        for (j = 0; j + VL <= classes; j += VL) V_(vstore)(g + j, V_(vload)(g + j) * inv);
        for (; j < classes; j++) g[j] *= inv;
        g[labels[r]] -= rscale;
        total += log((double)sum) - ((double)x[labels[r]] - (double)mx);
    }
    *loss = total * scale;
    return FBP_OK;
}

fbp_status KFN(mse)(double *loss, REAL *dpred, const REAL *pred, const REAL *target, int64_t n,
                    double scale) {
    if (!loss || n < 0) return FBP_ERR_INVALID;
    *loss = 0;
    if (n == 0) return FBP_OK;
    if (!pred || !target) return FBP_ERR_INVALID;
    const REAL gscale = (REAL)(2 * scale);
    if (n <= FBP_MSE_SEQUENTIAL_MAX) {
        *loss = LFN(mse_sequential)(dpred, pred, target, n, gscale) * scale;
        return FBP_OK;
    }
    double total = 0;
#pragma omp simd reduction(+ : total)
    for (int64_t i = 0; i < n; i++) {
        REAL d = pred[i] - target[i];
        total += (double)d * (double)d;
    }
    if (dpred) {
#pragma omp simd
        for (int64_t i = 0; i < n; i++) dpred[i] = gscale * (pred[i] - target[i]);
    }
    *loss = total * scale;
    return FBP_OK;
}

#endif /* FBP_TEMPLATE_PASS */
