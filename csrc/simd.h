/* Portable SIMD for the kernel objects: GCC/Clang vector extensions whose width follows the
 * ISA the object is compiled for (16 bytes generic/SSE2, 32 AVX2, 64 AVX-512). The same kernel
 * source thus becomes SSE2, AVX2+FMA or AVX-512 code from the compile flags alone, which keeps
 * one tested source for all paths. Only included by files compiled once per ISA. */
#ifndef FASTBP_SIMD_H
#define FASTBP_SIMD_H

#include <stdint.h>
#include <string.h>

#if defined(FBP_BUILD_AVX512)
#define FBP_VBYTES 64
#elif defined(FBP_BUILD_AVX2)
#define FBP_VBYTES 32
#else
#define FBP_VBYTES 16
#endif

typedef float vf32 __attribute__((vector_size(FBP_VBYTES)));
typedef int32_t vi32 __attribute__((vector_size(FBP_VBYTES)));
typedef double vf64 __attribute__((vector_size(FBP_VBYTES)));
typedef int64_t vi64 __attribute__((vector_size(FBP_VBYTES)));

#define FBP_INLINE static inline __attribute__((always_inline))

/* memcpy loads/stores: unaligned, alias-safe, and compiled to single vector moves. */
#define FBP_DEFINE_VEC_BASICS(V, I, T, SFX)                                                        \
    FBP_INLINE V vload_##SFX(const T *p) {                                                         \
        V v;                                                                                       \
        memcpy(&v, p, sizeof v);                                                                   \
        return v;                                                                                  \
    }                                                                                              \
    FBP_INLINE void vstore_##SFX(T *p, V v) { memcpy(p, &v, sizeof v); }                           \
    /* s - 0 is exactly s for every s (even -0), so it folds to a bare broadcast; (V){0} + s       \
     * would not fold (-0 + 0 is +0) and costs a scalar add per use. */                            \
    FBP_INLINE V vbcast_##SFX(T s) { return s - (V){0}; }                                          \
    /* mask lanes are all-ones or zero, as vector comparisons produce them */                      \
    FBP_INLINE V vselect_##SFX(I mask, V a, V b) { return (V)((mask & (I)a) | (~mask & (I)b)); }

FBP_DEFINE_VEC_BASICS(vf32, vi32, float, f32)
FBP_DEFINE_VEC_BASICS(vf64, vi64, double, f64)

/* All-ones in lanes [0, n), zeros after (0 <= n <= lanes): the mask of a partial access, one
 * compare against a constant lane index; and v with the lanes from n on cleared. */
#define FBP_LANE_INDEX {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}
#define FBP_DEFINE_VEC_MASK(V, I, E, SFX)                                                          \
    FBP_INLINE I vfirst_mask_##SFX(int64_t n) {                                                    \
        static const E lane_index[] = FBP_LANE_INDEX;                                              \
        I lane;                                                                                    \
        memcpy(&lane, lane_index, sizeof lane);                                                    \
        return lane < (I){0} + (E)n;                                                               \
    }                                                                                              \
    FBP_INLINE V vkeep_first_##SFX(V v, int64_t n) { return (V)((I)v & vfirst_mask_##SFX(n)); }

FBP_DEFINE_VEC_MASK(vf32, vi32, int32_t, f32)
FBP_DEFINE_VEC_MASK(vf64, vi64, int64_t, f64)

/* p[0] in lane 0, zeros after, as a scalar load (it zero-extends): a one-lane masked load or
 * gather is microcoded on Zen 2, and a scalar load forwards from a recent store. */
FBP_INLINE vf32 vload_first_f32(const float *p) {
    vf32 v = vbcast_f32(0);
    v[0] = p[0];
    return v;
}
FBP_INLINE vf64 vload_first_f64(const double *p) {
    vf64 v = vbcast_f64(0);
    v[0] = p[0];
    return v;
}

/* The first n (0 <= n <= lanes) lanes from p, zeros after, and the matching store: tails without
 * touching memory past the end. With AVX-512 or AVX2 these are masked moves (masked-off lanes
 * never fault). A lane loop compiled to a stack spill plus a `rep movs`, tens of cycles per
 * tail, which was 40% of a tiny network's training step; it stays for SSE2 and for the 64-byte
 * layout built with AVX2 flags that tests/test_isa_variants.py uses. */
#if FBP_VBYTES == 64 && defined(__AVX512F__)
#include <immintrin.h>
FBP_INLINE vf32 vload_part_f32(const float *p, int64_t n) {
    return (vf32)_mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p);
}
FBP_INLINE void vstore_part_f32(float *p, vf32 v, int64_t n) {
    _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1), (__m512)v);
}
FBP_INLINE vf64 vload_part_f64(const double *p, int64_t n) {
    return (vf64)_mm512_maskz_loadu_pd((__mmask8)((1u << n) - 1), p);
}
FBP_INLINE void vstore_part_f64(double *p, vf64 v, int64_t n) {
    _mm512_mask_storeu_pd(p, (__mmask8)((1u << n) - 1), (__m512d)v);
}
/* p[0], p[s], ..., p[(n - 1) s], zeros after; s * lanes must fit in int32 (see vgather_ok). */
FBP_INLINE vf32 vgather_part_f32(const float *p, int64_t s, int64_t n) {
    const __m512i idx =
        _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                           _mm512_set1_epi32((int)s));
    return (vf32)_mm512_mask_i32gather_ps(_mm512_setzero_ps(), (__mmask16)((1u << n) - 1), idx, p,
                                          4);
}
FBP_INLINE vf64 vgather_part_f64(const double *p, int64_t s, int64_t n) {
    const __m256i idx =
        _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32((int)s));
    return (vf64)_mm512_mask_i32gather_pd(_mm512_setzero_pd(), (__mmask8)((1u << n) - 1), idx, p,
                                          8);
}
#define FBP_HAVE_VGATHER 1
/* The 4 x 4 transpose of 128-bit lanes: r[q + i s] lane j = (a, b, c, d)[j] lane i. */
#define FBP_TRANSPOSE_LANES(T, V, SHUF, r, q, s, a, b, c, d)                                       \
    do {                                                                                           \
        const T lo_ab = SHUF(a, b, 0x44), hi_ab = SHUF(a, b, 0xEE);                                \
        const T lo_cd = SHUF(c, d, 0x44), hi_cd = SHUF(c, d, 0xEE);                                \
        (r)[q] = (V)SHUF(lo_ab, lo_cd, 0x88);                                                      \
        (r)[(q) + (s)] = (V)SHUF(lo_ab, lo_cd, 0xDD);                                              \
        (r)[(q) + 2 * (s)] = (V)SHUF(hi_ab, hi_cd, 0x88);                                          \
        (r)[(q) + 3 * (s)] = (V)SHUF(hi_ab, hi_cd, 0xDD);                                          \
    } while (0)
/* In-register transposes of a lanes x lanes block for the transposing packs (gemm.c): unpacks
 * within 128-bit lanes, then two rounds of 128-bit lane shuffles, every step writing a new
 * register. The generic two-vector shuffles compiled to vpermt2ps, which overwrites a source,
 * with a register copy before most (41 moves in a 16 x 16 block). With the packing loop order
 * of pack_b_sliver, products of a transposed B (a Linear's forward) 3-6% faster at one and two
 * threads, float64 0-3% (Zen 5, both builds' fbp_gemm called in turn in one process); level in
 * fit's per-op profile. */
FBP_INLINE void vtranspose_f32(vf32 r[16]) {
    __m512 t[16], u[16];
    for (int i = 0; i < 16; i += 2) { /* t[i + c] lane L: rows i, i + 1 at columns 4L + 2c, +1 */
        t[i] = _mm512_unpacklo_ps((__m512)r[i], (__m512)r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps((__m512)r[i], (__m512)r[i + 1]);
    }
    for (int g = 0; g < 16; g += 4) { /* u[g + c] lane L: rows g .. g + 3 of column 4L + c */
        const __m512d t0 = _mm512_castps_pd(t[g]), t1 = _mm512_castps_pd(t[g + 1]);
        const __m512d t2 = _mm512_castps_pd(t[g + 2]), t3 = _mm512_castps_pd(t[g + 3]);
        u[g] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
        u[g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
        u[g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
        u[g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
    }
    for (int c = 0; c < 4; c++) /* column 4L + c: lane L of u[c], u[4 + c], u[8 + c], u[12 + c] */
        FBP_TRANSPOSE_LANES(__m512, vf32, _mm512_shuffle_f32x4, r, c, 4, u[c], u[4 + c], u[8 + c],
                            u[12 + c]);
}
FBP_INLINE void vtranspose_f64(vf64 r[8]) {
    __m512d t[8];
    for (int i = 0; i < 8; i += 2) { /* t[i + c] lane L: rows i, i + 1 of column 2L + c */
        t[i] = _mm512_unpacklo_pd((__m512d)r[i], (__m512d)r[i + 1]);
        t[i + 1] = _mm512_unpackhi_pd((__m512d)r[i], (__m512d)r[i + 1]);
    }
    for (int c = 0; c < 2; c++) /* column 2L + c: lane L of t[c], t[2 + c], t[4 + c], t[6 + c] */
        FBP_TRANSPOSE_LANES(__m512d, vf64, _mm512_shuffle_f64x2, r, c, 2, t[c], t[2 + c], t[4 + c],
                            t[6 + c]);
}
#define FBP_HAVE_VTRANSPOSE 1
#elif FBP_VBYTES == 32 && defined(__AVX2__)
#include <immintrin.h>
FBP_INLINE vf32 vload_part_f32(const float *p, int64_t n) {
    return (vf32)_mm256_maskload_ps(p, (__m256i)vfirst_mask_f32(n));
}
/* AVX2's partial store goes in pieces of 4, 2 and 1 lanes rather than as a masked move: Zen 2
 * microcodes vmaskmovps to memory (a loop of them: 3.6 ns a store, a plain store 0.52 ns), and
 * W2's step makes ten (0.229 -> 0.213 us a step). The masked load stays: in pieces it cost W2
 * 6% (the inserts), though a masked load does not forward from a recent store and pieces do. */
FBP_INLINE void vstore_part_f32(float *p, vf32 v, int64_t n) {
    if (n >= 8) {
        _mm256_storeu_ps(p, (__m256)v);
        return;
    }
    __m128 half = _mm256_castps256_ps128((__m256)v);
    if (n & 4) {
        _mm_storeu_ps(p, half);
        p += 4;
        half = _mm256_extractf128_ps((__m256)v, 1);
    }
    if (n & 2) {
        _mm_storel_pi((__m64 *)p, half);
        p += 2;
        half = _mm_movehl_ps(half, half);
    }
    if (n & 1) _mm_store_ss(p, half);
}
FBP_INLINE vf64 vload_part_f64(const double *p, int64_t n) {
    return (vf64)_mm256_maskload_pd(p, (__m256i)vfirst_mask_f64(n));
}
FBP_INLINE void vstore_part_f64(double *p, vf64 v, int64_t n) {
    if (n >= 4) {
        _mm256_storeu_pd(p, (__m256d)v);
        return;
    }
    __m128d half = _mm256_castpd256_pd128((__m256d)v);
    if (n & 2) {
        _mm_storeu_pd(p, half);
        p += 2;
        half = _mm256_extractf128_pd((__m256d)v, 1);
    }
    if (n & 1) _mm_store_sd(p, half);
}
FBP_INLINE vf32 vgather_part_f32(const float *p, int64_t s, int64_t n) {
    const __m256i idx =
        _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32((int)s));
    return (vf32)_mm256_mask_i32gather_ps(_mm256_setzero_ps(), p, idx,
                                          (__m256)(__m256i)vfirst_mask_f32(n), 4);
}
FBP_INLINE vf64 vgather_part_f64(const double *p, int64_t s, int64_t n) {
    const __m128i idx = _mm_mullo_epi32(_mm_setr_epi32(0, 1, 2, 3), _mm_set1_epi32((int)s));
    return (vf64)_mm256_mask_i32gather_pd(_mm256_setzero_pd(), p, idx,
                                          (__m256d)(__m256i)vfirst_mask_f64(n), 8);
}
#define FBP_HAVE_VGATHER 1
#else
#define FBP_DEFINE_VEC_PART(V, T, SFX)                                                             \
    FBP_INLINE V vload_part_##SFX(const T *p, int64_t n) {                                         \
        V v = {0};                                                                                 \
        for (int64_t i = 0; i < n; i++) v[i] = p[i];                                               \
        return v;                                                                                  \
    }                                                                                              \
    FBP_INLINE void vstore_part_##SFX(T *p, V v, int64_t n) {                                      \
        for (int64_t i = 0; i < n; i++) p[i] = v[i];                                               \
    }                                                                                              \
    FBP_INLINE V vgather_part_##SFX(const T *p, int64_t s, int64_t n) {                            \
        V v = {0};                                                                                 \
        for (int64_t i = 0; i < n; i++) v[i] = p[i * s];                                           \
        return v;                                                                                  \
    }
FBP_DEFINE_VEC_PART(vf32, float, f32)
FBP_DEFINE_VEC_PART(vf64, double, f64)
#define FBP_HAVE_VGATHER 0
#endif
/* `n` (1..lanes) consecutive elements, zeros after: a plain vector access when n is whole. */
#define FBP_DEFINE_VEC_N(V, T, SFX, LANES)                                                         \
    FBP_INLINE V vload_n_##SFX(const T *p, int64_t n) {                                            \
        return n == (LANES) ? vload_##SFX(p) : vload_part_##SFX(p, n);                             \
    }                                                                                              \
    FBP_INLINE void vstore_n_##SFX(T *p, V v, int64_t n) {                                         \
        if (n == (LANES))                                                                          \
            vstore_##SFX(p, v);                                                                    \
        else                                                                                       \
            vstore_part_##SFX(p, v, n);                                                            \
    }
FBP_DEFINE_VEC_N(vf32, float, f32, FBP_VBYTES / 4)
FBP_DEFINE_VEC_N(vf64, double, f64, FBP_VBYTES / 8)

/* Whether vgather_part can take stride s: its lane offsets are 32-bit. */
FBP_INLINE int vgather_ok(int64_t s) { return FBP_HAVE_VGATHER && s > 0 && s <= INT32_MAX / 16; }

FBP_INLINE vf32 vabs_f32(vf32 x) { return (vf32)((vi32)x & 0x7fffffff); }
FBP_INLINE vf64 vabs_f64(vf64 x) { return (vf64)((vi64)x & INT64_MAX); }
/* -|x| as one OR of the sign bit (-vabs is an AND and an XOR); the same bits, NaN included. */
FBP_INLINE vf32 vnegabs_f32(vf32 x) { return (vf32)((vi32)x | INT32_MIN); }
FBP_INLINE vf64 vnegabs_f64(vf64 x) { return (vf64)((vi64)x | INT64_MIN); }
/* x < lo ? lo : x, NaN kept. On x86 one max instruction: MAX(lo, x) returns its second operand
 * x unless lo > x, so NaN comes through. The select it replaces is a compare and two logic ops,
 * and the activations are bound by those ports (AVX-512 issues 512-bit work on two). */
#if FBP_VBYTES == 64 && defined(__AVX512F__)
FBP_INLINE vf32 vfloor_f32(vf32 x, float lo) {
    return (vf32)_mm512_max_ps(_mm512_set1_ps(lo), (__m512)x);
}
FBP_INLINE vf64 vfloor_f64(vf64 x, double lo) {
    return (vf64)_mm512_max_pd(_mm512_set1_pd(lo), (__m512d)x);
}
#elif FBP_VBYTES == 32 && defined(__AVX2__)
FBP_INLINE vf32 vfloor_f32(vf32 x, float lo) {
    return (vf32)_mm256_max_ps(_mm256_set1_ps(lo), (__m256)x);
}
FBP_INLINE vf64 vfloor_f64(vf64 x, double lo) {
    return (vf64)_mm256_max_pd(_mm256_set1_pd(lo), (__m256d)x);
}
#elif FBP_VBYTES == 16 && defined(__SSE2__)
#include <emmintrin.h>
FBP_INLINE vf32 vfloor_f32(vf32 x, float lo) {
    return (vf32)_mm_max_ps(_mm_set1_ps(lo), (__m128)x);
}
FBP_INLINE vf64 vfloor_f64(vf64 x, double lo) {
    return (vf64)_mm_max_pd(_mm_set1_pd(lo), (__m128d)x);
}
#else
FBP_INLINE vf32 vfloor_f32(vf32 x, float lo) { return vselect_f32(x < lo, vbcast_f32(lo), x); }
FBP_INLINE vf64 vfloor_f64(vf64 x, double lo) { return vselect_f64(x < lo, vbcast_f64(lo), x); }
#endif
/* |y| with the sign of x (y must be non-negative). */
FBP_INLINE vf32 vwithsign_f32(vf32 y, vf32 x) { return (vf32)((vi32)y | ((vi32)x & INT32_MIN)); }
FBP_INLINE vf64 vwithsign_f64(vf64 y, vf64 x) { return (vf64)((vi64)y | ((vi64)x & INT64_MIN)); }

/* p * 2^n for the integer n (as a float n and as ni), rounded once, also into the subnormals.
 * AVX-512 has it as one instruction (vscalef); elsewhere it is two exact power-of-two scales,
 * so that a 2^n below the smallest normal does not underflow to 0 before p is applied: the same
 * single rounding, so both give the same bits. The vscalef form is 9 vector operations fewer
 * per exp, which is ~30% of a sigmoid. */
#if FBP_VBYTES == 64 && defined(__AVX512F__)
FBP_INLINE vf32 vscale2_f32(vf32 p, vf32 n, vi32 ni) {
    (void)ni;
    return (vf32)_mm512_scalef_ps((__m512)p, (__m512)n);
}
FBP_INLINE vf64 vscale2_f64(vf64 p, vf64 n, vi64 ni) {
    (void)ni;
    return (vf64)_mm512_scalef_pd((__m512d)p, (__m512d)n);
}
#else
FBP_INLINE vf32 vscale2_f32(vf32 p, vf32 n, vi32 ni) {
    (void)n;
    vi32 n1 = ni >> 1;
    vi32 n2 = ni - n1;
    vf32 s1 = (vf32)((n1 + 127) << 23);
    vf32 s2 = (vf32)((n2 + 127) << 23);
    return p * s1 * s2;
}
FBP_INLINE vf64 vscale2_f64(vf64 p, vf64 n, vi64 ni) {
    (void)n;
    vi64 n1 = ni >> 1;
    vi64 n2 = ni - n1;
    vf64 s1 = (vf64)((n1 + 1023) << 52);
    vf64 s2 = (vf64)((n2 + 1023) << 52);
    return p * s1 * s2;
}
#endif

/* Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2: returns r, and n as a float and as an
 * integer (for vscale2). Shared by exp and tanh's expm1. */
FBP_INLINE vf32 vreduce_ln2_f32(vf32 x, vf32 *n, vi32 *ni) {
    const vf32 magic = vbcast_f32(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    vf32 t = x * 1.44269504088896341f + magic;
    *n = t - magic;
    *ni = (vi32)t - (vi32)magic;
    vf32 r = x - *n * 0.693359375f;
    return r - *n * -2.12194440e-4f;
}

FBP_INLINE vf64 vreduce_ln2_f64(vf64 x, vf64 *n, vi64 *ni) {
    const vf64 magic = vbcast_f64(6755399441055744.0); /* 1.5 * 2^52 */
    vf64 t = x * 1.44269504088896338700e+00 + magic;
    *n = t - magic;
    *ni = (vi64)t - (vi64)magic;
    vf64 r = x - *n * 6.93147180369123816490e-01;
    return r - *n * 1.90821492927058770002e-10;
}

/* exp(x) for x <= 0 (NaN propagates). Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, a
 * Taylor polynomial accurate to < 0.2 ulp on that interval, and the scale 2^n applied as two
 * halves so results down in the subnormal range are still right (exp(-100) in float is
 * subnormal; a single 2^n would underflow to 0). Below the smallest subnormal it returns 0. */
FBP_INLINE vf32 vexp_nonpos_f32(vf32 x) {
    x = vfloor_f32(x, -104.0f);
    vf32 n;
    vi32 ni;
    const vf32 r = vreduce_ln2_f32(x, &n, &ni);
    vf32 p = vbcast_f32(1.98412698e-4f);
    p = p * r + 1.38888889e-3f;
    p = p * r + 8.33333333e-3f;
    p = p * r + 4.16666667e-2f;
    p = p * r + 1.66666667e-1f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return vscale2_f32(p, n, ni);
}

FBP_INLINE vf64 vexp_nonpos_f64(vf64 x) {
    x = vfloor_f64(x, -746.0);
    vf64 n;
    vi64 ni;
    const vf64 r = vreduce_ln2_f64(x, &n, &ni);
    vf64 p = vbcast_f64(1.60590438368216133e-10);
    p = p * r + 2.08767569878681002e-09;
    p = p * r + 2.50521083854417202e-08;
    p = p * r + 2.75573192239858883e-07;
    p = p * r + 2.75573192239858925e-06;
    p = p * r + 2.48015873015873016e-05;
    p = p * r + 1.98412698412698413e-04;
    p = p * r + 1.38888888888888894e-03;
    p = p * r + 8.33333333333333322e-03;
    p = p * r + 4.16666666666666644e-02;
    p = p * r + 1.66666666666666657e-01;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    return vscale2_f64(p, n, ni);
}

/* sigmoid via t = exp(-|x|) in (0, 1]: never overflows, and for x < 0 the result t/(1+t)
 * keeps full relative accuracy down to the subnormals (1 - sigmoid(|x|) would not). AVX-512
 * multiplies by t only in the lanes that need it (a masked multiply; !(x >= 0) is true for NaN,
 * as the select's false side is): one compare and one multiply where the select took four.
 * With vnegabs and vfloor, float32 on AVX-512 went 0.32 -> 0.26 ns per value in cache and 0.35
 * -> 0.31 for 10^6 values (AVX2 0.53 -> 0.47), the same bits for every float32 input. The
 * division stays: rcp14 with two Newton steps is IEEE's 1/d for every float d in [1, 2] but
 * 2 - 2^-23 (a tie), and its extra operations made the sigmoid slower (0.29 -> 0.36 ns). */
#if FBP_VBYTES == 64 && defined(__AVX512F__)
FBP_INLINE vf32 vsigmoid_f32(vf32 x) {
    const vf32 t = vexp_nonpos_f32(vnegabs_f32(x));
    const vf32 s = 1 / (1 + t);
    const __mmask16 neg = _mm512_cmp_ps_mask((__m512)x, _mm512_setzero_ps(), _CMP_NGE_UQ);
    return (vf32)_mm512_mask_mul_ps((__m512)s, neg, (__m512)t, (__m512)s);
}
FBP_INLINE vf64 vsigmoid_f64(vf64 x) {
    const vf64 t = vexp_nonpos_f64(vnegabs_f64(x));
    const vf64 s = 1 / (1 + t);
    const __mmask8 neg = _mm512_cmp_pd_mask((__m512d)x, _mm512_setzero_pd(), _CMP_NGE_UQ);
    return (vf64)_mm512_mask_mul_pd((__m512d)s, neg, (__m512d)t, (__m512d)s);
}
#else
#define FBP_DEFINE_SIGMOID(V, SFX)                                                                 \
    FBP_INLINE V vsigmoid_##SFX(V x) {                                                             \
        V t = vexp_nonpos_##SFX(vnegabs_##SFX(x));                                                 \
        V s = 1 / (1 + t);                                                                         \
        return vselect_##SFX(x >= 0, s, t * s);                                                    \
    }
FBP_DEFINE_SIGMOID(vf32, f32)
FBP_DEFINE_SIGMOID(vf64, f64)
#undef FBP_DEFINE_SIGMOID
#endif

/* tanh(|x|) = u / (2 - u) with u = -expm1(-2|x|) in [0, 1): one expm1 and one division for
 * every x, accurate near 0 because expm1 is (a Taylor series of the Cody-Waite remainder r,
 * |r| <= ln2/2, rescaled as 2^n (1 + p) - 1 without cancellation). Past |x| = 10 (float) or 20
 * (double) tanh rounds to 1, so the argument is clamped there. Measured on every 7th float32:
 * at most 2.5 ulp. The previous form, a Taylor series below 0.4 blended with (1 - e)/(1 + e)
 * above, evaluated both: 0.37 -> 0.29 ns per float32 on AVX-512, in cache. */
FBP_INLINE vf32 vtanh_f32(vf32 x) {
    vf32 m = -2 * vabs_f32(x);
    m = vfloor_f32(m, -20.0f);
    vf32 n;
    vi32 ni;
    const vf32 r = vreduce_ln2_f32(m, &n, &ni);
    vf32 q = vbcast_f32(2.48015873e-5f);
    q = q * r + 1.98412698e-4f;
    q = q * r + 1.38888889e-3f;
    q = q * r + 8.33333333e-3f;
    q = q * r + 4.16666667e-2f;
    q = q * r + 1.66666667e-1f;
    q = q * r + 0.5f;
    vf32 p = r + r * r * q; /* expm1(r) */
    vf32 s = vscale2_f32(vbcast_f32(1.0f), n, ni);
    vf32 u = s * -p + (1 - s); /* -expm1(m) = 1 - 2^n (1 + p): +0 at x = 0 */
    return vwithsign_f32(u / (2 - u), x);
}

FBP_INLINE vf64 vtanh_f64(vf64 x) {
    vf64 m = -2 * vabs_f64(x);
    m = vfloor_f64(m, -40.0);
    vf64 n;
    vi64 ni;
    const vf64 r = vreduce_ln2_f64(m, &n, &ni);
    vf64 q = vbcast_f64(1.14707455977297247e-11);
    q = q * r + 1.60590438368216133e-10;
    q = q * r + 2.08767569878681002e-09;
    q = q * r + 2.50521083854417202e-08;
    q = q * r + 2.75573192239858883e-07;
    q = q * r + 2.75573192239858925e-06;
    q = q * r + 2.48015873015873016e-05;
    q = q * r + 1.98412698412698413e-04;
    q = q * r + 1.38888888888888894e-03;
    q = q * r + 8.33333333333333322e-03;
    q = q * r + 4.16666666666666644e-02;
    q = q * r + 1.66666666666666657e-01;
    q = q * r + 0.5;
    vf64 p = r + r * r * q;
    vf64 s = vscale2_f64(vbcast_f64(1.0), n, ni);
    vf64 u = s * -p + (1 - s);
    return vwithsign_f64(u / (2 - u), x);
}

/* relu keeps NaN (as torch does) and maps -0 to +0. */
FBP_INLINE vf32 vrelu_f32(vf32 x) { return vselect_f32(x <= 0, vbcast_f32(0), x); }
FBP_INLINE vf64 vrelu_f64(vf64 x) { return vselect_f64(x <= 0, vbcast_f64(0), x); }

/* Lane lists for building constant shuffle masks: FBP_LANES_8(F, S) = F(0, S), ..., F(7, S). */
#define FBP_LANES_2(F, S) F(0, S), F(1, S)
#define FBP_LANES_4(F, S) FBP_LANES_2(F, S), F(2, S), F(3, S)
#define FBP_LANES_8(F, S) FBP_LANES_4(F, S), F(4, S), F(5, S), F(6, S), F(7, S)
#define FBP_LANES_16(F, S)                                                                         \
    FBP_LANES_8(F, S), F(8, S), F(9, S), F(10, S), F(11, S), F(12, S), F(13, S), F(14, S), F(15, S)

#endif /* FASTBP_SIMD_H */
