/* Checks the GEMM of every ISA variant against a naive double-precision reference.
 *
 * Built by tests/test_isa_variants.py, which compiles the kernel sources three ways: plain C, the
 * AVX2 layout with AVX2 flags, and the AVX-512 layout (12x32 tiles, 16-lane transposes) with
 * AVX2 flags only. GCC lowers the 64-byte vectors to pairs of 32-byte ones with the same
 * semantics, so the AVX-512 code's logic is verified on machines that cannot run AVX-512.
 * Shapes cross the direct/packed switch and every block size; alpha, beta, bias and each
 * activation are exercised. The bound is the classical gamma_(k+8) * sum|terms| plus a few ulp
 * of the result for the activation. Exit status 0 = all passed. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "fastbp.h"
#include "internal.h"
extern const fbp_table_f32 fbp_table_f32_generic, fbp_table_f32_avx2, fbp_table_f32_emu512;
extern const fbp_table_f64 fbp_table_f64_generic, fbp_table_f64_avx2, fbp_table_f64_emu512;
int fbp_team_size(int64_t w, int64_t g) {
    (void)g;
    return w > 300000 ? 2 : 1;
}
int fbp_get_num_threads(void) { return 2; } /* the GEMM's cross-core prefetch: exercise it */
int fbp_get_flush_denormal(void) { return 1; }
int fbp_get_transposed_a_paths(void) { return 1; }
/* The fused small-network step calls the losses through dispatch.c's forwarders, which this
 * checker does not link: forward them to the generic tables (the checker never calls them). */
fbp_status fbp_mse_f32(double *l, float *d, const float *p, const float *t, int64_t n, double s) {
    return fbp_table_f32_generic.mse(l, d, p, t, n, s);
}
fbp_status fbp_mse_f64(double *l, double *d, const double *p, const double *t, int64_t n,
                       double s) {
    return fbp_table_f64_generic.mse(l, d, p, t, n, s);
}
fbp_status fbp_softmax_xent_f32(double *l, float *g, const float *x, const int64_t *y, int64_t r,
                                int64_t c, double s) {
    return fbp_table_f32_generic.softmax_xent(l, g, x, y, r, c, s);
}
fbp_status fbp_softmax_xent_f64(double *l, double *g, const double *x, const int64_t *y, int64_t r,
                                int64_t c, double s) {
    return fbp_table_f64_generic.softmax_xent(l, g, x, y, r, c, s);
}
static void *grow(void **p, size_t *s, size_t b) {
    if (b > *s) {
        free(*p);
        *s = 0;
        if (posix_memalign(p, 64, b)) return *p = 0;
        *s = b;
    }
    return *p;
}
void *fbp_scratch(size_t b) {
    static __thread void *p;
    static __thread size_t s;
    return grow(&p, &s, b);
}
void *fbp_scratch_aux(size_t b) {
    static __thread void *p;
    static __thread size_t s;
    return grow(&p, &s, b);
}
static double act(double x, int a) {
    if (a == 1) return 1 / (1 + exp(-x));
    if (a == 2) return x > 0 ? x : 0;
    if (a == 3) return tanh(x);
    return x;
}
static unsigned long long st = 88172645463325252ull;
static double rnd(void) {
    st ^= st << 13;
    st ^= st >> 7;
    st ^= st << 17;
    return (double)(st >> 11) / 9007199254740992.0 * 2 - 1;
}
#define CHECK(T, TABLE, NAME, EPS)                                                                 \
    do {                                                                                           \
        T *a = malloc(sizeof(T) * m * k + 8), *b = malloc(sizeof(T) * k * n + 8),                  \
          *c = malloc(sizeof(T) * m * n + 8), *bias = malloc(sizeof(T) * n + 8);                   \
        double *ref = malloc(sizeof(double) * m * n + 8),                                          \
               *bound = malloc(sizeof(double) * m * n + 8);                                        \
        for (long i = 0; i < (long)m * k; i++) a[i] = (T)rnd();                                    \
        for (long i = 0; i < (long)k * n; i++) b[i] = (T)rnd();                                    \
        for (long i = 0; i < n; i++) bias[i] = (T)rnd();                                           \
        for (long i = 0; i < (long)m * n; i++) c[i] = (T)rnd();                                    \
        long rsa = ta ? 1 : k, csa = ta ? m : 1, rsb = tb ? 1 : n, csb = tb ? k : 1;               \
        /* a transposed A without bias or activation: a weight gradient (the transposed route) */  \
        const int with_bias = !(ta && ac == 0);                                                    \
        for (long i = 0; i < m; i++)                                                               \
            for (long j = 0; j < n; j++) {                                                         \
                double s = 0, sa = 0;                                                              \
                for (long p = 0; p < k; p++) {                                                     \
                    double t = (double)a[i * rsa + p * csa] * (double)b[p * rsb + j * csb];        \
                    s += t;                                                                        \
                    sa += fabs(t);                                                                 \
                }                                                                                  \
                const double bj = with_bias ? (double)bias[j] : 0.0;                               \
                double z = 0.5 * s + 0.25 * (double)c[i * n + j] + bj;                             \
                ref[i * n + j] = act(z, ac);                                                       \
                bound[i * n + j] =                                                                 \
                    (k + 8) * EPS * (0.5 * sa + 0.25 * fabs(c[i * n + j]) + fabs(bj)) +            \
                    8 * EPS * fabs(ref[i * n + j]) + 1e-300;                                       \
            }                                                                                      \
        fbp_status s_ = TABLE.gemm(c, a, b, with_bias ? bias : NULL, m, n, k, rsa, csa, rsb, csb,  \
                                   n, (T)0.5, (T)0.25, ac);                                        \
        long badc = 0;                                                                             \
        for (long i = 0; i < (long)m * n; i++)                                                     \
            if (!(fabs(c[i] - ref[i]) <= bound[i])) badc++;                                        \
        if (badc || s_) {                                                                          \
            printf("FAIL %s m=%d n=%d k=%d ta=%d tb=%d act=%d bad=%ld st=%d\n", NAME, m, n, k, ta, \
                   tb, ac, badc, s_);                                                              \
            fails++;                                                                               \
        }                                                                                          \
        free(a);                                                                                   \
        free(b);                                                                                   \
        free(c);                                                                                   \
        free(bias);                                                                                \
        free(ref);                                                                                 \
        free(bound);                                                                               \
    } while (0)
/* fbp_gemm_check_a: the bits of gemm, and its verdict on A: 1 for a finite A, 0 with one NaN or
 * infinity at any of a few places, on every product past the direct kernel's size (which leaves
 * the flag alone: -1 here). */
#define CHECK_A(T, TABLE, NAME)                                                                    \
    do {                                                                                           \
        T *a = malloc(sizeof(T) * m * k + 8), *b = malloc(sizeof(T) * k * n + 8),                  \
          *c1 = malloc(sizeof(T) * m * n + 8), *c2 = malloc(sizeof(T) * m * n + 8);                \
        for (long i = 0; i < (long)m * k; i++) a[i] = (T)rnd();                                    \
        for (long i = 0; i < (long)k * n; i++) b[i] = (T)rnd();                                    \
        long rsa = ta ? 1 : k, csa = ta ? m : 1, rsb = tb ? 1 : n, csb = tb ? k : 1;               \
        const int direct = (double)m * n * k <= FBP_GEMM_DIRECT_MAX_MACS;                          \
        int fin = -1;                                                                              \
        fbp_status s1 = TABLE.gemm(c1, a, b, NULL, m, n, k, rsa, csa, rsb, csb, n, 1, 0, 0);       \
        fbp_status s2 =                                                                            \
            TABLE.gemm_check_a(c2, a, b, NULL, m, n, k, rsa, csa, rsb, csb, n, 1, 0, 0, &fin);     \
        int bad = s1 || s2 || fin != (direct ? -1 : 1) || memcmp(c1, c2, sizeof(T) * m * n);       \
        const long where[3] = {0, (long)m * k - 1, (long)m * k / 2};                               \
        for (int w = 0; w < 3; w++) {                                                              \
            const T keep = a[where[w]];                                                            \
            a[where[w]] = w == 1 ? (T)INFINITY : (T)NAN;                                           \
            fin = -1;                                                                              \
            s2 =                                                                                   \
                TABLE.gemm_check_a(c2, a, b, NULL, m, n, k, rsa, csa, rsb, csb, n, 1, 0, 0, &fin); \
            bad |= s2 || fin != (direct ? -1 : 0);                                                 \
            a[where[w]] = keep;                                                                    \
        }                                                                                          \
        if (bad) {                                                                                 \
            printf("FAIL %s check_a m=%d n=%d k=%d ta=%d tb=%d\n", NAME, m, n, k, ta, tb);         \
            fails++;                                                                               \
        }                                                                                          \
        free(a);                                                                                   \
        free(b);                                                                                   \
        free(c1);                                                                                  \
        free(c2);                                                                                  \
    } while (0)
int main(void) {
    int fails = 0, runs = 0;
    int shapes[][3] = {{1, 1, 1},       {3, 5, 2},      {7, 33, 257},   {13, 17, 19},
                       {25, 40, 30},    {150, 40, 513}, {128, 10, 128}, {10, 128, 128},
                       {128, 256, 784}, {37, 70, 129},  {12, 32, 16},   {24, 64, 48},
                       {5, 4100, 3},    {64, 16, 600},  {40, 3, 300},   {33, 24, 129}};
    for (unsigned si = 0; si < sizeof shapes / sizeof shapes[0]; si++)
        for (int ta = 0; ta < 2; ta++)
            for (int tb = 0; tb < 2; tb++)
                for (int ac = 0; ac < 4; ac++) {
                    int m = shapes[si][0], n = shapes[si][1], k = shapes[si][2];
                    CHECK(float, fbp_table_f32_generic, "f32 generic", 5.96e-8);
                    CHECK(float, fbp_table_f32_avx2, "f32 avx2", 5.96e-8);
                    CHECK(float, fbp_table_f32_emu512, "f32 emu512", 5.96e-8);
                    CHECK(double, fbp_table_f64_generic, "f64 generic", 1.12e-16);
                    CHECK(double, fbp_table_f64_avx2, "f64 avx2", 1.12e-16);
                    CHECK(double, fbp_table_f64_emu512, "f64 emu512", 1.12e-16);
                    runs += 6;
                    if (ac == 0) {
                        CHECK_A(float, fbp_table_f32_generic, "f32 generic");
                        CHECK_A(float, fbp_table_f32_avx2, "f32 avx2");
                        CHECK_A(float, fbp_table_f32_emu512, "f32 emu512");
                        CHECK_A(double, fbp_table_f64_generic, "f64 generic");
                        CHECK_A(double, fbp_table_f64_avx2, "f64 avx2");
                        CHECK_A(double, fbp_table_f64_emu512, "f64 emu512");
                        runs += 6;
                    }
                }
    printf("%d runs, %d failures\n", runs, fails);
    return fails != 0;
}
