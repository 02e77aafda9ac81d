# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Thin bindings of the C kernels (csrc/fastbp.h). Every call releases the GIL.

These functions trust their callers for shapes and dtypes: fastbp.ops validates first and is the
public surface. What they still guarantee is that a non-OK status from C becomes an exception.
"""

from libc.stdint cimport int64_t
from cython cimport floating

cdef extern from "fastbp.h" nogil:
    ctypedef enum fbp_status:
        FBP_OK
        FBP_ERR_INVALID
        FBP_ERR_NOMEM
        FBP_ERR_UNSUPPORTED
    ctypedef enum fbp_activation:
        pass
    ctypedef enum fbp_isa:
        FBP_ISA_GENERIC
        FBP_ISA_AVX2
        FBP_ISA_AVX512
        FBP_ISA_COUNT

    fbp_status fbp_select_isa(const char *forced)
    fbp_isa fbp_active_isa()
    const char *fbp_isa_name(fbp_isa isa)
    int fbp_isa_available(fbp_isa isa)
    void fbp_set_num_threads(int n)
    int fbp_get_num_threads()
    const char *fbp_openmp_info()

    fbp_status fbp_gemm_f32(float *c, const float *a, const float *b, const float *bias, int64_t m, int64_t n, int64_t k, int64_t rs_a, int64_t cs_a, int64_t rs_b, int64_t cs_b, int64_t ldc, float alpha, float beta, fbp_activation act)
    fbp_status fbp_gemm_f64(double *c, const double *a, const double *b, const double *bias, int64_t m, int64_t n, int64_t k, int64_t rs_a, int64_t cs_a, int64_t rs_b, int64_t cs_b, int64_t ldc, double alpha, double beta, fbp_activation act)
    fbp_status fbp_activation_forward_f32(float *y, const float *x, int64_t n, fbp_activation act)
    fbp_status fbp_activation_forward_f64(double *y, const double *x, int64_t n, fbp_activation act)
    fbp_status fbp_activation_backward_f32(float *dz, float *dbias, const float *dy, const float *y, int64_t rows, int64_t cols, fbp_activation act)
    fbp_status fbp_activation_backward_f64(double *dz, double *dbias, const double *dy, const double *y, int64_t rows, int64_t cols, fbp_activation act)
    fbp_status fbp_softmax_xent_f32(double *loss, float *dlogits, const float *logits, const int64_t *labels, int64_t rows, int64_t classes, double scale)
    fbp_status fbp_softmax_xent_f64(double *loss, double *dlogits, const double *logits, const int64_t *labels, int64_t rows, int64_t classes, double scale)
    fbp_status fbp_mse_f32(double *loss, float *dpred, const float *pred, const float *target, int64_t n, double scale)
    fbp_status fbp_mse_f64(double *loss, double *dpred, const double *pred, const double *target, int64_t n, double scale)
    fbp_status fbp_sgd_step_f32(float *param, float *momentum_buf, const float *grad, int64_t n, double lr, double momentum, double dampening, double weight_decay, int nesterov, int first_step)
    fbp_status fbp_sgd_step_f64(double *param, double *momentum_buf, const double *grad, int64_t n, double lr, double momentum, double dampening, double weight_decay, int nesterov, int first_step)
    fbp_status fbp_adam_step_f32(float *param, float *exp_avg, float *exp_avg_sq, const float *grad, int64_t n, double lr, double beta1, double beta2, double eps, double weight_decay, int decoupled, int64_t step)
    fbp_status fbp_adam_step_f64(double *param, double *exp_avg, double *exp_avg_sq, const double *grad, int64_t n, double lr, double beta1, double beta2, double eps, double weight_decay, int decoupled, int64_t step)

cdef extern from *:
    """
    const char *fbp_version(void);
    """
    const char *fbp_version()


ISA_NAMES = tuple(fbp_isa_name(<fbp_isa>i).decode() for i in range(FBP_ISA_COUNT))


cdef int check(fbp_status status, str what) except -1:
    if status == FBP_OK:
        return 0
    if status == FBP_ERR_NOMEM:
        raise MemoryError(f"{what}: out of memory for the kernel's scratch buffers")
    raise ValueError(f"{what}: the C kernel rejected its arguments (status {<int>status})")


def select_isa(name=None):
    """Select the kernels for `name` ('generic', 'avx2', 'avx512'), or the best one if None."""
    cdef bytes raw = (name or "").encode()
    cdef fbp_status status = fbp_select_isa(raw)
    if status == FBP_ERR_INVALID:
        raise ValueError(f"unknown ISA {name!r}: expected one of {', '.join(ISA_NAMES)}")
    if status == FBP_ERR_UNSUPPORTED:
        raise RuntimeError(
            f"ISA {name!r} is not available: this CPU or build supports only "
            f"{', '.join(available_isas())}"
        )
    return active_isa()


def active_isa():
    return fbp_isa_name(fbp_active_isa()).decode()


def available_isas():
    return [ISA_NAMES[i] for i in range(FBP_ISA_COUNT) if fbp_isa_available(<fbp_isa>i)]


def set_num_threads(int n):
    fbp_set_num_threads(n)


def get_num_threads():
    return fbp_get_num_threads()


def openmp_info():
    return fbp_openmp_info().decode()


def version():
    return fbp_version().decode()


# Pointers are taken with the GIL held; an empty view has no element 0 and maps to NULL,
# which C accepts exactly where the size is zero.
cdef inline bint nonempty2(Py_ssize_t r, Py_ssize_t c) noexcept:
    return r > 0 and c > 0


def gemm(floating[:, :] c, const floating[:, :] a, const floating[:, :] b,
         const floating[::1] bias, bint trans_a, bint trans_b, double alpha, double beta,
         int activation):
    """c = act(alpha * op(a) @ op(b) + beta * c + bias); c must have unit column stride."""
    cdef Py_ssize_t item = sizeof(floating)
    cdef int64_t rs_a = a.strides[0] // item, cs_a = a.strides[1] // item
    cdef int64_t rs_b = b.strides[0] // item, cs_b = b.strides[1] // item
    cdef int64_t m = c.shape[0], n = c.shape[1]
    cdef int64_t k = a.shape[0] if trans_a else a.shape[1]
    cdef int64_t ldc = c.strides[0] // item if m > 1 else n
    if trans_a:
        rs_a, cs_a = cs_a, rs_a
    if trans_b:
        rs_b, cs_b = cs_b, rs_b
    cdef floating *c_p = &c[0, 0] if nonempty2(c.shape[0], c.shape[1]) else NULL
    cdef const floating *a_p = &a[0, 0] if nonempty2(a.shape[0], a.shape[1]) else NULL
    cdef const floating *b_p = &b[0, 0] if nonempty2(b.shape[0], b.shape[1]) else NULL
    cdef const floating *bias_p = NULL
    if bias is not None and bias.shape[0] > 0:
        bias_p = &bias[0]
    cdef fbp_status status
    with nogil:
        if floating is float:
            status = fbp_gemm_f32(c_p, a_p, b_p, bias_p, m, n, k, rs_a, cs_a, rs_b, cs_b, ldc,
                                  <float>alpha, <float>beta, <fbp_activation>activation)
        else:
            status = fbp_gemm_f64(c_p, a_p, b_p, bias_p, m, n, k, rs_a, cs_a, rs_b, cs_b, ldc,
                                  alpha, beta, <fbp_activation>activation)
    check(status, "gemm")


def activation_forward(floating[::1] y, const floating[::1] x, int activation):
    cdef Py_ssize_t n = x.shape[0]
    cdef floating *y_p = &y[0] if n > 0 else NULL
    cdef const floating *x_p = &x[0] if n > 0 else NULL
    cdef fbp_status status
    with nogil:
        if floating is float:
            status = fbp_activation_forward_f32(y_p, x_p, n, <fbp_activation>activation)
        else:
            status = fbp_activation_forward_f64(y_p, x_p, n, <fbp_activation>activation)
    check(status, "activation_forward")


def activation_backward(floating[:, ::1] dz, floating[::1] dbias, const floating[:, ::1] dy,
                        const floating[:, ::1] y, int activation):
    cdef Py_ssize_t rows = dy.shape[0], cols = dy.shape[1]
    cdef bint any_ = nonempty2(rows, cols)
    cdef floating *dz_p = &dz[0, 0] if any_ else NULL
    cdef const floating *dy_p = &dy[0, 0] if any_ else NULL
    cdef const floating *y_p = NULL
    cdef floating *dbias_p = NULL
    if y is not None and any_:
        y_p = &y[0, 0]
    if dbias is not None and cols > 0:
        dbias_p = &dbias[0]
    cdef fbp_status status
    with nogil:
        if floating is float:
            status = fbp_activation_backward_f32(dz_p, dbias_p, dy_p, y_p, rows, cols,
                                                 <fbp_activation>activation)
        else:
            status = fbp_activation_backward_f64(dz_p, dbias_p, dy_p, y_p, rows, cols,
                                                 <fbp_activation>activation)
    check(status, "activation_backward")


def softmax_xent(floating[:, ::1] dlogits, const floating[:, ::1] logits,
                 const int64_t[::1] labels, double scale):
    cdef Py_ssize_t rows = logits.shape[0], classes = logits.shape[1]
    cdef bint any_ = nonempty2(rows, classes)
    cdef floating *dlogits_p = &dlogits[0, 0] if any_ else NULL
    cdef const floating *logits_p = &logits[0, 0] if any_ else NULL
    cdef const int64_t *labels_p = &labels[0] if rows > 0 else NULL
    cdef double loss = 0
    cdef fbp_status status
    with nogil:
        if floating is float:
            status = fbp_softmax_xent_f32(&loss, dlogits_p, logits_p, labels_p, rows, classes, scale)
        else:
            status = fbp_softmax_xent_f64(&loss, dlogits_p, logits_p, labels_p, rows, classes, scale)
    check(status, "softmax_cross_entropy")
    return loss


def mse(floating[::1] dpred, const floating[::1] pred, const floating[::1] target, double scale):
    cdef Py_ssize_t n = pred.shape[0]
    cdef floating *dpred_p = &dpred[0] if dpred is not None and n > 0 else NULL
    cdef const floating *pred_p = &pred[0] if n > 0 else NULL
    cdef const floating *target_p = &target[0] if n > 0 else NULL
    cdef double loss = 0
    cdef fbp_status status
    with nogil:
        if floating is float:
            status = fbp_mse_f32(&loss, dpred_p, pred_p, target_p, n, scale)
        else:
            status = fbp_mse_f64(&loss, dpred_p, pred_p, target_p, n, scale)
    check(status, "mse")
    return loss


def sgd_step(floating[::1] param, floating[::1] momentum_buf, const floating[::1] grad,
             double lr, double momentum, double dampening, double weight_decay, bint nesterov,
             bint first_step):
    cdef Py_ssize_t n = param.shape[0]
    cdef floating *param_p = &param[0] if n > 0 else NULL
    cdef floating *buf_p = &momentum_buf[0] if momentum_buf is not None and n > 0 else NULL
    cdef const floating *grad_p = &grad[0] if n > 0 else NULL
    cdef fbp_status status
    with nogil:
        if floating is float:
            status = fbp_sgd_step_f32(param_p, buf_p, grad_p, n, lr, momentum, dampening,
                                      weight_decay, nesterov, first_step)
        else:
            status = fbp_sgd_step_f64(param_p, buf_p, grad_p, n, lr, momentum, dampening,
                                      weight_decay, nesterov, first_step)
    check(status, "sgd_step")


def adam_step(floating[::1] param, floating[::1] exp_avg, floating[::1] exp_avg_sq,
              const floating[::1] grad, double lr, double beta1, double beta2, double eps,
              double weight_decay, bint decoupled, int64_t step):
    cdef Py_ssize_t n = param.shape[0]
    cdef floating *param_p = &param[0] if n > 0 else NULL
    cdef floating *m_p = &exp_avg[0] if n > 0 else NULL
    cdef floating *v_p = &exp_avg_sq[0] if n > 0 else NULL
    cdef const floating *grad_p = &grad[0] if n > 0 else NULL
    cdef fbp_status status
    with nogil:
        if floating is float:
            status = fbp_adam_step_f32(param_p, m_p, v_p, grad_p, n, lr, beta1, beta2, eps,
                                       weight_decay, decoupled, step)
        else:
            status = fbp_adam_step_f64(param_p, m_p, v_p, grad_p, n, lr, beta1, beta2, eps,
                                       weight_decay, decoupled, step)
    check(status, "adam_step")
