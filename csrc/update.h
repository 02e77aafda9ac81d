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
    REAL w1, b2, w2, eps, wd, decay, step_size, bc2_sqrt, inv_bc2_sqrt;
} LFN(adam_coefs);

static inline LFN(adam_coefs)
    LFN(adam_coefficients)(double lr, double beta1, double beta2, double eps, double weight_decay,
                           int decoupled, int64_t step) {
    const double bc1 = LFN(bias_correction)(beta1, step);
    const double bc2 = LFN(bias_correction)(beta2, step);
    LFN(adam_coefs) c;
    c.step_size = (REAL)(lr / bc1);
    c.bc2_sqrt = (REAL)sqrt(bc2);
    c.inv_bc2_sqrt = 1 / c.bc2_sqrt; /* rounded once, in REAL: see quotient_by_constant */
    c.decay = decoupled ? (REAL)(1 - lr * weight_decay) : 1; /* AdamW's decoupled decay */
    c.wd = decoupled ? 0 : (REAL)weight_decay;               /* Adam's L2 term */
    /* 1 - beta in double, rounded once: in float, 1 - fl(0.999) loses ~7 bits to cancellation */
    c.w1 = (REAL)(1.0 - beta1);
    c.b2 = (REAL)beta2;
    c.w2 = (REAL)(1.0 - beta2);
    c.eps = (REAL)eps;
    return c;
}

/* Where the ISA has an FMA: a * b + c rounded once (fma), else twice. The updates below spell
 * out their FMAs: left to -ffp-contract, which products fuse is the compiler's choice and depends
 * on the code around them, and the small-network step (small.c) inlines this code into other
 * code than optim.c's, where both must give the same bits. Without a hardware FMA (the generic
 * build) fma would be a library call. */
#if (defined(FBP_DTYPE_F64) && defined(FP_FAST_FMA)) ||                                            \
    (!defined(FBP_DTYPE_F64) && defined(FP_FAST_FMAF))
static inline REAL LFN(madd)(REAL a, REAL b, REAL c) { return fma(a, b, c); }

/* s / c rounded to nearest, for s = sqrt(v) (>= 0, +inf or NaN) and 0 < c <= 1, from
 * inv = 1 / c rounded to nearest: q = s inv is within an ulp of s / c, the FMA gives its residual
 * s - c q exactly, and one correction step q + r inv is then the correctly rounded quotient
 * (Markstein's theorem; nothing underflows: s is 0 or at least the square root of the smallest
 * subnormal). Zero, infinity and NaN pass through as the division leaves them. Adam's update is
 * bound by the divider when its arrays are in cache (a square root and two divisions per
 * element); this takes one division's place with FMA-unit work. C harness, AVX-512 float32,
 * 117,573 elements (W3's half at two threads, in L2): 72 -> 51 us; 235,146 (from L3): 143 ->
 * 135 us. Checked against the division for every float s in [1, 2) (the quotient's bits depend
 * only on the significands) with each of the 11,258 float32 bias corrections of beta2 = 0.999
 * and 0.99 and with 10,000 random c, and float64 on 2^22 random s for each of 4,000 c: no
 * difference (tests/test_optim_kernels.py checks every ISA against NumPy's division). */
static inline REAL LFN(quotient_by_constant)(REAL s, REAL c, REAL inv) {
    const REAL q = s * inv;
    const REAL r = fma(-c, q, s);
    return s > 0 && s < INFINITY ? fma(r, inv, q) : s;
}
#else
static inline REAL LFN(madd)(REAL a, REAL b, REAL c) { return a * b + c; }

static inline REAL LFN(quotient_by_constant)(REAL s, REAL c, REAL inv) {
    (void)inv;
    return s / c;
}
#endif

/* Adam on elements [0, n). divide: sqrt(v) / bc2_sqrt as a division, the same bits as
 * quotient_by_constant's but a shorter latency, for a tiny network's update (W2's 25 parameters,
 * a chain of dependent latencies: 3% slower per step with the FMA form). */
FBP_INLINE void LFN(adam_elements)(REAL *restrict p, REAL *restrict m, REAL *restrict v,
                                   const REAL *restrict g, int64_t n, const LFN(adam_coefs) * c,
                                   const int divide) {
    const REAL w1 = c->w1, b2 = c->b2, w2 = c->w2, eps = c->eps, wd = c->wd, decay = c->decay;
    const REAL step_size = c->step_size, bc2_sqrt = c->bc2_sqrt, inv_bc2_sqrt = c->inv_bc2_sqrt;
#pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        REAL pi = p[i] * decay; /* AdamW's decoupled decay; decay == 1 for Adam */
        REAL gi = wd != 0 ? LFN(madd)(wd, pi, g[i]) : g[i]; /* Adam's L2 term; 0 for AdamW */
        REAL mi = LFN(madd)(w1, gi - m[i], m[i]); /* torch: exp_avg.lerp_(grad, 1 - beta1) */
        REAL vi = LFN(madd)(v[i], b2, w2 * gi * gi);
        REAL s = sqrt(vi);
        REAL denom =
            (divide ? s / bc2_sqrt : LFN(quotient_by_constant)(s, bc2_sqrt, inv_bc2_sqrt)) + eps;
        m[i] = mi;
        v[i] = vi;
        p[i] = LFN(madd)(-step_size, mi / denom, pi);
    }
}

/* Below this many elements the update divides (see adam_elements). */
#define FBP_ADAM_DIVIDE_BELOW 256

static inline void LFN(adam_range)(REAL *restrict p, REAL *restrict m, REAL *restrict v,
                                   const REAL *restrict g, int64_t n, const LFN(adam_coefs) * c) {
    const unsigned fp_mode = fbp_fp_flush_enter(); /* see optim.c's file comment */
    if (n < FBP_ADAM_DIVIDE_BELOW)
        LFN(adam_elements)(p, m, v, g, n, c, 1);
    else
        LFN(adam_elements)(p, m, v, g, n, c, 0);
    fbp_fp_restore(fp_mode);
}
