/* The optimizer updates of one range of a flat buffer, in torch.optim's operation order:
 * shared by the optimizer kernels (optim.c), the fused small-network step (small.c) and the
 * GEMM's SGD epilogue (gemm.c), so all apply the same arithmetic. Per-dtype helpers without an
 * include guard: a family includes this in each dtype pass (see pointwise.h), after <tgmath.h> so
 * that sqrt is sqrtf for float. */

/* sgd_body runs in the caller's floating-point mode, sgd_range sets the flush mode around it
 * (see optim.c's file comment): the GEMM's fused update (gemm.c) calls the body row by row inside
 * one mode switch, so every path applies the same code to each element. */
static inline void LFN(sgd_body)(REAL *restrict p, REAL *restrict buf, const REAL *restrict g,
                                 int64_t n, REAL lr, REAL mom, REAL keep, REAL wd, int nesterov,
                                 int first) {
    /* keep = 1 - dampening, formed in double by the caller and rounded once (as torch does) */
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
}

static inline void LFN(sgd_range)(REAL *restrict p, REAL *restrict buf, const REAL *restrict g,
                                  int64_t n, REAL lr, REAL mom, REAL keep, REAL wd, int nesterov,
                                  int first) {
    const unsigned fp_mode = fbp_fp_flush_enter();
    LFN(sgd_body)(p, buf, g, n, lr, mom, keep, wd, nesterov, first);
    fbp_fp_restore(fp_mode);
}

/* 1 - beta^step, exactly as 1 - pow(beta, step) rounds. Once beta^step <= 2^-60 that is 1.0
 * (1 - x rounds to 1 for x <= 2^-54), and pow is skipped: it was 6% of a tiny network's step,
 * and from step ~7000 (0.9^step underflowing) it also went through glibc's error handling.
 * ln(1/beta) >= 1 - beta, so step (1 - beta) >= 60 ln 2 implies beta^step <= 2^-60. */
static inline double LFN(bias_correction)(double beta, int64_t step) {
    if (beta >= 0 && beta < 1 && (double)step * (1 - beta) >= 60 * 0.6931471805599453) return 1.0;
    return 1 - pow(beta, (double)step);
}

/* Adam's scalars for one step: computed in double, as torch computes them in Python floats, and
 * rounded to the dtype once. */
typedef struct {
    REAL w1, b2, w2, eps, wd, decay, step_size, bc2_sqrt;
} LFN(adam_coefs);

static inline LFN(adam_coefs)
    LFN(adam_coefficients)(double lr, double beta1, double beta2, double eps, double weight_decay,
                           int decoupled, int64_t step) {
    const double bc1 = LFN(bias_correction)(beta1, step);
    const double bc2 = LFN(bias_correction)(beta2, step);
    LFN(adam_coefs) c;
    c.step_size = (REAL)(lr / bc1);
    c.bc2_sqrt = (REAL)sqrt(bc2);
    c.decay = decoupled ? (REAL)(1 - lr * weight_decay) : 1; /* AdamW's decoupled decay */
    c.wd = decoupled ? 0 : (REAL)weight_decay;               /* Adam's L2 term */
    /* 1 - beta in double, rounded once: in float, 1 - fl(0.999) loses ~7 bits to cancellation */
    c.w1 = (REAL)(1.0 - beta1);
    c.b2 = (REAL)beta2;
    c.w2 = (REAL)(1.0 - beta2);
    c.eps = (REAL)eps;
    return c;
}

static inline void LFN(adam_range)(REAL *restrict p, REAL *restrict m, REAL *restrict v,
                                   const REAL *restrict g, int64_t n, const LFN(adam_coefs) * c) {
    const REAL w1 = c->w1, b2 = c->b2, w2 = c->w2, eps = c->eps, wd = c->wd, decay = c->decay;
    const REAL step_size = c->step_size, bc2_sqrt = c->bc2_sqrt;
    const unsigned fp_mode = fbp_fp_flush_enter(); /* see optim.c's file comment */
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
