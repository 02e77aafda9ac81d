/* Shared by the kernel families, which are compiled once per ISA (FBP_ISA_SUFFIX) and, inside
 * each compile, once per dtype: a family file includes itself a second time with REAL = double
 * (see FBP_TEMPLATE_BEGIN below), so float and double come from one source. */
#ifndef FASTBP_KERNEL_H
#define FASTBP_KERNEL_H

#include "fastbp.h"
#include "internal.h"
#include "simd.h"

#ifndef FBP_ISA_SUFFIX
#error "kernel sources are compiled once per ISA with FBP_ISA_SUFFIX set"
#endif

/* This ISA object's kernels: fbp_gemm_f32_avx2, ..., and the fused small-network step. */
#define FBP_DECLARE_ISA_KERNELS_(T, S)                                                             \
    FBP_DECLARE_KERNELS(T, S)                                                                      \
    fbp_status fbp_gemm_dact_##S(T *dz, T *dbias, const T *a, const T *b, const T *y, int64_t m,   \
                                 int64_t n, int64_t k, int64_t rs_a, int64_t cs_a, int64_t rs_b,   \
                                 int64_t cs_b, fbp_activation act, int accumulate);                \
    fbp_status fbp_gemm_sgd_##S(T *c, const T *a, const T *b, int64_t m, int64_t n, int64_t k,     \
                                int64_t rs_a, int64_t cs_a, int64_t rs_b, int64_t cs_b, T *param,  \
                                double lr, double weight_decay, int keep_grad);                    \
    fbp_status fbp_gemm_check_a_##S(T *c, const T *a, const T *b, const T *bias, int64_t m,        \
                                    int64_t n, int64_t k, int64_t rs_a, int64_t cs_a,              \
                                    int64_t rs_b, int64_t cs_b, int64_t ldc, T alpha, T beta,      \
                                    fbp_activation act, int *a_finite);                            \
    int fbp_copy_finite_##S(T *restrict dst, const T *restrict src, int64_t n);                    \
    fbp_status fbp_gemm_rows_##S(T *c, const T *a, const int64_t *a_rows, const T *b,              \
                                 const int64_t *b_rows, const T *bias, int64_t m, int64_t n,       \
                                 int64_t k, int64_t rs_a, int64_t cs_a, int64_t rs_b,              \
                                 int64_t cs_b, int64_t ldc, fbp_activation act, T *param,          \
                                 double lr, double weight_decay, int keep_grad, int *a_finite);    \
    fbp_status fbp_small_step_##S(const fbp_small_net *net, double *loss, int64_t rows,            \
                                  fbp_loss kind, fbp_optimizer *opt);                              \
    fbp_status fbp_fma_probe_##S(double *flops, int64_t iters, int threads);
#define FBP_DECLARE_ISA_KERNELS(T, S) FBP_DECLARE_ISA_KERNELS_(T, S)
FBP_DECLARE_ISA_KERNELS(float, FBP_CAT3(f32, _, FBP_ISA_SUFFIX))
FBP_DECLARE_ISA_KERNELS(double, FBP_CAT3(f64, _, FBP_ISA_SUFFIX))

#endif /* FASTBP_KERNEL_H */

/* (Re)defines the dtype macros; included with FBP_DTYPE_F32 or FBP_DTYPE_F64 defined. */
#undef REAL
#undef SFX
#undef VEC
#undef IVEC
#undef VL
#undef V_
#undef VLN
#if defined(FBP_DTYPE_F64)
/* lanes as a literal token, for token pasting */
#if FBP_VBYTES == 64
#define VLN 8
#elif FBP_VBYTES == 32
#define VLN 4
#else
#define VLN 2
#endif
#define REAL double
#define SFX f64
#define VEC vf64
#define IVEC vi64
#else
#if FBP_VBYTES == 64
#define VLN 16
#elif FBP_VBYTES == 32
#define VLN 8
#else
#define VLN 4
#endif
#define REAL float
#define SFX f32
#define VEC vf32
#define IVEC vi32
#endif
#define VL ((int64_t)(FBP_VBYTES / sizeof(REAL)))
/* V_(vexp_nonpos) -> vexp_nonpos_f32: the simd.h helper for this dtype. */
#define V_(name) FBP_CAT3(name, _, SFX)
/* KFN(gemm) -> fbp_gemm_f32_avx2: this object's exported kernel. */
#define KFN(name) FBP_CAT(FBP_CAT3(fbp_, name, _), FBP_CAT3(SFX, _, FBP_ISA_SUFFIX))
/* LFN(helper) -> helper_f32: file-local helpers, one per dtype. */
#define LFN(name) FBP_CAT3(name, _, SFX)
