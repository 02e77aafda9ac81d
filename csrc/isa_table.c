/* This ISA object's kernel tables, which dispatch.c selects from at run time. */
#include "kernel.h"

#if defined(FBP_BUILD_AVX512)
/* The fused small-network step runs AVX2's kernel here: a tiny network's step is a chain of
 * latencies, and 256-bit divisions, square roots and gathers have shorter ones than 512-bit
 * ones. Measured on Sapphire Rapids, ns per step, AVX-512 -> AVX2 kernel: 1-2-5-1 146 -> 120,
 * 4-8-8-3 252 -> 194, 4-16-16-3 448 -> 412, 8-32-5 at batch 4 957 -> 899. The arithmetic is the
 * same on both (tests/test_small_step.py compares it with this object's general walk). */
FBP_DECLARE_ISA_KERNELS(float, f32_avx2)
FBP_DECLARE_ISA_KERNELS(double, f64_avx2)
#define FBP_SMALL_STEP(T, S) fbp_small_step_##T##_avx2
#else
#define FBP_SMALL_STEP(T, S) FBP_CAT(fbp_small_step_, S)
#endif

#define FBP_TABLE(T, S)                                                                            \
    {                                                                                              \
        .gemm = FBP_CAT(fbp_gemm_, S),                                                             \
        .activation_forward = FBP_CAT(fbp_activation_forward_, S),                                 \
        .activation_backward = FBP_CAT(fbp_activation_backward_, S),                               \
        .softmax_xent = FBP_CAT(fbp_softmax_xent_, S),                                             \
        .mse = FBP_CAT(fbp_mse_, S),                                                               \
        .sgd_step = FBP_CAT(fbp_sgd_step_, S),                                                     \
        .adam_step = FBP_CAT(fbp_adam_step_, S),                                                   \
        .small_step = FBP_SMALL_STEP(T, S),                                                        \
        .gemm_dact = FBP_CAT(fbp_gemm_dact_, S),                                                   \
        .gemm_sgd = FBP_CAT(fbp_gemm_sgd_, S),                                                     \
        .gemm_check_a = FBP_CAT(fbp_gemm_check_a_, S),                                             \
        .copy_finite = FBP_CAT(fbp_copy_finite_, S),                                               \
        .gemm_rows = FBP_CAT(fbp_gemm_rows_, S),                                                   \
        .fma_probe = FBP_CAT(fbp_fma_probe_, S),                                                   \
    }

const fbp_table_f32 FBP_CAT(fbp_table_f32_,
                            FBP_ISA_SUFFIX) = FBP_TABLE(f32, FBP_CAT3(f32, _, FBP_ISA_SUFFIX));
const fbp_table_f64 FBP_CAT(fbp_table_f64_,
                            FBP_ISA_SUFFIX) = FBP_TABLE(f64, FBP_CAT3(f64, _, FBP_ISA_SUFFIX));
