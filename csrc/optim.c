/* Optimizer updates over one flat buffer, one fused pass per element: torch.optim's SGD
 * (momentum, dampening, nesterov, weight decay) and Adam/AdamW, in torch's operation order so
 * results agree to rounding. Large buffers are split between threads by index range; every
 * element's update is independent, so the result never depends on the split.
 *
 * Subnormals: a moment whose gradient is mostly 0 (the weight of an input pixel that is rarely
 * lit, a dead ReLU's) decays by beta each step and spends ~150 steps below FLT_MIN, and an x86
 * multiply or FMA with a subnormal operand or result takes a microcode assist (measured on
 * Sapphire Rapids: 34 ns per 16-lane FMA instead of 1.5). By W3's third epoch 9% of Adam's first
 * moments are subnormal and an epoch takes 50% longer (0.45 -> 0.68 s). So by default the updates
 * run in flush-to-zero/denormals-are-zero mode (fbp_set_flush_denormal): every stored value
 * differs from IEEE's by less than FLT_MIN (1.2e-38) and normal results are unchanged.
 * Compiled once per ISA; includes itself once per dtype (see kernel.h). */
#ifndef FBP_TEMPLATE_PASS
#include <omp.h>
#include <tgmath.h> /* sqrt resolves to sqrtf for float */

#include "kernel.h"

/* Parameters per thread before a second thread pays (Adam: ~15 us of streaming). */
#define OPTIM_THREAD_GRAIN (1 << 16)

#define FBP_TEMPLATE_PASS 1
#include "optim.c"
#define FBP_DTYPE_F64 1
#include "kernel.h"
#include "optim.c"

#else /* FBP_TEMPLATE_PASS */

static void LFN(sgd_range)(REAL *restrict p, REAL *restrict buf, const REAL *restrict g, int64_t n,
                           REAL lr, REAL mom, REAL keep, REAL wd, int nesterov, int first) {
    /* keep = 1 - dampening, formed in double by the caller and rounded once (as torch does) */
    const unsigned fp_mode = fbp_fp_flush_enter(); /* see the file comment */
    if (mom == 0) {
#pragma omp simd
        for (int64_t i = 0; i < n; i++) p[i] -= lr * (wd != 0 ? g[i] + wd * p[i] : g[i]);
    } else {
#pragma omp simd
        for (int64_t i = 0; i < n; i++) {
            REAL d = wd != 0 ? g[i] + wd * p[i] : g[i];
            REAL b = first ? d : buf[i] * mom + keep * d;
            buf[i] = b;
            d = nesterov ? d + mom * b : b;
            p[i] -= lr * d;
        }
    }
    fbp_fp_restore(fp_mode);
}

fbp_status KFN(sgd_step)(REAL *param, REAL *momentum_buf, const REAL *grad, int64_t n, double lr,
                         double momentum, double dampening, double weight_decay, int nesterov,
                         int first_step) {
    if (n < 0) return FBP_ERR_INVALID;
    if (n == 0) return FBP_OK;
    if (!param || !grad || (momentum != 0 && !momentum_buf)) return FBP_ERR_INVALID;
    const int nthreads = fbp_team_size(n, OPTIM_THREAD_GRAIN);
    if (nthreads <= 1) {
        LFN(sgd_range)(param, momentum_buf, grad, n, (REAL)lr, (REAL)momentum,
                       (REAL)(1.0 - dampening), (REAL)weight_decay, nesterov, first_step);
        return FBP_OK;
    }
#pragma omp parallel num_threads(nthreads)
    {
        int64_t lo, hi;
        fbp_split_range(n, omp_get_num_threads(), omp_get_thread_num(), &lo, &hi);
        LFN(sgd_range)(param + lo, momentum_buf ? momentum_buf + lo : NULL, grad + lo, hi - lo,
                       (REAL)lr, (REAL)momentum, (REAL)(1.0 - dampening), (REAL)weight_decay,
                       nesterov, first_step);
    }
    return FBP_OK;
}

static void LFN(adam_range)(REAL *restrict p, REAL *restrict m, REAL *restrict v,
                            const REAL *restrict g, int64_t n, REAL w1, REAL b2, REAL w2, REAL eps,
                            REAL wd, REAL decay, REAL step_size, REAL bc2_sqrt) {
    const unsigned fp_mode = fbp_fp_flush_enter(); /* see the file comment */
#pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        REAL pi = p[i] * decay; /* AdamW's decoupled decay; decay == 1 for Adam */
        REAL gi = wd != 0 ? g[i] + wd * pi : g[i]; /* Adam's L2 term; wd == 0 for AdamW */
        REAL mi = m[i] + w1 * (gi - m[i]);         /* torch: exp_avg.lerp_(grad, 1 - beta1) */
        REAL vi = v[i] * b2 + w2 * gi * gi;
        REAL denom = sqrt(vi) / bc2_sqrt + eps;
        m[i] = mi;
        v[i] = vi;
        p[i] = pi - step_size * (mi / denom);
    }
    fbp_fp_restore(fp_mode);
}

/* 1 - beta^step, exactly as 1 - pow(beta, step) rounds. Once beta^step <= 2^-60 that is 1.0
 * (1 - x rounds to 1 for x <= 2^-54), and pow is skipped: it was 6% of a tiny network's step,
 * and from step ~7000 (0.9^step underflowing) it also went through glibc's error handling.
 * ln(1/beta) >= 1 - beta, so step (1 - beta) >= 60 ln 2 implies beta^step <= 2^-60. */
static double LFN(bias_correction)(double beta, int64_t step) {
    if (beta >= 0 && beta < 1 && (double)step * (1 - beta) >= 60 * 0.6931471805599453) return 1.0;
    return 1 - pow(beta, (double)step);
}

fbp_status KFN(adam_step)(REAL *param, REAL *exp_avg, REAL *exp_avg_sq, const REAL *grad, int64_t n,
                          double lr, double beta1, double beta2, double eps, double weight_decay,
                          int decoupled, int64_t step) {
    if (n < 0 || step < 1) return FBP_ERR_INVALID;
    if (n == 0) return FBP_OK;
    if (!param || !exp_avg || !exp_avg_sq || !grad) return FBP_ERR_INVALID;
    /* Scalars in double, as torch computes them in Python floats. */
    const double bc1 = LFN(bias_correction)(beta1, step);
    const double bc2 = LFN(bias_correction)(beta2, step);
    const REAL step_size = (REAL)(lr / bc1), bc2_sqrt = (REAL)sqrt(bc2);
    const REAL decay = decoupled ? (REAL)(1 - lr * weight_decay) : 1;
    const REAL wd = decoupled ? 0 : (REAL)weight_decay;
    /* 1 - beta in double, rounded once: in float, 1 - fl(0.999) loses ~7 bits to cancellation */
    const REAL w1 = (REAL)(1.0 - beta1), b2 = (REAL)beta2, w2 = (REAL)(1.0 - beta2);
    const int nthreads = fbp_team_size(n, OPTIM_THREAD_GRAIN);
    if (nthreads <= 1) {
        LFN(adam_range)(param, exp_avg, exp_avg_sq, grad, n, w1, b2, w2, (REAL)eps, wd, decay,
                        step_size, bc2_sqrt);
        return FBP_OK;
    }
#pragma omp parallel num_threads(nthreads)
    {
        int64_t lo, hi;
        fbp_split_range(n, omp_get_num_threads(), omp_get_thread_num(), &lo, &hi);
        LFN(adam_range)(param + lo, exp_avg + lo, exp_avg_sq + lo, grad + lo, hi - lo, w1, b2, w2,
                        (REAL)eps, wd, decay, step_size, bc2_sqrt);
    }
    return FBP_OK;
}

#endif /* FBP_TEMPLATE_PASS */
