/* This ISA object's kernel tables, which dispatch.c selects from at run time. */
#include "kernel.h"

#define FBP_TABLE(S)                                                                               \
    {                                                                                              \
        .gemm = FBP_CAT(fbp_gemm_, S),                                                             \
        .activation_forward = FBP_CAT(fbp_activation_forward_, S),                                 \
        .activation_backward = FBP_CAT(fbp_activation_backward_, S),                               \
        .softmax_xent = FBP_CAT(fbp_softmax_xent_, S),                                             \
        .mse = FBP_CAT(fbp_mse_, S),                                                               \
        .sgd_step = FBP_CAT(fbp_sgd_step_, S),                                                     \
        .adam_step = FBP_CAT(fbp_adam_step_, S),                                                   \
        .small_step = FBP_CAT(fbp_small_step_, S),                                                 \
    }

const fbp_table_f32 FBP_CAT(fbp_table_f32_,
                            FBP_ISA_SUFFIX) = FBP_TABLE(FBP_CAT3(f32, _, FBP_ISA_SUFFIX));
const fbp_table_f64 FBP_CAT(fbp_table_f64_,
                            FBP_ISA_SUFFIX) = FBP_TABLE(FBP_CAT3(f64, _, FBP_ISA_SUFFIX));
