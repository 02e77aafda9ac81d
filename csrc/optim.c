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

#include "update.h"

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

fbp_status KFN(adam_step)(REAL *param, REAL *exp_avg, REAL *exp_avg_sq, const REAL *grad, int64_t n,
                          double lr, double beta1, double beta2, double eps, double weight_decay,
                          int decoupled, int64_t step) {
    if (n < 0 || step < 1) return FBP_ERR_INVALID;
    if (n == 0) return FBP_OK;
    if (!param || !exp_avg || !exp_avg_sq || !grad) return FBP_ERR_INVALID;
    const LFN(adam_coefs) coefs =
        LFN(adam_coefficients)(lr, beta1, beta2, eps, weight_decay, decoupled, step);
    const int nthreads = fbp_team_size(n, OPTIM_THREAD_GRAIN);
    if (nthreads <= 1) {
        LFN(adam_range)(param, exp_avg, exp_avg_sq, grad, n, &coefs);
        return FBP_OK;
    }
#pragma omp parallel num_threads(nthreads)
    {
        int64_t lo, hi;
        fbp_split_range(n, omp_get_num_threads(), omp_get_thread_num(), &lo, &hi);
        LFN(adam_range)(param + lo, exp_avg + lo, exp_avg_sq + lo, grad + lo, hi - lo, &coefs);
    }
    return FBP_OK;
}

#endif /* FBP_TEMPLATE_PASS */
