/* Per-dtype inline helpers shared by the kernel families: an activation's value (the GEMM
 * epilogue, the fused small-network step), its derivative taken from the activation's output
 * (activation_backward, the fused step), the squared error of a few outputs (loss.c, the
 * fused step) and the NaN/inf test of the data checks (fbp_gemm_check_a, fbp_copy_finite). One
 * definition, so every path applies the same arithmetic. No include guard: a family includes this
 * in each of its dtype passes, after kernel.h has set REAL, VEC and LFN for that pass. */
#include <math.h> /* fma: guarded, so including it in each pass is harmless */

FBP_INLINE VEC LFN(apply_act)(VEC x, fbp_activation act) {
    switch (act) {
    case FBP_ACT_SIGMOID:
        return V_(vsigmoid)(x);
    case FBP_ACT_RELU:
        return V_(vrelu)(x);
    case FBP_ACT_TANH:
        return V_(vtanh)(x);
    default:
        return x;
    }
}

/* dy * act'(x), from y = act(x): sigmoid y(1-y), tanh 1-y^2, relu y > 0. */
FBP_INLINE VEC LFN(act_grad)(VEC dy, VEC y, fbp_activation act) {
    switch (act) {
    case FBP_ACT_SIGMOID:
        return dy * (y * (1 - y));
    case FBP_ACT_TANH:
        return dy * (1 - y * y);
    case FBP_ACT_RELU:
        return V_(vselect)(y > 0, dy, V_(vbcast)(0));
    default:
        return dy;
    }
}

/* sum (pred - target)^2 over n elements in order, in double, and dpred = gscale * (pred -
 * target) when dpred is not NULL. The sum is an explicit fma: whether the compiler contracts
 * `total + d * d` differs between the per-ISA builds, and for float64 d that changes the last
 * bit (for float32 d the square is exact in double either way). */
FBP_INLINE double LFN(mse_sequential)(REAL *dpred, const REAL *pred, const REAL *target, int64_t n,
                                      REAL gscale) {
    double total = 0;
    for (int64_t i = 0; i < n; i++) {
        const REAL d = pred[i] - target[i];
        total = fma((double)d, (double)d, total);
        if (dpred) dpred[i] = gscale * d;
    }
    return total;
}

/* The data checks' running sum: x * 0 is 0 for a finite x and NaN for an infinite or NaN one, so
 * the sum stays 0 until a non-finite value is added. One FMA a vector: testing the exponent bits
 * (a compare to a mask, the mask back to a vector) cost W3's first-layer forward 7 us a step. */
FBP_INLINE VEC LFN(finite_acc)(VEC sum, VEC x) { return sum + x * V_(vbcast)(0); }

/* 1 when every lane of a finite_acc sum is still 0: no value added to it was NaN or infinite. */
FBP_INLINE int LFN(acc_finite)(VEC sum) {
    for (int64_t l = 0; l < VL; l++)
        if (sum[l] != 0) return 0;
    return 1;
}
