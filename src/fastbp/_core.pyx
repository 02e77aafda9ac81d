# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Thin bindings of the C kernels (csrc/fastbp.h). Every call releases the GIL.

These functions trust their callers for shapes and dtypes: fastbp.ops validates first and is the
public surface. What they still guarantee is that a non-OK status from C becomes an exception.
"""

from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from cpython.buffer cimport (
    PyBUF_ANY_CONTIGUOUS,
    PyBUF_C_CONTIGUOUS,
    PyBUF_FORMAT,
    PyBUF_RECORDS,
    PyBUF_RECORDS_RO,
    PyBUF_WRITABLE,
    PyBuffer_Release,
    PyObject_GetBuffer,
)
from libc.math cimport isfinite
from cython cimport floating
from operator import index as operator_index

cdef extern from "fastbp.h" nogil:
    ctypedef enum fbp_status:
        FBP_OK
        FBP_ERR_INVALID
        FBP_ERR_NOMEM
        FBP_ERR_UNSUPPORTED
        FBP_ERR_NONFINITE
        FBP_ERR_STATE
        FBP_ERR_INTERRUPTED
        FBP_ERR_NONFINITE_INPUT
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
    void fbp_set_flush_denormal(int on)
    int fbp_get_flush_denormal()
    const char *fbp_openmp_info()
    void fbp_set_small_step(int on)
    void fbp_set_dact_fusion(int on)
    void fbp_set_indexed_batches(int on)
    void fbp_set_update_fusion(int on)
    void fbp_set_transposed_a_paths(int on)

    fbp_status fbp_gemm_f32(float *c, const float *a, const float *b, const float *bias, int64_t m, int64_t n, int64_t k, int64_t rs_a, int64_t cs_a, int64_t rs_b, int64_t cs_b, int64_t ldc, float alpha, float beta, fbp_activation act)
    fbp_status fbp_gemm_f64(double *c, const double *a, const double *b, const double *bias, int64_t m, int64_t n, int64_t k, int64_t rs_a, int64_t cs_a, int64_t rs_b, int64_t cs_b, int64_t ldc, double alpha, double beta, fbp_activation act)
    fbp_status fbp_activation_forward_f32(float *y, const float *x, int64_t n, fbp_activation act)
    fbp_status fbp_activation_forward_f64(double *y, const double *x, int64_t n, fbp_activation act)
    fbp_status fbp_activation_backward_f32(float *dz, float *dbias, const float *dy, const float *y, int64_t rows, int64_t cols, fbp_activation act, int accumulate)
    fbp_status fbp_activation_backward_f64(double *dz, double *dbias, const double *dy, const double *y, int64_t rows, int64_t cols, fbp_activation act, int accumulate)
    fbp_status fbp_softmax_xent_f32(double *loss, float *dlogits, const float *logits, const int64_t *labels, int64_t rows, int64_t classes, double scale)
    fbp_status fbp_softmax_xent_f64(double *loss, double *dlogits, const double *logits, const int64_t *labels, int64_t rows, int64_t classes, double scale)
    fbp_status fbp_mse_f32(double *loss, float *dpred, const float *pred, const float *target, int64_t n, double scale)
    fbp_status fbp_mse_f64(double *loss, double *dpred, const double *pred, const double *target, int64_t n, double scale)
    fbp_status fbp_sgd_step_f32(float *param, float *momentum_buf, const float *grad, int64_t n, double lr, double momentum, double dampening, double weight_decay, int nesterov, int first_step)
    fbp_status fbp_sgd_step_f64(double *param, double *momentum_buf, const double *grad, int64_t n, double lr, double momentum, double dampening, double weight_decay, int nesterov, int first_step)
    fbp_status fbp_adam_step_f32(float *param, float *exp_avg, float *exp_avg_sq, const float *grad, int64_t n, double lr, double beta1, double beta2, double eps, double weight_decay, int decoupled, int64_t step)
    fbp_status fbp_adam_step_f64(double *param, double *exp_avg, double *exp_avg_sq, const double *grad, int64_t n, double lr, double beta1, double beta2, double eps, double weight_decay, int decoupled, int64_t step)

    ctypedef enum fbp_dtype:
        FBP_F32
        FBP_F64
    ctypedef enum fbp_loss:
        pass
    ctypedef struct fbp_op:
        int32_t kind
        int32_t activation
        int64_t in_features
        int64_t out_features
        int64_t weight
        int64_t bias
        int64_t running
        double p
        double momentum
    ctypedef struct fbp_optimizer:
        int32_t kind
        int32_t nesterov
        double lr, momentum, dampening, weight_decay, beta1, beta2, eps
        int64_t step
        void *state1
        void *state2
    ctypedef struct fbp_plan:
        pass
    enum:
        FBP_PROFILE_COLUMNS
    ctypedef struct fbp_profile_totals:
        double loss, update, batches, fused_steps
        int64_t forwards, backwards, losses, updates, batch_count, fused_step_count
        int64_t indexed_batch_count
    void fbp_plan_set_profiling(fbp_plan *plan, int on)
    void fbp_plan_read_profile(const fbp_plan *plan, double *op_seconds, fbp_profile_totals *totals)
    fbp_status fbp_plan_create(fbp_plan **plan, fbp_dtype dtype, const fbp_op *ops, int32_t n_ops, int64_t n_params, int64_t n_buffers)
    void fbp_plan_destroy(fbp_plan *plan)
    void fbp_plan_bind(fbp_plan *plan, void *params, void *grads, void *buffers)
    void fbp_plan_set_seed(fbp_plan *plan, uint64_t seed)
    void fbp_plan_dropout_state(const fbp_plan *plan, uint64_t *seed, uint64_t *draws)
    void fbp_plan_set_dropout_state(fbp_plan *plan, uint64_t seed, uint64_t draws)
    int64_t fbp_plan_batchnorm_batches(const fbp_plan *plan, int32_t op)
    void fbp_plan_set_batchnorm_batches(fbp_plan *plan, int32_t op, int64_t n)
    int fbp_plan_small_step_applies(const fbp_plan *plan, int64_t batch)
    fbp_status fbp_plan_forward(fbp_plan *plan, void *out, const void *x, int64_t batch, int training)
    fbp_status fbp_plan_predict(fbp_plan *plan, void *out, const void *x, int64_t batch, int check_x)
    fbp_status fbp_plan_backward(fbp_plan *plan, void *dx, const void *dy, int64_t batch)
    fbp_status fbp_plan_loss(fbp_plan *plan, double *loss, void *dout, const void *target, int64_t batch, fbp_loss loss_kind)
    fbp_status fbp_plan_update(fbp_plan *plan, fbp_optimizer *opt)
    fbp_status fbp_plan_train_step(fbp_plan *plan, double *loss, const void *x, const void *target, int64_t batch, fbp_loss loss_kind, fbp_optimizer *opt)
    ctypedef int (*fbp_grads_ready_fn)(void *ctx, int32_t op) noexcept nogil
    fbp_status fbp_plan_compute_gradients(fbp_plan *plan, double *loss, const void *x, const void *target, int64_t batch, int64_t row_offset, fbp_loss loss_kind, double grad_scale, fbp_grads_ready_fn grads_ready, void *ctx)
    fbp_status fbp_plan_train_batches(fbp_plan *plan, double *loss_sum, int64_t *bad_batch, const void *X, const void *Y, int64_t n, const int64_t *order, int64_t batch_size, int64_t first, int64_t count, fbp_loss loss_kind, fbp_optimizer *opt, int check_x)
    fbp_status fbp_plan_train_epochs(fbp_plan *plan, double *loss_sums, double *seconds, int64_t *bad_epoch, int64_t *bad_batch, const void *X, const void *Y, int64_t n, int64_t *order, int64_t batch_size, int64_t epochs, const uint64_t *shuffle_seeds, fbp_loss loss_kind, fbp_optimizer *opt, int check_x)
    fbp_status fbp_plan_evaluate(fbp_plan *plan, double *loss_sum, int64_t *correct, const void *X, const void *Y, int64_t n, int64_t batch_size, fbp_loss loss_kind, int check_x)
    void fbp_shuffle(int64_t *order, int64_t n, uint64_t seed)
    int fbp_all_finite_f32(const float *x, int64_t n)
    int fbp_all_finite_f64(const double *x, int64_t n)

cdef extern from *:
    """
    const char *fbp_version(void);
    """
    const char *fbp_version()

cdef extern from "internal.h" nogil:
    fbp_status fbp_fma_probe_f32(double *flops, int64_t iters, int threads)
    fbp_status fbp_fma_probe_f64(double *flops, int64_t iters, int threads)


ISA_NAMES = tuple(fbp_isa_name(<fbp_isa>i).decode() for i in range(FBP_ISA_COUNT))


class NonFiniteLossError(FloatingPointError):
    """A training loss became NaN or infinite; the weights are those of the last good step."""


class NonFiniteInputError(ValueError):
    """A check of X as the C loop read it (``check_x``) found NaN or infinity: for fit, in the
    rows of batch ``batch`` of epoch ``epoch`` (counted within the call), which was not trained
    on while the earlier ones were; for predict and evaluate, -1. Internal: the model undoes
    what needs undoing and raises a plain ValueError."""

    def __init__(self, epoch, batch):
        super().__init__("X contains NaN or infinity")
        self.epoch = epoch
        self.batch = batch


cdef int check(fbp_status status, str what) except -1:
    if status == FBP_OK:
        return 0
    if status == FBP_ERR_NOMEM:
        raise MemoryError(f"{what}: out of memory for the kernel's scratch buffers")
    if status == FBP_ERR_NONFINITE:
        raise NonFiniteLossError(f"{what}: the loss is not finite")
    if status == FBP_ERR_STATE:
        raise RuntimeError(f"{what}: call forward() in training mode with the same batch first")
    if status == FBP_ERR_NONFINITE_INPUT:
        raise ValueError("x contains NaN or infinity")
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


def set_flush_denormal(bint on):
    fbp_set_flush_denormal(on)


def get_flush_denormal():
    return bool(fbp_get_flush_denormal())


def _set_small_step(bint on):
    """Testing hook: False trains small networks through the general walk instead of the fused
    step (small.c); both give the same bits."""
    fbp_set_small_step(on)


def _set_dact_fusion(bint on):
    """Testing hook: False runs each Linear's activation backward as its own pass instead of in
    the input-gradient product of the Linear above (fbp_gemm_dact); both give the same bits."""
    fbp_set_dact_fusion(on)


def _set_indexed_batches(bint on):
    """Testing hook: False gathers every shuffled batch of fit into the workspace, instead of
    the first Linear's products reading its rows of X through the order; both give the same
    bits."""
    fbp_set_indexed_batches(on)


def _set_transposed_a_paths(bint on):
    """Testing hook: False packs every transposed A of the GEMM (a weight gradient's dZ.T),
    instead of reading short rows in place and computing a narrow C as its transpose; both give
    the same bits."""
    fbp_set_transposed_a_paths(on)


def _set_update_fusion(bint on):
    """Testing hook: False runs a plain-SGD training step's update as one pass over the flat
    buffer after the backward, instead of in each weight-gradient product (fbp_gemm_sgd); both
    give the same bits."""
    fbp_set_update_fusion(on)


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


cdef int _float_kind(const Py_buffer *view) noexcept:
    """1 for a native float32 buffer, 2 for float64, 0 otherwise."""
    cdef const char *fmt = view.format
    if fmt == NULL or fmt[0] == 0 or fmt[1] != 0:
        return 0
    if fmt[0] == b'f' and view.itemsize == 4:
        return 1
    if fmt[0] == b'd' and view.itemsize == 8:
        return 2
    return 0


cdef bint _extent(const Py_buffer *view, char **lo, char **hi) noexcept:
    """The bytes [lo, hi) a buffer's elements span; False when a stride is not whole elements."""
    cdef char *start = <char *>view.buf
    cdef char *end = start + view.itemsize
    cdef int d
    cdef Py_ssize_t step
    for d in range(view.ndim):
        if view.strides[d] % view.itemsize != 0:
            return False
        step = (view.shape[d] - 1) * view.strides[d]
        if step < 0:
            start += step
        else:
            end += step
    lo[0] = start
    hi[0] = end
    return True


cdef inline bint _disjoint(char *lo1, char *hi1, char *lo2, char *hi2) noexcept:
    return hi1 <= lo2 or hi2 <= lo1


def gemm_fast(object out, object a, object b, object bias, bint trans_a, bint trans_b,
              object alpha, object beta, int activation):
    """fastbp.ops.gemm's fast path: the product into out when every argument is already what
    ops.gemm would accept without converting anything (arrays of one float dtype with whole-element
    strides, matching non-empty shapes, a writeable out with contiguous rows that overlaps no
    input, finite Python-float scalars, an activation code); returns False, having written
    nothing, for anything else, which ops.gemm then checks (and explains) itself. Three buffer
    requests instead of fused-type memoryviews and numpy's overlap checks: a 10 x 128 x 128
    product 5.8 -> 2.3 us per call."""
    if type(alpha) is not float or type(beta) is not float or not 0 <= activation <= 3:
        return False
    cdef double alpha_d = alpha, beta_d = beta
    if not isfinite(alpha_d) or not isfinite(beta_d):
        return False
    cdef Py_buffer vo, va, vb, vbias
    cdef int have_o = 0, have_a = 0, have_b = 0, have_bias = 0
    cdef bint ok = False
    cdef int kind
    cdef Py_ssize_t item, m, n, k, k2
    cdef char *lo_o
    cdef char *hi_o
    cdef char *lo_x
    cdef char *hi_x
    cdef int64_t rs_a, cs_a, rs_b, cs_b, ldc
    cdef const void *bias_p = NULL
    cdef fbp_status status
    try:
        try:
            PyObject_GetBuffer(out, &vo, PyBUF_RECORDS)
            have_o = 1
            PyObject_GetBuffer(a, &va, PyBUF_RECORDS_RO)
            have_a = 1
            PyObject_GetBuffer(b, &vb, PyBUF_RECORDS_RO)
            have_b = 1
            if bias is not None:
                PyObject_GetBuffer(bias, &vbias, PyBUF_RECORDS_RO)
                have_bias = 1
        except (BufferError, TypeError, ValueError):
            return False
        kind = _float_kind(&vo)
        if (kind == 0 or _float_kind(&va) != kind or _float_kind(&vb) != kind
                or vo.ndim != 2 or va.ndim != 2 or vb.ndim != 2):
            return False
        item = vo.itemsize
        m = va.shape[1] if trans_a else va.shape[0]
        k = va.shape[0] if trans_a else va.shape[1]
        k2 = vb.shape[1] if trans_b else vb.shape[0]
        n = vb.shape[0] if trans_b else vb.shape[1]
        if k != k2 or m <= 0 or n <= 0 or k <= 0 or vo.shape[0] != m or vo.shape[1] != n:
            return False
        if (n > 1 and vo.strides[1] != item) or (
                m > 1 and (vo.strides[0] < n * item or vo.strides[0] % item != 0)):
            return False
        if not _extent(&vo, &lo_o, &hi_o):
            return False
        if not _extent(&va, &lo_x, &hi_x) or not _disjoint(lo_o, hi_o, lo_x, hi_x):
            return False
        if not _extent(&vb, &lo_x, &hi_x) or not _disjoint(lo_o, hi_o, lo_x, hi_x):
            return False
        if have_bias:
            if (_float_kind(&vbias) != kind or vbias.ndim != 1 or vbias.shape[0] != n
                    or (n > 1 and vbias.strides[0] != item)):
                return False
            if not _extent(&vbias, &lo_x, &hi_x) or not _disjoint(lo_o, hi_o, lo_x, hi_x):
                return False
            bias_p = vbias.buf
        rs_a = va.strides[0] // item
        cs_a = va.strides[1] // item
        rs_b = vb.strides[0] // item
        cs_b = vb.strides[1] // item
        if trans_a:
            rs_a, cs_a = cs_a, rs_a
        if trans_b:
            rs_b, cs_b = cs_b, rs_b
        ldc = vo.strides[0] // item if m > 1 else n
        with nogil:
            if kind == 1:
                status = fbp_gemm_f32(<float *>vo.buf, <const float *>va.buf,
                                      <const float *>vb.buf, <const float *>bias_p, m, n, k,
                                      rs_a, cs_a, rs_b, cs_b, ldc, <float>alpha_d, <float>beta_d,
                                      <fbp_activation>activation)
            else:
                status = fbp_gemm_f64(<double *>vo.buf, <const double *>va.buf,
                                      <const double *>vb.buf, <const double *>bias_p, m, n, k,
                                      rs_a, cs_a, rs_b, cs_b, ldc, alpha_d, beta_d,
                                      <fbp_activation>activation)
        check(status, "gemm")
        ok = True
    finally:
        if have_bias:
            PyBuffer_Release(&vbias)
        if have_b:
            PyBuffer_Release(&vb)
        if have_a:
            PyBuffer_Release(&va)
        if have_o:
            PyBuffer_Release(&vo)
    return ok


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
                                                 <fbp_activation>activation, 0)
        else:
            status = fbp_activation_backward_f64(dz_p, dbias_p, dy_p, y_p, rows, cols,
                                                 <fbp_activation>activation, 0)
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


# ---- the model plan (csrc/train.c) -------------------------------------------------------------

cdef void *data_ptr(object arr) except? NULL:
    """The address of a C-contiguous ndarray's first element (validated by the caller)."""
    cdef Py_buffer view
    PyObject_GetBuffer(arr, &view, PyBUF_ANY_CONTIGUOUS)
    cdef void *p = view.buf
    PyBuffer_Release(&view)
    return p


cdef void *data_ptr_or_null(object arr) except? NULL:
    if arr is None:
        return NULL
    return data_ptr(arr)


cdef class OptimizerState:
    """The C optimizer record for a flat parameter buffer; Python sets the fields each step."""
    cdef fbp_optimizer opt
    cdef object state1_arr, state2_arr

    def __init__(self, int kind, state1=None, state2=None):
        self.opt.kind = kind
        self.opt.step = 0
        self.state1_arr = state1
        self.state2_arr = state2
        self.opt.state1 = data_ptr_or_null(state1)
        self.opt.state2 = data_ptr_or_null(state2)

    def configure(self, double lr, double momentum, double dampening, double weight_decay,
                  bint nesterov, double beta1, double beta2, double eps):
        self.opt.lr = lr
        self.opt.momentum = momentum
        self.opt.dampening = dampening
        self.opt.weight_decay = weight_decay
        self.opt.nesterov = nesterov
        self.opt.beta1 = beta1
        self.opt.beta2 = beta2
        self.opt.eps = eps

    @property
    def step(self):
        return self.opt.step

    @step.setter
    def step(self, int64_t value):
        self.opt.step = value

    @property
    def arrays(self):
        """The state buffers (each None when the optimizer keeps none), for a caller that
        saves and restores the state."""
        return self.state1_arr, self.state2_arr


cdef int _grads_ready(void *ctx, int32_t op) noexcept nogil:
    """compute_gradients' hook: calls hook[0](op); an exception is kept in hook[1] and stops
    the backward (C sees nonzero)."""
    with gil:
        hook = <list>ctx
        try:
            hook[0](op)
        except BaseException as exc:
            hook[1] = exc
            return 1
    return 0


cdef class Plan:
    """A model's op list in C, bound to its flat parameter, gradient and buffer arrays.

    Not thread-safe: the owning model serialises calls.
    """
    cdef fbp_plan *plan
    cdef object params, grads, buffers
    cdef readonly int itemsize
    cdef readonly int32_t n_ops

    def __cinit__(self):
        self.plan = NULL

    def __init__(self, list ops, bint float64, params, grads, buffers):
        cdef int32_t n = len(ops)
        cdef fbp_op *c_ops = <fbp_op *>malloc(n * sizeof(fbp_op))
        if c_ops == NULL:
            raise MemoryError()
        cdef fbp_status status
        try:
            for i, (kind, act, fin, fout, w, b, running, p, momentum) in enumerate(ops):
                c_ops[i].kind = kind
                c_ops[i].activation = act
                c_ops[i].in_features = fin
                c_ops[i].out_features = fout
                c_ops[i].weight = w
                c_ops[i].bias = b
                c_ops[i].running = running
                c_ops[i].p = p
                c_ops[i].momentum = momentum
            status = fbp_plan_create(&self.plan, FBP_F64 if float64 else FBP_F32, c_ops, n,
                                     params.size, buffers.size)
        finally:
            free(c_ops)
        if status == FBP_ERR_INVALID:
            raise ValueError("fastbp: inconsistent model plan (layer sizes or buffer offsets)")
        check(status, "Plan")
        self.itemsize = 8 if float64 else 4
        self.n_ops = n
        self.params, self.grads, self.buffers = params, grads, buffers
        fbp_plan_bind(self.plan, data_ptr(params), data_ptr(grads),
                      data_ptr(buffers) if buffers.size else NULL)

    def __dealloc__(self):
        fbp_plan_destroy(self.plan)

    def set_seed(self, uint64_t seed):
        fbp_plan_set_seed(self.plan, seed)

    def dropout_state(self):
        """(seed, masks drawn): dropout's stream, for a caller that undoes training."""
        cdef uint64_t seed, draws
        fbp_plan_dropout_state(self.plan, &seed, &draws)
        return seed, draws

    def set_dropout_state(self, uint64_t seed, uint64_t draws):
        fbp_plan_set_dropout_state(self.plan, seed, draws)

    def batchnorm_batches(self, int32_t op):
        return fbp_plan_batchnorm_batches(self.plan, op)

    def set_batchnorm_batches(self, int32_t op, int64_t n):
        fbp_plan_set_batchnorm_batches(self.plan, op, n)

    def set_profiling(self, bint on):
        """Start (zeroing the counters) or stop the plan's per-op clock."""
        fbp_plan_set_profiling(self.plan, on)

    def read_profile(self, double[:, ::1] seconds not None):
        """Fills ``seconds`` (n_ops x 3: forward, input-gradient and weight-gradient seconds per
        op) and returns the other times and the call counts."""
        if seconds.shape[0] != self.n_ops or seconds.shape[1] != FBP_PROFILE_COLUMNS:
            raise ValueError(f"seconds must have shape ({self.n_ops}, {FBP_PROFILE_COLUMNS})")
        cdef fbp_profile_totals totals
        fbp_plan_read_profile(self.plan, &seconds[0, 0], &totals)
        return {
            "loss": totals.loss,
            "update": totals.update,
            "batches": totals.batches,
            "fused_steps": totals.fused_steps,
            "forwards": totals.forwards,
            "backwards": totals.backwards,
            "losses": totals.losses,
            "updates": totals.updates,
            "batch_count": totals.batch_count,
            "fused_step_count": totals.fused_step_count,
            "indexed_batch_count": totals.indexed_batch_count,
        }

    def small_step_applies(self, int64_t batch):
        """Whether a training step on ``batch`` rows runs the fused small-network kernel."""
        return bool(fbp_plan_small_step_applies(self.plan, batch))

    def forward(self, x, out, bint training):
        cdef const void *xp = data_ptr(x)
        cdef void *op_ = data_ptr_or_null(out)
        cdef int64_t rows = x.shape[0]
        cdef fbp_status status
        with nogil:
            status = fbp_plan_forward(self.plan, op_, xp, rows, training)
        check(status, "forward")

    def predict(self, x, out, bint check_x=False):
        """Eval-mode outputs of x into out, x read in place; check_x: x is checked for NaN/inf
        as the forward reads it, raising NonFiniteInputError."""
        cdef const void *xp = data_ptr(x)
        cdef void *op_ = data_ptr(out)
        cdef int64_t rows = x.shape[0]
        cdef fbp_status status
        with nogil:
            status = fbp_plan_predict(self.plan, op_, xp, rows, check_x)
        if status == FBP_ERR_NONFINITE_INPUT:
            raise NonFiniteInputError(0, -1)
        check(status, "predict")

    def backward(self, dy, dx):
        cdef const void *dyp = data_ptr(dy)
        cdef void *dxp = data_ptr_or_null(dx)
        cdef int64_t rows = dy.shape[0]
        cdef fbp_status status
        with nogil:
            status = fbp_plan_backward(self.plan, dxp, dyp, rows)
        check(status, "backward")

    def loss(self, target, dout, int loss_kind):
        cdef const void *tp = data_ptr(target)
        cdef void *dp = data_ptr_or_null(dout)
        cdef int64_t rows = target.shape[0]
        cdef double value = 0
        cdef fbp_status status
        with nogil:
            status = fbp_plan_loss(self.plan, &value, dp, tp, rows, <fbp_loss>loss_kind)
        check(status, "loss")
        return value

    def update(self, OptimizerState opt):
        cdef fbp_status status
        with nogil:
            status = fbp_plan_update(self.plan, &opt.opt)
        check(status, "optimizer step")

    def train_step(self, x, target, int loss_kind, OptimizerState opt):
        cdef const void *xp = data_ptr(x)
        cdef const void *tp = data_ptr(target)
        cdef int64_t rows = x.shape[0]
        cdef double value = 0
        cdef fbp_status status
        with nogil:
            status = fbp_plan_train_step(self.plan, &value, xp, tp, rows, <fbp_loss>loss_kind,
                                         &opt.opt)
        check(status, "train_step")
        return value

    def compute_gradients(self, x, target, int loss_kind, double grad_scale=1.0,
                          int64_t row_offset=0, grads_ready=None):
        """zero_grad, forward, loss, backward (no update): grads = grad_scale * d(mean loss).

        Returns the local mean loss. A non-finite loss is returned, not raised (the gradients are
        then zero), so that a distributed caller can agree with its peers before stopping.
        ``row_offset`` is the rows' place in the global batch (dropout masks); 0 rows is allowed.
        ``grads_ready(op)``, when given, is called (with the GIL) as soon as op ``op``'s parameter
        gradients are final, last op first; an exception it raises stops the backward and is
        re-raised here.
        """
        cdef int64_t rows = x.shape[0]
        cdef const void *xp = data_ptr(x) if rows > 0 else NULL
        cdef const void *tp = data_ptr(target) if rows > 0 else NULL
        cdef double value = 0
        cdef fbp_status status
        cdef list hook = [grads_ready, None]  # [callable, the exception it raised]
        cdef fbp_grads_ready_fn ready = NULL
        if grads_ready is not None:
            ready = _grads_ready
        cdef void *ctx = <void *>hook
        with nogil:
            status = fbp_plan_compute_gradients(self.plan, &value, xp, tp, rows, row_offset,
                                                <fbp_loss>loss_kind, grad_scale, ready, ctx)
        if status == FBP_ERR_INTERRUPTED:
            raise hook[1]
        if status == FBP_ERR_NONFINITE:
            return value
        check(status, "compute_gradients")
        return value

    def train_epochs(self, X, Y, int64_t[::1] order, int64_t batch_size, int64_t epochs,
                     object shuffle_seeds, int loss_kind, OptimizerState opt, bint check_x=False):
        """Whole epochs in one call (see fbp_plan_train_epochs). Returns (bad_epoch, bad_batch,
        loss_sums, seconds): bad_epoch and bad_batch are -1 unless a loss was not finite, and
        the two lists hold each epoch trained in full (all of them, or those before bad_epoch):
        its sum of loss * rows and its wall time. shuffle_seeds (a sequence of ints, one per
        epoch) may be None for the order as given, and then order may be None for the rows in
        order. check_x: the first epoch checks X's rows as it reads them, raising
        NonFiniteInputError. Plain lists in and out, in buffers of its own: numpy arrays and
        their memoryviews were a few us of a tiny network's fit, more with cold caches."""
        if shuffle_seeds is not None and len(shuffle_seeds) < epochs:
            raise ValueError("train_epochs: one shuffle seed per epoch")
        if order is None:
            if shuffle_seeds is not None:
                raise ValueError("train_epochs: shuffling needs an order array to fill")
        elif order.shape[0] != X.shape[0]:
            raise ValueError("train_epochs: order must index every row")
        if epochs <= 0:
            return -1, -1, [], []
        cdef const void *xp = data_ptr(X)
        cdef const void *yp = data_ptr(Y)
        cdef int64_t n = X.shape[0]
        cdef int64_t *orderp = &order[0] if order is not None else NULL
        cdef int64_t bad_epoch = -1, bad_batch = -1, e, finished
        cdef fbp_status status
        # the loss sums and seconds (2 x epochs) and the seeds: on the stack for short calls
        cdef double local[2 * 64]
        cdef uint64_t local_seeds[64]
        cdef double *buf = local
        cdef uint64_t *seed_buf = local_seeds
        cdef uint64_t *seeds = NULL
        if epochs > 64:
            buf = <double *>malloc(<size_t>(2 * epochs) * sizeof(double))
            seed_buf = <uint64_t *>malloc(<size_t>epochs * sizeof(uint64_t))
            if buf == NULL or seed_buf == NULL:
                free(buf)
                free(seed_buf)
                raise MemoryError()
        try:
            if shuffle_seeds is not None:
                seeds = seed_buf
                for e in range(epochs):
                    seeds[e] = shuffle_seeds[e]
            with nogil:
                status = fbp_plan_train_epochs(self.plan, buf, buf + epochs, &bad_epoch,
                                               &bad_batch, xp, yp, n, orderp, batch_size, epochs,
                                               seeds, <fbp_loss>loss_kind, &opt.opt, check_x)
            if status == FBP_ERR_NONFINITE_INPUT:
                raise NonFiniteInputError(bad_epoch, bad_batch)
            if status != FBP_ERR_NONFINITE:
                check(status, "fit")
                bad_epoch = bad_batch = -1
            finished = epochs if bad_epoch < 0 else bad_epoch
            return (bad_epoch, bad_batch, [buf[e] for e in range(finished)],
                    [buf[epochs + e] for e in range(finished)])
        finally:
            if buf != local:
                free(buf)
                free(seed_buf)

    def train_batches(self, X, Y, order, int64_t batch_size, int64_t first, int64_t count,
                      int loss_kind, OptimizerState opt, double loss_sum=0, bint check_x=False):
        """Returns (loss_sum, bad_batch): loss_sum plus each batch's loss * rows, added in turn
        (so an epoch's sum is the same however it is split into calls); bad_batch >= 0 when
        that batch's loss was not finite. check_x: each batch's rows of X are checked as they
        are read, raising NonFiniteInputError (epoch 0)."""
        cdef const void *xp = data_ptr(X)
        cdef const void *yp = data_ptr(Y)
        cdef const int64_t *orderp = <const int64_t *>data_ptr(order)
        cdef int64_t n = X.shape[0]
        cdef int64_t bad = -1
        cdef fbp_status status
        with nogil:
            status = fbp_plan_train_batches(self.plan, &loss_sum, &bad, xp, yp, n, orderp,
                                            batch_size, first, count, <fbp_loss>loss_kind,
                                            &opt.opt, check_x)
        if status == FBP_ERR_NONFINITE:
            return loss_sum, bad
        if status == FBP_ERR_NONFINITE_INPUT:
            raise NonFiniteInputError(0, bad)
        check(status, "fit")
        return loss_sum, -1

    def evaluate(self, X, Y, int64_t batch_size, int loss_kind, bint check_x=False):
        """(loss sum, correct count) in eval mode; check_x: X is checked for NaN/inf as it is
        read, raising NonFiniteInputError."""
        cdef const void *xp = data_ptr(X)
        cdef const void *yp = data_ptr(Y)
        cdef int64_t n = X.shape[0]
        cdef double loss_sum = 0
        cdef int64_t correct = 0
        cdef fbp_status status
        with nogil:
            status = fbp_plan_evaluate(self.plan, &loss_sum, &correct, xp, yp, n, batch_size,
                                       <fbp_loss>loss_kind, check_x)
        if status == FBP_ERR_NONFINITE_INPUT:
            raise NonFiniteInputError(0, -1)
        check(status, "evaluate")
        return loss_sum, correct


def fma_probe(bint float64, int64_t iters, int threads):
    """Run the active kernels' multiply-add probe (fbp_fma_probe: the GEMM micro-kernel's
    accumulator chains, no loads) for ``iters`` steps on ``threads`` threads at once; returns
    the floating-point operations done. The caller times the call (the GIL is released)."""
    if iters < 0 or threads < 1:
        raise ValueError(f"need iters >= 0 and threads >= 1, got {iters}, {threads}")
    cdef double flops = 0
    cdef fbp_status status
    with nogil:
        if float64:
            status = fbp_fma_probe_f64(&flops, iters, threads)
        else:
            status = fbp_fma_probe_f32(&flops, iters, threads)
    if status != FBP_OK:
        raise RuntimeError(f"the FMA probe failed (status {status})")
    return flops


def shuffle(int64_t[::1] order, uint64_t seed):
    """Fill `order` with a permutation of range(len(order)) drawn from `seed`."""
    cdef int64_t n = order.shape[0]
    if n == 0:
        return
    with nogil:
        fbp_shuffle(&order[0], n, seed)


# numpy's SeedSequence (pool of 4 uint32 words, its hash and mix constants), for seed_sequence_u64
cdef enum:
    _SEED_POOL = 4
    _SEED_WORDS_MAX = 64


cdef inline uint32_t _seed_hashmix(uint32_t value, uint32_t *hash_const) noexcept nogil:
    value ^= hash_const[0]
    hash_const[0] *= 0x931e8875u
    value *= hash_const[0]
    value ^= value >> 16
    return value


cdef inline uint32_t _seed_mix(uint32_t x, uint32_t y) noexcept nogil:
    cdef uint32_t result = 0xca01f9ddu * x - 0x4973f715u * y
    result ^= result >> 16
    return result


def seed_sequence_u64(*entropy):
    """``int(np.random.SeedSequence(list(entropy)).generate_state(1, np.uint64)[0])``, the same
    bits, in ~0.2 us instead of ~15: fit derives one shuffle seed per epoch this way, and a tiny
    network's epoch is ~15 us. Each entry is a non-negative int (split into 32-bit words,
    least significant first, as numpy does); OverflowError past 64 words (2048 bits)."""
    cdef uint32_t words[_SEED_WORDS_MAX]
    cdef Py_ssize_t n_words = 0, i, src, dst
    for value in entropy:
        if isinstance(value, bool) or not isinstance(value, int):
            value = operator_index(value)
        if value < 0:
            raise ValueError("seed_sequence_u64: entropy must be non-negative integers")
        while True:
            if n_words == _SEED_WORDS_MAX:  # the caller falls back to numpy's object
                raise OverflowError(f"seed_sequence_u64: at most {_SEED_WORDS_MAX} 32-bit words")
            words[n_words] = <uint32_t>(value & 0xffffffff)
            n_words += 1
            value >>= 32
            if value == 0:
                break
    cdef uint32_t pool[_SEED_POOL]
    cdef uint32_t hash_const = 0x43b0d7e5u
    for i in range(_SEED_POOL):
        pool[i] = _seed_hashmix(words[i] if i < n_words else 0, &hash_const)
    for src in range(_SEED_POOL):
        for dst in range(_SEED_POOL):
            if src != dst:
                pool[dst] = _seed_mix(pool[dst], _seed_hashmix(pool[src], &hash_const))
    for src in range(_SEED_POOL, n_words):
        for dst in range(_SEED_POOL):
            pool[dst] = _seed_mix(pool[dst], _seed_hashmix(words[src], &hash_const))
    # generate_state(1, uint64): two uint32 words from the pool, little-endian into one uint64
    cdef uint32_t out_words[2]
    hash_const = 0x8b51f9ddu
    for i in range(2):
        out_words[i] = pool[i] ^ hash_const
        hash_const *= 0x58f38dedu
        out_words[i] *= hash_const
        out_words[i] ^= out_words[i] >> 16
    return (<uint64_t>out_words[1] << 32) | out_words[0]


def all_finite(object x):
    """True when no element of x is NaN or infinite, for a C-contiguous float32 or float64 array
    of any shape (no allocation); None for any other array, which the caller checks itself. One
    buffer request instead of a reshape and a fused-type memoryview: 0.13 instead of 0.71 us,
    and train_step checks two arrays per step."""
    cdef Py_buffer view
    try:
        PyObject_GetBuffer(x, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT)
    except (BufferError, TypeError, ValueError):
        return None
    cdef int64_t n = view.len // view.itemsize if view.itemsize > 0 else 0
    cdef int ok = 1
    cdef int kind = _float_kind(&view)
    if kind == 0:
        PyBuffer_Release(&view)
        return None
    if n > 0:
        with nogil:
            if kind == 1:
                ok = fbp_all_finite_f32(<const float *>view.buf, n)
            else:
                ok = fbp_all_finite_f64(<const double *>view.buf, n)
    PyBuffer_Release(&view)
    return ok != 0
