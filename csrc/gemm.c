/* GEMM with fused epilogue, BLIS-style: pack B panel -> pack A block -> macro-kernel over
 * MR x NR tiles -> register-blocked micro-kernel. The micro-kernel is written with vector
 * extensions, so each ISA object gets its own register tile from the table below; porting to a
 * new CPU is a new row in that table. Threads split the tiles of each block (M/N), never K, so
 * every C element is summed in the same order for any thread count.
 *
 *   C[m,n] = act(alpha * A'[m,k] @ B'[k,n] + beta * C + bias[n])
 *
 * This file is compiled once per ISA, and includes itself once per dtype (see kernel.h). */
#ifndef FBP_TEMPLATE_PASS
#include <omp.h>
#include <stdlib.h>
#include <tgmath.h> /* sqrt resolves to sqrtf for float (update.h) */

#include "kernel.h"

/* Block sizes, one row per ISA and dtype.
 *   MR x NR : register tile (MR broadcasts of A times NV vectors of B; MR*NV accumulators).
 *   KC      : depth of a packed panel. With GEMM_A_OUTER = 0 a KC x NR sliver of B stays in
 *             L1, MC x KC of A in L2 and KC x NC of B in L3; with GEMM_A_OUTER = 1 an MR x KC
 *             sliver of A stays in L1 and KC x NC of B in L2.
 *   MC      : rows of A packed at a time. With GEMM_A_OUTER = 1 one sliver (MR), packed right
 *             before its tiles, leaves the L2 to the B panel. */
#if defined(FBP_BUILD_AVX512)
/* 32 zmm registers: 12 x 2 accumulators + 2 B vectors + 1 broadcast. A 12 x 32 tile's B sliver
 * (KC x 32) alone would fill a 48 KiB L1, so the small A sliver is the one kept there
 * (GEMM_A_OUTER) and the B panel (KC x NC, 1.5 MB) is sized for L2: 1024^3 173 -> 191 GFLOP/s on
 * a Sapphire Rapids core. NC = 1024, not 768: each extra panel packs all of A again, and
 * n = 784 (W3's and W4's first-layer weight gradients) split as 768 + 16 did it for 16
 * columns; 1024^3 192 -> 205 GFLOP/s, W4's epoch 3.34 -> 3.18 s (interleaved A/B pairs).
 * MC = MR, not 480: a 480-row A block (660 KB at 1024^3's KC) packed ahead of its tiles shared
 * the L2 with the 1.4 MB B panel; 1024^3 1.3-2.9% faster at one thread and 1.6-3.3% at two,
 * 2048^3 1.4%, float64 1024^3 0.6-1.5%; 24 and 48 rows gained less; W3's and W4's epochs level
 * (C harness and interleaved fits). */
enum { GEMM_A_OUTER = 1, GEMM_TRANSPOSED_ROUTE = 1 };
enum { GEMM_MR_f32 = 12, GEMM_NV_f32 = 2, GEMM_MC_f32 = 12, GEMM_KC_f32 = 384, GEMM_NC_f32 = 1024 };
/* float64: the same bytes as float32's (an 18 KiB A sliver, a 1.5 MB B panel), so half the K
 * depth. It was KC 256 x NC 512 (1 MB): 1024^3 81-87 -> 88-95 GFLOP/s, 256 x 1024 x 1024
 * 78-84 -> 85-94 over interleaved rounds; a product of k in (192, 256] now takes two K blocks
 * (128 x 128 x 256: 114 -> 109). */
enum { GEMM_MR_f64 = 12, GEMM_NV_f64 = 2, GEMM_MC_f64 = 12, GEMM_KC_f64 = 192, GEMM_NC_f64 = 1024 };
#elif defined(FBP_BUILD_AVX2)
/* 16 ymm registers: 6 x 2 accumulators + 2 B vectors + 1 broadcast. The B sliver (KC x 16, 24 KiB)
 * stays in L1 while A slivers stream from the L2-resident A block. */
enum { GEMM_A_OUTER = 0, GEMM_TRANSPOSED_ROUTE = 0 };
enum { GEMM_MR_f32 = 6, GEMM_NV_f32 = 2, GEMM_MC_f32 = 144, GEMM_KC_f32 = 384, GEMM_NC_f32 = 4080 };
enum { GEMM_MR_f64 = 6, GEMM_NV_f64 = 2, GEMM_MC_f64 = 72, GEMM_KC_f64 = 256, GEMM_NC_f64 = 4080 };
#else
/* Baseline x86-64 (SSE2, 16 xmm) or any other CPU: 4 x 2 accumulators of 16 bytes. */
enum { GEMM_A_OUTER = 0, GEMM_TRANSPOSED_ROUTE = 0 };
enum { GEMM_MR_f32 = 4, GEMM_NV_f32 = 2, GEMM_MC_f32 = 128, GEMM_KC_f32 = 256, GEMM_NC_f32 = 4096 };
enum { GEMM_MR_f64 = 4, GEMM_NV_f64 = 2, GEMM_MC_f64 = 64, GEMM_KC_f64 = 256, GEMM_NC_f64 = 4096 };
#endif

/* B rows the micro-kernel prefetches ahead when its slivers stream from L2 (GEMM_A_OUTER:
 * 1024^3 198 -> 202 GFLOP/s, W3's first-layer products 1.5-3.5% faster, at 8 rows). 16 rows
 * ahead: W4's and 1024^3 products another 0.5-1.5% (three interleaved rounds), W3's level; 4
 * rows lost 1%, 24 matched 16. */
#define GEMM_PREFETCH_ROWS 16
/* Vectors ahead in each row that packing a transposed B (a Linear's W.T) asks for, when B is
 * over GEMM_PACK_AHEAD_MIN_BYTES: on a Zen 5 core (1 MB L2) W4's 256 x 1024 x 784 forward
 * 151-164 -> 186-190 GFLOP/s with W in L3, 122 -> 143-157 from memory (C harness, interleaved;
 * 2 and 8 vectors, and prefetching into L2 only, gained less); in W4's fit the first layer's
 * forward 2555-2747 -> 2241-2527 us a step (per-op profile, alternating processes), the epoch
 * 1-4% faster. W3's epoch (a 0.8 MB W.T) ran 3% slower with them, so they wait for a bigger B. */
#define GEMM_PACK_AHEAD 4
#define GEMM_PACK_AHEAD_MIN_BYTES (1 << 20)
/* Rows ahead that packing an indexed B (fit's shuffled batch in a weight gradient) asks for. */
#define GEMM_B_ROWS_AHEAD 4
/* The shallowest product fbp_gemm_dact fuses the activation backward into, unless dZ is at
 * least GEMM_DACT_SHALLOW_BYTES (see there). */
#define GEMM_DACT_MIN_K 32
#define GEMM_DACT_SHALLOW_BYTES (512 * 1024)
/* A transposed A is read in place (not packed) while its row stride in bytes times the B
 * slivers that reuse each of its slivers is at most this. Packing copied every value the tiles
 * multiply, the whole cost for a weight gradient of few outputs or inputs over a long batch:
 * in place (tools/gemm_ab.py, AVX-512, same bits) float32 64x16x512 1.20x, 100x13x512 1.24x,
 * 160x32x512 1.37x, 256x16x512 1.26x, 64x64x512 1.16x, 200x64x512 1.18x, 100x100x512 1.05x,
 * 128x128x128 1.01x; float64 64x16x512 1.34x, 256x13x512 1.35x, 64x64x512 1.06x. Past it, the
 * strided columns cost more than the copy: 256x100x256 1.00x, 128x256x128 0.98x, 512x128x512
 * 0.92x, 1024x16x512 0.87x, 256x784x128 (W3's first weight gradient) 0.83x. */
#define GEMM_A_COLUMNS_MAX_BYTES 2048
/* A thread is worth starting for this many multiply-adds (~5 us of one core's work). */
#define GEMM_THREAD_GRAIN_MACS (1 << 19)
/* The largest one-column product the direct path takes: the packed path would run it on at
 * most two threads, and the direct path was level with two (8192x1x256 on Zen 2) or faster. */
#define GEMM_DIRECT_COLUMN_MAX_MACS (2 * GEMM_THREAD_GRAIN_MACS)

static inline int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

#define FBP_TEMPLATE_PASS 1
#include "gemm.c"
#define FBP_DTYPE_F64 1
#include "kernel.h"
#include "gemm.c"

#else /* FBP_TEMPLATE_PASS: the body, once per dtype */

#define MR FBP_CAT(GEMM_MR_, SFX)
#define NV FBP_CAT(GEMM_NV_, SFX)
#define NR (NV * VL)
#define MC FBP_CAT(GEMM_MC_, SFX)
#define KC FBP_CAT(GEMM_KC_, SFX)
#define NC FBP_CAT(GEMM_NC_, SFX)

#include "pointwise.h"

/* The epilogue for `cnt` <= VL consecutive elements of one row of C. The first K block scales
 * the old C by beta (not reading it when beta == 0); later blocks add to it; the last block
 * adds the bias and applies the activation. */
FBP_INLINE void LFN(epilogue)(REAL *dst, VEC acc, int64_t cnt, const REAL *bias, REAL alpha,
                              REAL beta, int first, int last, fbp_activation act) {
    VEC x = acc * alpha;
    if (!first || beta != 0) {
        VEC old = V_(vload_n)(dst, cnt);
        x += first ? old * beta : old;
    }
    if (last) {
        if (bias) x += V_(vload_n)(bias, cnt);
        x = LFN(apply_act)(x, act);
    }
    V_(vstore_n)(dst, x, cnt);
}

/* The backward epilogue (fbp_gemm_dact): C's final value is dY, the gradient of an activation's
 * output y; stored is dZ = dY * act'(y), and dbias (when not NULL) accumulates dZ's column sums.
 * Tiles reach the epilogue in ascending row order for each column, so the sums add the rows in
 * the order activation_backward does. */
typedef struct {
    const REAL *y; /* like C: y[i * ldy + j] */
    int64_t ldy;
    REAL *dbias;
    fbp_activation act;
} LFN(dact);

/* Stores dZ for `cnt` elements of a row and returns it, for the caller's column sums. */
FBP_INLINE VEC LFN(epilogue_dact)(REAL *dst, VEC acc, int64_t cnt, const REAL *y, int first,
                                  fbp_activation act) {
    VEC x = acc;
    if (!first) x += V_(vload_n)(dst, cnt);
    const VEC g = LFN(act_grad)(x, V_(vload_n)(y, cnt), act);
    V_(vstore_n)(dst, g, cnt);
    return g;
}

#include "update.h"

/* The SGD epilogue (fbp_gemm_sgd): C's final value is a weight gradient, and each block of rows,
 * once final, is applied to the weights at the same places while it is still in this core's
 * cache. The separate pass over the flat buffer read every gradient back (W4: 22 MB per step)
 * and, on two threads, split the buffer differently from the product. Adam's update in the same
 * place streamed three arrays through L2 between the tiles and made W3's 2-thread epoch 2-3%
 * slower, so only plain SGD is fused. */
typedef struct {
    REAL *p; /* like C: p[i * ldc + j] */
    REAL lr, wd;
    int keep; /* store the gradient in C; else C may be left as it was (see band) */
    /* Without keep, the thread's MR x NC buffer that a one-K-block product's tiles go to instead
     * of C, a sliver band at a time (GEMM_A_OUTER); NULL stores into C. W3's and W4's steps wrote
     * 0.9 and 7 MB of gradients that nothing read: their weight-gradient products ran 2-5%
     * faster without (interleaved fits, per-op profile). */
    REAL *band;
} LFN(sgd);

/* Rows [i0, i1), columns [j0, j1) of the gradient are final, row i0 of them at g (row stride
 * ldg): update the weights there, row by row, in the optimizer kernel's floating-point mode and
 * with its per-element code. */
static void LFN(sgd_block)(const LFN(sgd) * u, const REAL *g, int64_t ldg, int64_t ldc, int64_t i0,
                           int64_t i1, int64_t j0, int64_t j1) {
    const unsigned fp_mode = fbp_fp_flush_enter();
    for (int64_t i = i0; i < i1; i++)
        LFN(sgd_body)(u->p + i * ldc + j0, NULL, g + (i - i0) * ldg, j1 - j0, u->lr, 0, 1, u->wd, 0,
                      0);
    fbp_fp_restore(fp_mode);
}

/* The update as one thread runs it: its band in its scratch (band_bytes there; none when 0). */
static inline LFN(sgd) LFN(sgd_band)(const LFN(sgd) * u, char *band, size_t band_bytes) {
    LFN(sgd) v = *u;
    v.band = u->keep || band_bytes == 0 ? NULL : (REAL *)band;
    return v;
}

/* The same for C + offset. */
static inline LFN(sgd)
    LFN(sgd_offset)(const LFN(sgd) * u, int64_t offset, char *band, size_t band_bytes) {
    LFN(sgd) v = LFN(sgd_band)(u, band, band_bytes);
    v.p += offset;
    return v;
}

/* 1 when none of `rows` rows of `cols` values (row stride rs) is NaN or infinite (finite_acc,
 * four sums to hide the FMA latency). fbp_gemm_check_a runs it over each A sliver while the
 * sliver is in L1 for its tiles; a pass of its own over W3's batch took 40 us a step. */
static int LFN(block_finite)(const REAL *x, int64_t rs, int64_t rows, int64_t cols) {
    const VEC zero = V_(vbcast)(0);
    VEC sum[4] = {zero, zero, zero, zero};
    for (int64_t r = 0; r < rows; r++) {
        const REAL *row = x + r * rs;
        int64_t j = 0;
        for (; j + 4 * VL <= cols; j += 4 * VL)
            for (int u = 0; u < 4; u++)
                sum[u] = LFN(finite_acc)(sum[u], V_(vload)(row + j + u * VL));
        for (; j < cols; j += VL)
            sum[0] = LFN(finite_acc)(sum[0], V_(vload_n)(row + j, min_i64(VL, cols - j)));
    }
    return LFN(acc_finite)((sum[0] + sum[1]) + (sum[2] + sum[3]));
}

#define FBP_LANES(F, S) FBP_CAT(FBP_LANES_, VLN)(F, S)
#define MASK_LO(l, S) (((l) & (S)) ? VLN + (l) - (S) : (l))
#define MASK_HI(l, S) (((l) & (S)) ? VLN + (l) : (l) + (S))
/* One stage of the block swap: rows i and i + S exchange their off-diagonal S-lane halves. */
#define TRANSPOSE_STAGE(r, S)                                                                      \
    do {                                                                                           \
        const IVEC lo = {FBP_LANES(MASK_LO, S)}, hi = {FBP_LANES(MASK_HI, S)};                     \
        _Pragma("GCC unroll 16") for (int i = 0; i < VLN; i++) {                                   \
            if (i & (S)) continue;                                                                 \
            VEC x = r[i], y = r[i + (S)];                                                          \
            r[i] = __builtin_shuffle(x, y, lo);                                                    \
            r[i + (S)] = __builtin_shuffle(x, y, hi);                                              \
        }                                                                                          \
    } while (0)

/* In-register transpose of a VL x VL block (Eklundh's recursive block swap, log2(VL) stages of
 * two-vector shuffles), so the transposing packs move whole vectors instead of scalars. */
FBP_INLINE void LFN(transpose_block)(VEC r[VLN]) {
#if defined(FBP_HAVE_VTRANSPOSE) /* AVX-512: see simd.h */
    V_(vtranspose)(r);
#else
#if VLN >= 16
    TRANSPOSE_STAGE(r, 8);
#endif
#if VLN >= 8
    TRANSPOSE_STAGE(r, 4);
#endif
#if VLN >= 4
    TRANSPOSE_STAGE(r, 2);
#endif
    TRANSPOSE_STAGE(r, 1);
#endif
}

/* A row-major operand whose rows are gathered through an index instead of a stride: row r at
 * base + idx[r] * rs. fit's shuffled batches are read straight from X this way, in the first
 * layer's products, instead of being copied into the workspace first (see train.c). Such an
 * operand is always packed: a: A's rows (m), b: B's rows (k); either may be NULL. */
typedef struct {
    const int64_t *a, *b;
} LFN(rows);

FBP_INLINE const REAL *LFN(row_at)(const REAL *base, const int64_t *idx, int64_t r, int64_t rs) {
    return base + (idx ? idx[r] : r) * rs;
}

/* Pack rows [i0, i0 + MR) x cols [0, kc) of A' into an MR-interleaved sliver, zero-padded. idx
 * (a row-major A only): row r of the sliver is row idx[r] of a. */
static void LFN(pack_a_sliver)(REAL *restrict dst, const REAL *a, int64_t rs, int64_t cs,
                               int64_t rows, int64_t kc, const int64_t *idx) {
    if (cs == 1) {
        int64_t p0 = 0;
        if (MR <= VL) { /* rows are contiguous: transpose VL x VL blocks of them */
            for (; p0 + VL <= kc; p0 += VL) {
                VEC r[VLN];
                /* rows past `rows` (a ragged last sliver) transpose as zeros: the padding */
#pragma GCC unroll 16
                for (int i = 0; i < VLN; i++)
                    r[i] = i < rows ? V_(vload)(LFN(row_at)(a, idx, i, rs) + p0) : V_(vbcast)(0);
                LFN(transpose_block)(r);
                /* r[q] holds the MR values of column p0 + q (then padding). A full-vector store
                 * spills padding into the next column's slots, which the next store rewrites;
                 * the sliver's last column is stored exactly. */
#pragma GCC unroll 16
                for (int64_t q = 0; q < VL; q++) {
                    if (p0 + q + 1 < kc && MR < VL)
                        V_(vstore)(dst + (p0 + q) * MR, r[q]);
                    else
                        V_(vstore_part)(dst + (p0 + q) * MR, r[q], MR);
                }
            }
        }
        for (int64_t r = 0; r < MR; r++) {
            const REAL *src = r < rows ? LFN(row_at)(a, idx, r, rs) : a;
            for (int64_t p = p0; p < kc; p++) dst[p * MR + r] = r < rows ? src[p] : 0;
        }
        return;
    }
    if (rs == 1) { /* A' is a transposed row-major matrix (dZ.T in a weight gradient): each
                    * column of the sliver is `rows` contiguous values, then padding. Vector
                    * copies instead of the scalar loop: W3's layer-1 weight gradient 274 -> 247
                    * us (C harness). */
        /* A full sliver whose MR is not a whole number of vectors (AVX2: 6 rows of 8 lanes)
         * is copied with whole vectors but for its last column: the extra lanes read the next
         * values of row p (or the start of row p + 1: in bounds when cs covers the vectors) and
         * spill into column p + 1's slots, which its own copy rewrites. AMD's masked loads and
         * stores are slow: on a Zen 2 core W3's weight gradients 128 x 256 x 128 and
         * 256 x 784 x 128 ran 7.7-8.1% and 1.8-3.0% faster (in-process A/B, two runs), W4's
         * 0.98-1.00, float64 level. AVX2 only: AVX-512's masked stores are ordinary stores. */
        int64_t p = 0;
        const int whole_vectors = FBP_VBYTES == 32 && MR % VL != 0;
        if (whole_vectors && rows == MR && cs >= round_up(MR, VL)) {
            for (; p + 1 < kc; p++) {
#pragma GCC unroll 4
                for (int64_t r = 0; r < MR; r += VL)
                    V_(vstore)(dst + p * MR + r, V_(vload)(a + p * cs + r));
            }
        }
        for (; p < kc; p++) {
            const REAL *src = a + p * cs;
            REAL *out = dst + p * MR;
#pragma GCC unroll 4
            for (int64_t r = 0; r < MR; r += VL) {
                const int64_t live = rows - r < 0 ? 0 : rows - r < VL ? rows - r : VL;
                const VEC v = live == VL ? V_(vload)(src + r) : V_(vload_part)(src + r, live);
                if (r + VL <= MR)
                    V_(vstore)(out + r, v);
                else
                    V_(vstore_part)(out + r, v, MR - r);
            }
        }
        return;
    }
    for (int64_t p = 0; p < kc; p++) {
        int64_t r = 0;
        for (; r < rows; r++) dst[p * MR + r] = a[r * rs + p * cs];
        for (; r < MR; r++) dst[p * MR + r] = 0;
    }
}

/* Pack rows [0, kc) x cols [j0, j0 + NR) of B' into an NR-wide sliver, zero-padded. idx (a
 * row-major B only): row p of the sliver is row idx[p] of b. far: B is too big to be in L2. */
static void LFN(pack_b_sliver)(REAL *restrict dst, const REAL *b, int64_t rs, int64_t cs,
                               int64_t cols, int64_t kc, const int64_t *idx, int far) {
    if (cs == 1) {
        if (cols == NR) {
            for (int64_t p = 0; p < kc; p++)
                memcpy(dst + p * NR, LFN(row_at)(b, idx, p, rs), NR * sizeof(REAL));
            return;
        }
        /* a ragged last sliver: masked loads, zeros after `cols`, whole-vector stores */
        for (int64_t p = 0; p < kc; p++) {
#pragma GCC unroll 4
            for (int64_t v = 0; v < NV; v++) {
                const int64_t live = cols - v * VL < 0    ? 0
                                     : cols - v * VL < VL ? cols - v * VL
                                                          : VL;
                V_(vstore)(dst + p * NR + v * VL,
                           V_(vload_part)(LFN(row_at)(b, idx, p, rs) + v * VL, live));
            }
        }
        return;
    }
    if (rs == 1) { /* B' is a transposed row-major matrix: transpose VL x VL blocks */
        /* VL rows of it at a time, down the whole K block: VL streams for the hardware
         * prefetcher to follow instead of NR (W3's and W4's forward products alone 2-4%
         * faster; inside fit, level) */
        const int64_t p_end = kc / VL * VL;
        for (int64_t v = 0; v < NV; v++) {
            for (int64_t p0 = 0; p0 < p_end; p0 += VL) {
                /* unrolled, so that r stays in registers (a loop kept it on the stack, and
                 * packing W.T cost 50 us of a W3 step); rows past `cols` transpose as zeros,
                 * which is the sliver's padding (a 10-class output layer's W.T is one sliver) */
                VEC r[VLN];
#pragma GCC unroll 16
                for (int i = 0; i < VLN; i++)
                    r[i] =
                        v * VL + i < cols ? V_(vload)(b + (v * VL + i) * cs + p0) : V_(vbcast)(0);
                /* VL rows are read side by side, one line each per step, more streams than
                 * the hardware prefetcher follows when B comes from L3 or memory (with the
                 * rows taken VL at a time, still 3-4% on W4's first forward) */
#pragma GCC unroll 16
                for (int i = 0; i < VLN; i++)
                    if (far && v * VL + i < cols)
                        __builtin_prefetch(b + (v * VL + i) * cs + p0 + GEMM_PACK_AHEAD * VL, 0, 3);
                if (v * VL < cols) LFN(transpose_block)(r);
#pragma GCC unroll 16
                for (int q = 0; q < VLN; q++) V_(vstore)(dst + (p0 + q) * NR + v * VL, r[q]);
            }
        }
        for (int64_t j = 0; j < cols; j++) {
            const REAL *src = b + j * cs;
            for (int64_t p = p_end; p < kc; p++) dst[p * NR + j] = src[p];
        }
        for (int64_t p = p_end; p < kc; p++)
            for (int64_t j = cols; j < NR; j++) dst[p * NR + j] = 0;
        return;
    }
    for (int64_t p = 0; p < kc; p++) {
        int64_t j = 0;
        for (; j < cols; j++) dst[p * NR + j] = b[p * rs + j * cs];
        for (; j < NR; j++) dst[p * NR + j] = 0;
    }
}

/* acc[MR][NV] = sum_p A[:, p] (outer) pb[p * ldb, :], A[i, p] at pa[i * a_rs + p * a_cs]: a
 * packed sliver (a_rs = 1, a_cs = MR) or a row-major A read in place (a_rs = its row stride,
 * a_cs = 1); B from a packed sliver (ldb = NR) or straight from a row-major B (ldb = its row
 * stride). Callers pass the packed strides as constants, so that case compiles as before. */
FBP_INLINE void LFN(micro_kernel)(VEC acc[MR][NV], const REAL *restrict pa, int64_t a_rs,
                                  int64_t a_cs, const REAL *restrict pb, int64_t kc, int64_t ldb,
                                  int rows, int nv) {
    VEC c[MR][NV];
#pragma GCC unroll 16
    for (int i = 0; i < rows; i++)
#pragma GCC unroll 4
        for (int v = 0; v < nv; v++) c[i][v] = V_(vbcast)(0);
    /* Rows in groups of three from one base pointer each (offsets 0, a_rs, 2 a_rs: x86's
     * base + index * 4 or 8 addressing), so an in-place A needs MR / 3 + 1 registers for its
     * addresses instead of one per row (which spilled to the stack). */
    const REAL *base[(MR + 2) / 3];
#pragma GCC unroll 16
    for (int g = 0; g < (rows + 2) / 3; g++) base[g] = pa + 3 * g * a_rs;
    /* AVX2: four K steps per trip, so one set of pointer updates and one loop branch serve
     * four steps' FMAs. On a Zen 2 core (AVX2 only) float32 0-3% faster over W3's and W4's
     * products and 1024^3 at one thread (in-process A/B, two runs of 15 rounds), float64 0-3%
     * (one run of 11), two threads within +-2.5%. AVX-512's in-place A loop gained nothing
     * from unrolling by 2 (GCC keeps its pointer adds). */
#if defined(FBP_BUILD_AVX2)
#pragma GCC unroll 4
#endif
    for (int64_t p = 0; p < kc; p++) {
        VEC bv[NV];
#pragma GCC unroll 4
        for (int v = 0; v < nv; v++) bv[v] = V_(vload)(pb + v * VL);
        if (GEMM_A_OUTER) { /* B streams from L2; else its sliver stays in L1 (AVX2: 1024^3
                             * 118 -> 111 GFLOP/s with the prefetches) */
#pragma GCC unroll 4
            for (int v = 0; v < nv; v++)
                __builtin_prefetch(pb + GEMM_PREFETCH_ROWS * ldb + v * VL, 0, 3);
        }
#pragma GCC unroll 16
        for (int i = 0; i < rows; i++) {
            VEC ai = V_(vbcast)(base[i / 3][(i % 3) * a_rs]);
#pragma GCC unroll 4
            for (int v = 0; v < nv; v++) c[i][v] += ai * bv[v];
        }
#pragma GCC unroll 16
        for (int g = 0; g < (rows + 2) / 3; g++) base[g] += a_cs;
        pb += ldb;
    }
#pragma GCC unroll 16
    for (int i = 0; i < rows; i++)
#pragma GCC unroll 4
        for (int v = 0; v < nv; v++) acc[i][v] = c[i][v];
}

/* Edge tiles: the ragged last A sliver multiplies only its `rows` (< MR) rows, not the zero
 * padding (W3's batch of 128 = 10 x 12 + 8 rows: the padded sliver cost 5% of a layer's
 * product), and a tile at most one vector wide (the 10 outputs of a classifier) only its first
 * B vector. One copy per case, so each keeps its accumulators in registers. */
#define EDGE_ROWS(R)                                                                               \
    case R:                                                                                        \
        if (narrow)                                                                                \
            LFN(micro_kernel)(acc, pa, a_rs, a_cs, pb, kc, ldb, (R) < MR ? (R) : MR, 1);           \
        else                                                                                       \
            LFN(micro_kernel)(acc, pa, a_rs, a_cs, pb, kc, ldb, (R) < MR ? (R) : MR, NV);          \
        break
static void LFN(edge_kernel)(VEC acc[MR][NV], const REAL *restrict pa, int64_t a_rs, int64_t a_cs,
                             const REAL *restrict pb, int64_t kc, int64_t ldb, int64_t rows,
                             int64_t cols) {
    const int narrow = cols <= VL;
    switch (rows) {
        EDGE_ROWS(1);
        EDGE_ROWS(2);
        EDGE_ROWS(3);
        EDGE_ROWS(4);
        EDGE_ROWS(5);
        EDGE_ROWS(6);
        EDGE_ROWS(7);
        EDGE_ROWS(8);
        EDGE_ROWS(9);
        EDGE_ROWS(10);
        EDGE_ROWS(11);
    default:
        if (narrow)
            LFN(micro_kernel)(acc, pa, a_rs, a_cs, pb, kc, ldb, MR, 1);
        else
            LFN(micro_kernel)(acc, pa, a_rs, a_cs, pb, kc, ldb, MR, NV);
    }
}
#undef EDGE_ROWS

/* A whole MR x NR tile, the micro-kernel and the shared epilogue inlined into one piece so the
 * accumulators go from the FMAs to C without a trip through memory. `act` is a constant in each
 * caller below, so every activation gets its own copy with the switch folded away. */
FBP_INLINE void LFN(full_tile_act)(REAL *c, int64_t ldc, const REAL *restrict pa, int64_t a_rs,
                                   int64_t a_cs, const REAL *restrict pb, int64_t ldb, int64_t kc,
                                   const REAL *bias, REAL alpha, REAL beta, int first, int last,
                                   fbp_activation act) {
    VEC acc[MR][NV];
    /* alpha and beta go to memory here, so the loop below keeps all 16 ymm registers on AVX2:
     * held in xmm0/xmm1 they pushed one of the twelve float64 accumulators onto the stack, and
     * every K step waited on that store and reload (1024^3 float64 36 -> 52 GFLOP/s on AVX2;
     * float32 and AVX-512 unchanged). */
    __asm__("" : "+m"(alpha), "+m"(beta));
    LFN(micro_kernel)(acc, pa, a_rs, a_cs, pb, kc, ldb, MR, NV);
#pragma GCC unroll 16
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++)
            LFN(epilogue)(c + i * ldc + v * VL, acc[i][v], VL, bias ? bias + v * VL : NULL, alpha,
                          beta, first, last, act);
}

/* One copy per activation, and per A layout: a_rs == 0 is a packed A sliver, else A is read in
 * place with row stride a_rs. */
#define FULL_TILE_CASE(ACT)                                                                        \
    do {                                                                                           \
        if (a_rs == 0)                                                                             \
            LFN(full_tile_act)(c, ldc, pa, 1, MR, pb, ldb, kc, bias, alpha, beta, first, last,     \
                               ACT);                                                               \
        else                                                                                       \
            LFN(full_tile_act)(c, ldc, pa, a_rs, 1, pb, ldb, kc, bias, alpha, beta, first, last,   \
                               ACT);                                                               \
    } while (0)
static void LFN(full_tile)(REAL *c, int64_t ldc, const REAL *restrict pa, int64_t a_rs,
                           const REAL *restrict pb, int64_t ldb, int64_t kc, const REAL *bias,
                           REAL alpha, REAL beta, int first, int last, fbp_activation act) {
    switch (last ? act : FBP_ACT_IDENTITY) {
    case FBP_ACT_SIGMOID:
        FULL_TILE_CASE(FBP_ACT_SIGMOID);
        break;
    case FBP_ACT_RELU:
        FULL_TILE_CASE(FBP_ACT_RELU);
        break;
    case FBP_ACT_TANH:
        FULL_TILE_CASE(FBP_ACT_TANH);
        break;
    default:
        FULL_TILE_CASE(FBP_ACT_IDENTITY);
    }
}
#undef FULL_TILE_CASE

/* A whole tile's last K block under the backward epilogue; one copy per activation and A
 * layout, as for full_tile. (i, j): the tile's place in C, for y and dbias. */
FBP_INLINE void LFN(full_tile_dact_act)(REAL *c, int64_t ldc, const REAL *restrict pa, int64_t a_rs,
                                        int64_t a_cs, const REAL *restrict pb, int64_t ldb,
                                        int64_t kc, int first, const REAL *y, int64_t ldy, REAL *db,
                                        fbp_activation act) {
    VEC acc[MR][NV];
    LFN(micro_kernel)(acc, pa, a_rs, a_cs, pb, kc, ldb, MR, NV);
#pragma GCC unroll 16
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++)
            acc[i][v] = LFN(epilogue_dact)(c + i * ldc + v * VL, acc[i][v], VL,
                                           y + i * ldy + v * VL, first, act);
    if (!db) return;
    /* the rows in order onto the running sums, in registers: (((db + g0) + g1) + ...) */
#pragma GCC unroll 4
    for (int v = 0; v < NV; v++) {
        VEC sum = V_(vload)(db + v * VL);
#pragma GCC unroll 16
        for (int i = 0; i < MR; i++) sum += acc[i][v];
        V_(vstore)(db + v * VL, sum);
    }
}

#define DACT_TILE_CASE(ACT)                                                                        \
    do {                                                                                           \
        if (a_rs == 0)                                                                             \
            LFN(full_tile_dact_act)(c, ldc, pa, 1, MR, pb, ldb, kc, first, y, ldy, db, ACT);       \
        else                                                                                       \
            LFN(full_tile_dact_act)(c, ldc, pa, a_rs, 1, pb, ldb, kc, first, y, ldy, db, ACT);     \
    } while (0)
static void LFN(full_tile_dact)(REAL *c, int64_t ldc, const REAL *restrict pa, int64_t a_rs,
                                const REAL *restrict pb, int64_t ldb, int64_t kc, int first,
                                const REAL *y, int64_t ldy, REAL *db, fbp_activation act) {
    switch (act) {
    case FBP_ACT_SIGMOID:
        DACT_TILE_CASE(FBP_ACT_SIGMOID);
        break;
    case FBP_ACT_RELU:
        DACT_TILE_CASE(FBP_ACT_RELU);
        break;
    case FBP_ACT_TANH:
        DACT_TILE_CASE(FBP_ACT_TANH);
        break;
    default:
        DACT_TILE_CASE(FBP_ACT_IDENTITY);
    }
}
#undef DACT_TILE_CASE

static void LFN(store_tile)(REAL *c, int64_t ldc, int64_t rows, int64_t cols, VEC acc[MR][NV],
                            const REAL *bias, REAL alpha, REAL beta, int first, int last,
                            fbp_activation act, const LFN(dact) * dact, int64_t tile_i,
                            int64_t tile_j) {
    if (dact && last) { /* the backward epilogue; (tile_i, tile_j): the tile's place in C */
        for (int64_t v = 0; v < NV && v * VL < cols; v++) {
            const int64_t cnt = min_i64(VL, cols - v * VL);
            REAL *db = dact->dbias ? dact->dbias + tile_j + v * VL : NULL;
            VEC sum = db ? V_(vload_n)(db, cnt) : V_(vbcast)(0);
            for (int64_t i = 0; i < rows; i++)
                sum += LFN(epilogue_dact)(c + i * ldc + v * VL, acc[i][v], cnt,
                                          dact->y + (tile_i + i) * dact->ldy + tile_j + v * VL,
                                          first, dact->act);
            if (db) V_(vstore_n)(db, sum, cnt);
        }
        return;
    }
    for (int64_t i = 0; i < rows; i++) {
        for (int64_t v = 0; v < NV && v * VL < cols; v++) {
            int64_t j0 = v * VL;
            LFN(epilogue)(c + i * ldc + j0, acc[i][v], min_i64(VL, cols - j0),
                          bias ? bias + j0 : NULL, alpha, beta, first, last, act);
        }
    }
}

/* `rows` (1..8, a constant in each caller) rows of C, columns [j0, j0 + cnt): the accumulators
 * stay in registers because every loop bound but K is known. K is summed in order, one FMA per
 * step, as in the packed path, so both paths give the same bits. */
FBP_INLINE void LFN(direct_rows)(REAL *c, const REAL *a, const REAL *b, const REAL *bias_j,
                                 int rows, int64_t cnt, int64_t k, int64_t rs_a, int64_t cs_a,
                                 int64_t rs_b, int64_t cs_b, int64_t ldc, REAL alpha, REAL beta,
                                 fbp_activation act, const LFN(dact) * dact, int64_t tile_i,
                                 int64_t tile_j) {
    VEC acc[8];
    for (int r = 0; r < rows; r++) acc[r] = V_(vbcast)(0);
    const int gather = cs_b != 1 && cnt > 1 && vgather_ok(cs_b);
    for (int64_t p = 0; p < k; p++) {
        const REAL *brow = b + p * rs_b;
        VEC bv;
        if (cs_b == 1) {
            bv = V_(vload_n)(brow, cnt);
        } else if (cnt == 1) {
            bv = V_(vload_first)(brow);
        } else if (gather) {
            bv = V_(vgather_part)(brow, cs_b, cnt);
        } else {
            bv = V_(vbcast)(0);
            for (int64_t j = 0; j < cnt; j++) bv[j] = brow[j * cs_b];
        }
        for (int r = 0; r < rows; r++) acc[r] += V_(vbcast)(a[r * rs_a + p * cs_a]) * bv;
    }
    if (dact) {
        REAL *db = dact->dbias ? dact->dbias + tile_j : NULL;
        VEC sum = db ? V_(vload_n)(db, cnt) : V_(vbcast)(0);
        for (int r = 0; r < rows; r++)
            sum += LFN(epilogue_dact)(c + r * ldc, acc[r], cnt,
                                      dact->y + (tile_i + r) * dact->ldy + tile_j, 1, dact->act);
        if (db) V_(vstore_n)(db, sum, cnt);
        return;
    }
    for (int r = 0; r < rows; r++)
        LFN(epilogue)(c + r * ldc, acc[r], cnt, bias_j, alpha, beta, 1, 1, act);
}

/* VL rows of a one-column product with A row-major (a one-output layer's forward x @ w.T),
 * rows i of C at c[i * ldc]: each VL x VL block of A is transposed in registers, so that every
 * FMA fills all lanes, one row per lane, where direct_rows' eight chains carry one lane each.
 * Each row's K terms in order, one FMA each, and the epilogue's own code on the VL results:
 * the same bits (see exact_scaling in gemm_direct). tools/gemm_ab.py, AVX-512, same bits:
 * float32 512x1x64 (w.T) 2.99x, 256x1x32 1.96x, 512x1x100 3.13x, 128x1x256 3.32x, 1000x1x300
 * 4.19x, 100x1x100 (w a column) 2.08x; float64 512x1x64 2.60x. */
static void LFN(direct_column)(REAL *c, const REAL *a, const REAL *b, const REAL *bias, int64_t k,
                               int64_t rs_a, int64_t rs_b, int64_t ldc, REAL alpha, REAL beta,
                               fbp_activation act) {
    VEC acc = V_(vbcast)(0);
    for (int64_t p0 = 0; p0 < k; p0 += VL) {
        const int64_t live = min_i64(VL, k - p0);
        VEC r[VLN];
#pragma GCC unroll 16
        for (int i = 0; i < VLN; i++)
            r[i] =
                live == VL ? V_(vload)(a + i * rs_a + p0) : V_(vload_part)(a + i * rs_a + p0, live);
        LFN(transpose_block)(r); /* r[q]: column p0 + q of the VL rows */
        if (live == VL) {
#pragma GCC unroll 16
            for (int q = 0; q < VLN; q++) acc += r[q] * V_(vbcast)(b[(p0 + q) * rs_b]);
        } else {
            for (int q = 0; q < live; q++) acc += r[q] * V_(vbcast)(b[(p0 + q) * rs_b]);
        }
    }
    REAL out[VLN], bias_lanes[VLN];
    for (int i = 0; i < VLN; i++) {
        out[i] = beta != 0 ? c[i * ldc] : 0;
        bias_lanes[i] = bias ? bias[0] : 0;
    }
    LFN(epilogue)(out, acc, VL, bias ? bias_lanes : NULL, alpha, beta, 1, 1, act);
    for (int i = 0; i < VLN; i++) c[i * ldc] = out[i];
}

/* Small problems: no packing, no threads, no scratch. Four rows at a time for independent
 * FMA chains; eight for a single column (a one-output layer's x @ w.T, its column of w strided),
 * whose chains carry one lane each. With its lane loaded rather than gathered, 8-64-1 regression
 * with Adam, batch 128, 1 thread on Zen 2: 33.4 -> 22.2 us a step; GEMM 128x1x100 (w strided) 3.2x,
 * 100x1x100 with B contiguous 1.1x (tools/gemm_ab.py, the same bits). */
static void LFN(gemm_direct)(REAL *c, const REAL *a, const REAL *b, const REAL *bias, int64_t m,
                             int64_t n, int64_t k, int64_t rs_a, int64_t cs_a, int64_t rs_b,
                             int64_t cs_b, int64_t ldc, REAL alpha, REAL beta, fbp_activation act,
                             const LFN(dact) * dact) {
    /* direct_column's epilogue runs on VL results at once: with alpha 1 and beta 0 or 1 every
     * product in it is exact, so its bits cannot depend on which multiply the compiler fused
     * into an add there and which in direct_rows' copy (with both scalings free, they did) */
    const int exact_scaling = alpha == 1 && (beta == 0 || beta == 1);
    for (int64_t j0 = 0; j0 < n; j0 += VL) {
        const int64_t cnt = min_i64(VL, n - j0);
        const REAL *bias_j = bias ? bias + j0 : NULL;
        const REAL *bj = b + j0 * cs_b;
        int64_t i0 = 0;
        for (; n == 1 && cs_a == 1 && !dact && exact_scaling && i0 + VL <= m; i0 += VL)
            LFN(direct_column)(c + i0 * ldc, a + i0 * rs_a, bj, bias_j, k, rs_a, rs_b, ldc, alpha,
                               beta, act);
        for (; cnt == 1 && i0 + 8 <= m; i0 += 8) /* one lane of each: twice the FMA chains */
            LFN(direct_rows)(c + i0 * ldc + j0, a + i0 * rs_a, bj, bias_j, 8, cnt, k, rs_a, cs_a,
                             rs_b, cs_b, ldc, alpha, beta, act, dact, i0, j0);
        for (; i0 < m; i0 += 4) {
            REAL *ci = c + i0 * ldc + j0;
            const REAL *ai = a + i0 * rs_a;
            switch (min_i64(4, m - i0)) {
            case 4:
                LFN(direct_rows)(ci, ai, bj, bias_j, 4, cnt, k, rs_a, cs_a, rs_b, cs_b, ldc, alpha,
                                 beta, act, dact, i0, j0);
                break;
            case 3:
                LFN(direct_rows)(ci, ai, bj, bias_j, 3, cnt, k, rs_a, cs_a, rs_b, cs_b, ldc, alpha,
                                 beta, act, dact, i0, j0);
                break;
            case 2:
                LFN(direct_rows)(ci, ai, bj, bias_j, 2, cnt, k, rs_a, cs_a, rs_b, cs_b, ldc, alpha,
                                 beta, act, dact, i0, j0);
                break;
            default:
                LFN(direct_rows)(ci, ai, bj, bias_j, 1, cnt, k, rs_a, cs_a, rs_b, cs_b, ldc, alpha,
                                 beta, act, dact, i0, j0);
            }
        }
    }
}

/* K split into equal blocks of at most KC (rounded to 8): k = 784 becomes 4 x 196, not
 * 3 x 256 + 16, whose last thin block would pay a full C-tile load/store for little work. */
static inline int64_t LFN(balanced_kc)(int64_t k) {
    const int64_t blocks = (k + KC - 1) / KC;
    const int64_t kc = ((k + blocks - 1) / blocks + 7) / 8 * 8;
    return kc < KC ? kc : KC;
}

/* Asks for `rows` rows of kc values of an in-place A sliver to be brought into L2; idx: rows
 * idx[0], idx[1], ... of a (an indexed A, see LFN(rows)). */
FBP_INLINE void LFN(prefetch_sliver)(const REAL *a, int64_t rs, int64_t rows, int64_t kc,
                                     const int64_t *idx) {
    for (int64_t r = 0; r < rows; r++) {
        const char *row = (const char *)LFN(row_at)(a, idx, r, rs);
        for (int64_t off = 0; off < kc * (int64_t)sizeof(REAL); off += 64)
            __builtin_prefetch(row + off, 0, 1);
    }
}

/* C (m x n) on the calling thread, packing into its own buffers: the loops over NC panels, KC
 * blocks and MC blocks around the MR x NR tiles. fetch_a: fetch each in-place A sliver one
 * sliver ahead, for an A that may sit in another core's cache. a_finite (not NULL): check each
 * A sliver (as the micro-kernel reads it, in place or packed) once, in the first panel, storing
 * 0 there on a NaN or infinity. */
static void LFN(gemm_blocked)(REAL *c, const REAL *a, const REAL *b, const REAL *bias, int64_t m,
                              int64_t n, int64_t k, int64_t rs_a, int64_t cs_a, int64_t rs_b,
                              int64_t cs_b, int64_t ldc, REAL alpha, REAL beta, fbp_activation act,
                              REAL *packed_b, REAL *packed_a, int fetch_a, const LFN(dact) * dact,
                              const LFN(sgd) * sgd, int *a_finite, const LFN(rows) * through) {
    const int64_t kc_step = LFN(balanced_kc)(k);
    const int64_t *a_idx = through ? through->a : NULL, *b_idx = through ? through->b : NULL;
    /* A row-major B is read in place, not packed, when its slivers stream from L2 anyway
     * (GEMM_A_OUTER): packing was ~8% of a W3-sized GEMM. Whole slivers only; the ragged last
     * one is packed (zero padding). Not for rows a multiple of 4 KiB apart (every row of a
     * sliver in the same L1 set: 1024^3 fell from 193 to 116 GFLOP/s), nor for rows far apart
     * (a page per row), nor for tall C: packing's cost shrinks with m while strided reads cost
     * per A sliver (m = 1024 x 784 x 256: 189 -> 178 in place; m = 128 x 784 x 256: 182 -> 193). */
    const size_t b_row_bytes = (size_t)rs_b * sizeof(REAL);
    /* An operand each of whose slivers is used once (C one sliver tall for B, one sliver wide
     * for A: a 10-class layer's products) gains nothing from packing, and with no reuse the L1
     * set conflicts of 4 KiB rows do not matter: W4's 10 x 1024 x 256 weight gradient and
     * 256 x 10 x 1024 forward packed 1 MB each for 2.6M multiply-adds. */
    const int b_used_once = m <= MR, a_used_once = n <= NR;
    /* Rows that start on cache lines are read as whole lines, and stay ahead of packing up to
     * twice as tall a C: 256 x 784 x 128 (W3's first weight gradient) 215 -> 221 GFLOP/s,
     * 384 x 784 x 256 214 -> 220, level at 512 rows, behind at 1024; rows off the line grid
     * lost 2% at 256 rows. */
    const int b_lines = b_row_bytes % 64 == 0 && (uintptr_t)b % 64 == 0;
    const int direct_b = GEMM_A_OUTER && cs_b == 1 && (b_row_bytes % 4096 != 0 || b_used_once) &&
                         b_row_bytes < 16384 && m <= (b_lines ? 32 : 16) * MR && !b_idx;
    /* A row-major A is read in place too (BLIS's "sup"): its MR x KC sliver is the operand kept
     * in L1 (GEMM_A_OUTER), as rows instead of an interleaved copy. Same conditions on the row
     * stride as for B; full slivers only. */
    const size_t a_row_bytes = (size_t)rs_a * sizeof(REAL);
    const int direct_a = GEMM_A_OUTER && cs_a == 1 && (a_row_bytes % 4096 != 0 || a_used_once) &&
                         a_row_bytes < 16384 && !a_idx;
    /* A transposed A (dZ.T in a weight gradient: a sliver's column p is MR consecutive values
     * of dZ's row p) is read in place too, column by column, when the rows it crosses are short
     * and few B slivers reuse it (see GEMM_A_COLUMNS_MAX_BYTES). Its tiles go through the edge
     * kernel, which takes any A strides; the same FMAs in the same order, so the same bits. */
    const int direct_at =
        GEMM_A_OUTER && rs_a == 1 && cs_a != 1 && !a_idx && !a_finite &&
        fbp_get_transposed_a_paths() &&
        (double)cs_a * sizeof(REAL) * (double)((n + NR - 1) / NR) <= GEMM_A_COLUMNS_MAX_BYTES;
    /* An indexed A's whole slivers are copied as rows (row stride kc) into the packing buffer
     * and read like an in-place A: the copy reads the rows through the index as packing does,
     * without its transposes (kc * 4 bytes, at most KC's, is never a multiple of 4 KiB). */
    const int a_rows_copied = GEMM_A_OUTER && a_idx != NULL && cs_a == 1;
    const int b_far = (double)n * (double)k * sizeof(REAL) > GEMM_PACK_AHEAD_MIN_BYTES;
    /* the gradient need not reach C: with one K block each tile is final when computed */
    REAL *band = GEMM_A_OUTER && sgd && sgd->band && k <= kc_step ? sgd->band : NULL;
    {
        VEC acc[MR][NV];
        for (int64_t jc = 0; jc < n; jc += NC) {
            const int64_t nc = min_i64(NC, n - jc);
            const int64_t n_bs = (nc + NR - 1) / NR; /* B slivers in this panel */
            for (int64_t pc = 0; pc < k; pc += kc_step) {
                const int64_t kc = min_i64(kc_step, k - pc);
                const int first = pc == 0, last = pc + kc == k;
                /* The whole slivers of a row-major B, row by row: each source row is read once,
                 * front to back, instead of as NR-wide strips one row stride apart, which cross
                 * a page per row where the hardware prefetcher does not follow (1024^3: the
                 * strip copy was 3.5% of the product). */
                const int64_t b_rowwise = cs_b == 1 && !direct_b ? nc / NR : 0;
                if (b_rowwise > 0) {
                    for (int64_t p = 0; p < kc; p++) {
                        const REAL *src = LFN(row_at)(b, b_idx, pc + p, rs_b) + jc;
                        /* an indexed B's rows are scattered: ask for one a few rows ahead */
                        if (b_idx && p + GEMM_B_ROWS_AHEAD < kc)
                            LFN(prefetch_sliver)(b + jc, rs_b, 1, b_rowwise * NR,
                                                 b_idx + pc + p + GEMM_B_ROWS_AHEAD);
                        for (int64_t s = 0; s < b_rowwise; s++)
                            memcpy(packed_b + s * NR * kc + p * NR, src + s * NR,
                                   NR * sizeof(REAL));
                    }
                }
                for (int64_t s = b_rowwise; s < n_bs; s++) {
                    if (direct_b && (s + 1) * NR <= nc) continue; /* read in place */
                    LFN(pack_b_sliver)(
                        packed_b + s * NR * kc, (b_idx ? b : b + pc * rs_b) + (jc + s * NR) * cs_b,
                        rs_b, cs_b, min_i64(NR, nc - s * NR), kc, b_idx ? b_idx + pc : NULL, b_far);
                }
                for (int64_t ic = 0; ic < m; ic += MC) {
                    const int64_t mc = min_i64(MC, m - ic);
                    const int64_t n_as = (mc + MR - 1) / MR;
                    for (int64_t s = 0; s < n_as; s++) {
                        if ((direct_a || direct_at) && (s + 1) * MR <= mc)
                            continue; /* read in place */
                        if (a_rows_copied && (s + 1) * MR <= mc) {
                            for (int64_t r = 0; r < MR; r++)
                                memcpy(packed_a + s * MR * kc + r * kc,
                                       a + a_idx[ic + s * MR + r] * rs_a + pc,
                                       (size_t)kc * sizeof(REAL));
                            continue;
                        }
                        LFN(pack_a_sliver)(packed_a + s * MR * kc,
                                           (a_idx ? a : a + (ic + s * MR) * rs_a) + pc * cs_a, rs_a,
                                           cs_a, min_i64(MR, mc - s * MR), kc,
                                           a_idx ? a_idx + ic + s * MR : NULL);
                    }
                    /* GEMM_A_OUTER: each A sliver stays in L1 while the B slivers stream from
                     * the L2-resident panel; else each B sliver stays while A streams. */
                    const int64_t outer_n = GEMM_A_OUTER ? n_as : n_bs;
                    const int64_t inner_n = GEMM_A_OUTER ? n_bs : n_as;
                    for (int64_t o = 0; o < outer_n; o++) {
                        /* An activation the other thread wrote is in its cache, modified, and a
                         * sliver's first B tile waited on each line of it in turn: fetching it
                         * ahead, at one line per prefetch, overlaps those transfers (W3's
                         * 128 x 128 x 256 forward at 2 threads, its A written by the other core:
                         * 37 -> 32 us). Not on one thread: an A in this core's L2 gains nothing and
                         * paid 2-5% for the extra instructions. The next sliver may start the next
                         * MC block (one sliver each, with GEMM_A_OUTER); a full one is read in
                         * place. */
                        for (int64_t ahead = ic == 0 && o == 0 ? 0 : 1;
                             GEMM_A_OUTER && fetch_a && direct_a && ahead <= 1; ahead++) {
                            const int64_t i1 = ic + (o + ahead) * MR;
                            if (i1 + MR <= m)
                                LFN(prefetch_sliver)(a + i1 * rs_a + pc, rs_a, MR, kc, NULL);
                        }
                        /* An indexed A's rows are scattered over memory (fit's shuffled batch
                         * in X), and packing a sliver waited on each of them: ask for the next
                         * sliver's (or the next K block's first) while this one computes. */
                        if (GEMM_A_OUTER && a_idx) {
                            const int64_t i1 = ic + (o + 1) * MR;
                            if (i1 < m)
                                LFN(prefetch_sliver)(a + pc, rs_a, min_i64(MR, m - i1), kc,
                                                     a_idx + i1);
                            else if (pc + kc < k)
                                LFN(prefetch_sliver)(a + pc + kc, rs_a, min_i64(MR, m),
                                                     min_i64(kc_step, k - pc - kc), a_idx);
                        }
                        for (int64_t u = 0; u < inner_n; u++) {
                            const int64_t ir = GEMM_A_OUTER ? o : u;
                            const int64_t jr = GEMM_A_OUTER ? u : o;
                            const int64_t i = ic + ir * MR, rows = min_i64(MR, m - i);
                            const int64_t j = jc + jr * NR, cols = min_i64(NR, n - j);
                            REAL *ct = band ? band + (j - jc) : c + i * ldc + j;
                            const int64_t ldt = band ? NC : ldc;
                            /* The C tile is read (or written) right after the FMAs: fetch it
                             * now so the misses overlap the arithmetic. */
                            for (int64_t r = 0; r < rows && !band; r++) {
                                __builtin_prefetch(c + (i + r) * ldc + j, 1, 3);
                                __builtin_prefetch(c + (i + r) * ldc + j + cols - 1, 1, 3);
                            }
                            const int a_copied = a_rows_copied && (ir + 1) * MR <= mc;
                            const int a_in_place = (direct_a && (ir + 1) * MR <= mc) || a_copied;
                            const int a_columns = direct_at && (ir + 1) * MR <= mc;
                            const REAL *pa = a_columns                 ? a + i + pc * cs_a
                                             : a_in_place && !a_copied ? a + i * rs_a + pc
                                                                       : packed_a + ir * MR * kc;
                            const int64_t a_rs = a_copied ? kc : a_in_place ? rs_a : 0;
                            const int b_in_place = direct_b && (jr + 1) * NR <= nc;
                            const REAL *pb =
                                b_in_place ? b + pc * rs_b + j : packed_b + jr * NR * kc;
                            const int64_t ldb = b_in_place ? rs_b : NR;
                            const REAL *bias_j = bias ? bias + j : NULL;
                            /* at the second B sliver's tile, the first having brought the A
                             * sliver into L1: checked before it, the check waited on memory
                             * alone (W3's first-layer forward +6 us a step); here the forward
                             * runs as fast as unchecked (per-op profile, within 3 us) */
                            if (a_finite && jc == 0 && jr == min_i64(1, n_bs - 1) &&
                                !(a_in_place ? LFN(block_finite)(pa, a_rs, rows, kc)
                                             : LFN(block_finite)(pa, 0, 1, MR * kc)))
                                __atomic_store_n(a_finite, 0, __ATOMIC_RELAXED);
                            if (rows == MR && cols == NR && dact && last && !a_columns) {
                                LFN(full_tile_dact)(c + i * ldc + j, ldc, pa, a_rs, pb, ldb, kc,
                                                    first, dact->y + i * dact->ldy + j, dact->ldy,
                                                    dact->dbias ? dact->dbias + j : NULL,
                                                    dact->act);
                                continue;
                            }
                            if (rows == MR && cols == NR && !a_columns) {
                                LFN(full_tile)(ct, ldt, pa, a_rs, pb, ldb, kc, bias_j, alpha, beta,
                                               first, last, act);
                                continue;
                            }
                            if (a_columns)
                                LFN(edge_kernel)(acc, pa, 1, cs_a, pb, kc, ldb, MR, cols);
                            else if (a_in_place)
                                LFN(edge_kernel)(acc, pa, a_rs, 1, pb, kc, ldb, MR, cols);
                            else
                                LFN(edge_kernel)(acc, pa, 1, MR, pb, kc, ldb, rows, cols);
                            LFN(store_tile)(ct, ldt, rows, cols, acc, bias_j, alpha, beta, first,
                                            last, act, dact, i, j);
                        }
                        /* GEMM_A_OUTER: this sliver's rows of the panel are final */
                        if (sgd && last && GEMM_A_OUTER) {
                            const int64_t i0 = ic + o * MR, i1 = min_i64(i0 + MR, m);
                            if (band)
                                LFN(sgd_block)(sgd, band, NC, ldc, i0, i1, jc, jc + nc);
                            else
                                LFN(sgd_block)(sgd, c + i0 * ldc + jc, ldc, ldc, i0, i1, jc,
                                               jc + nc);
                        }
                    }
                    if (sgd && last && !GEMM_A_OUTER)
                        LFN(sgd_block)(sgd, c + ic * ldc + jc, ldc, ldc, ic, ic + mc, jc, jc + nc);
                }
            }
        }
    }
}

/* Threads split C into contiguous column ranges of whole NR slivers (or, when that balances
 * worse, row ranges of whole MR slivers) and each computes its block alone, packing what it reads
 * into its own buffers: no barriers and no packed data crossing cores (the L2-sized GEMMs of a
 * W3 step ran no faster on 2 threads than on 1 when the threads shared packed panels), and every
 * C element is summed exactly as on one thread. The operand both threads read (A for a column
 * split) is read twice: in place, or packed by each. */
static fbp_status LFN(gemm_packed)(REAL *c, const REAL *a, const REAL *b, const REAL *bias,
                                   int64_t m, int64_t n, int64_t k, int64_t rs_a, int64_t cs_a,
                                   int64_t rs_b, int64_t cs_b, int64_t ldc, REAL alpha, REAL beta,
                                   fbp_activation act, size_t b_bytes, size_t a_bytes,
                                   size_t band_bytes, int nthreads, int fetch_a,
                                   const LFN(dact) * dact, const LFN(sgd) * sgd, int *a_finite,
                                   const LFN(rows) * through) {
    const int64_t col_parts = (n + NR - 1) / NR, row_parts = (m + MR - 1) / MR;
    /* the busiest thread's share of the slivers, scaled by the thread count: lower is better */
    const int64_t col_load = (col_parts + nthreads - 1) / nthreads * row_parts;
    const int64_t row_load = (row_parts + nthreads - 1) / nthreads * col_parts;
    /* On a tie, columns, except for the SGD epilogue: its rows are a layer's weight rows, the
     * output columns the next forward splits, so a row split leaves each thread the weights it
     * updated (and a contiguous block of them). W4's 1024 x 1024 x 256 weight gradient at 2
     * threads: 2014 -> 1772 us, the epoch 2.9-3.8% faster (interleaved fits; W3 has no tie). */
    const int by_cols =
        col_parts >= nthreads && (col_load < row_load || (col_load == row_load && !sgd) || dact);
    /* the backward epilogue's column sums run down whole columns: never a row split */
    if (dact && !by_cols) nthreads = 1;
    const int64_t parts = by_cols ? col_parts : row_parts;
    if (parts < nthreads) nthreads = (int)parts;
    if (nthreads <= 1) {
        /* No OpenMP region for one thread: even an if(0) region costs a trip through libgomp. */
        char *scratch = fbp_scratch(b_bytes + a_bytes + band_bytes);
        if (!scratch) return FBP_ERR_NOMEM;
        LFN(sgd) my_sgd;
        if (sgd) my_sgd = LFN(sgd_band)(sgd, scratch + b_bytes + a_bytes, band_bytes);
        LFN(gemm_blocked)(c, a, b, bias, m, n, k, rs_a, cs_a, rs_b, cs_b, ldc, alpha, beta, act,
                          (REAL *)scratch, (REAL *)(scratch + b_bytes), fetch_a, dact,
                          sgd ? &my_sgd : NULL, a_finite, through);
        return FBP_OK;
    }
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        char *scratch = fbp_scratch(b_bytes + a_bytes + band_bytes);
        if (!scratch) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier /* all or nothing: C is not touched when any thread lacks memory */
        int stop;
#pragma omp atomic read
        stop = failed;
        if (!stop) {
            REAL *pb = (REAL *)scratch, *pa = (REAL *)(scratch + b_bytes);
            int64_t lo, hi;
            fbp_split_range(parts, omp_get_num_threads(), omp_get_thread_num(), &lo, &hi);
            if (by_cols) {
                const int64_t j0 = lo * NR, j1 = min_i64(hi * NR, n);
                LFN(dact) mine; /* this thread's columns of y and dbias */
                if (dact) {
                    mine = *dact;
                    mine.y += j0;
                    if (mine.dbias) mine.dbias += j0;
                }
                LFN(sgd) my_sgd; /* and of the parameters */
                if (sgd) my_sgd = LFN(sgd_offset)(sgd, j0, scratch + b_bytes + a_bytes, band_bytes);
                if (j1 > j0)
                    LFN(gemm_blocked)(c + j0, a, b + j0 * cs_b, bias ? bias + j0 : NULL, m, j1 - j0,
                                      k, rs_a, cs_a, rs_b, cs_b, ldc, alpha, beta, act, pb, pa,
                                      fetch_a, dact ? &mine : NULL, sgd ? &my_sgd : NULL,
                                      lo == 0 ? a_finite : NULL, /* every thread reads all A */
                                      through);
            } else {
                const int64_t i0 = lo * MR, i1 = min_i64(hi * MR, m);
                LFN(sgd) my_sgd;
                if (sgd)
                    my_sgd =
                        LFN(sgd_offset)(sgd, i0 * ldc, scratch + b_bytes + a_bytes, band_bytes);
                LFN(rows) my_rows; /* this thread's rows of an indexed A */
                if (through) {
                    my_rows = *through;
                    if (my_rows.a) my_rows.a += i0;
                }
                if (i1 > i0)
                    LFN(gemm_blocked)(c + i0 * ldc, through && through->a ? a : a + i0 * rs_a, b,
                                      bias, i1 - i0, n, k, rs_a, cs_a, rs_b, cs_b, ldc, alpha, beta,
                                      act, pb, pa, fetch_a, NULL, sgd ? &my_sgd : NULL, a_finite,
                                      through ? &my_rows : NULL);
            }
        }
    }
    return failed ? FBP_ERR_NOMEM : FBP_OK;
}

static fbp_status LFN(gemm_any)(REAL *c, const REAL *a, const REAL *b, const REAL *bias, int64_t m,
                                int64_t n, int64_t k, int64_t rs_a, int64_t cs_a, int64_t rs_b,
                                int64_t cs_b, int64_t ldc, REAL alpha, REAL beta,
                                fbp_activation act, const LFN(dact) * dact, const LFN(sgd) * sgd,
                                int *a_finite, const LFN(rows) * through);

/* C = alpha A' B + beta C (+ the SGD epilogue) for a transposed A' (rs_a = 1) and a narrow C
 * (at most 3/4 of NR columns, at least NR rows: the weight gradient dZ.T X of a layer with few
 * inputs), computed as its transpose C' = B'^T A'^T in this thread's second scratch buffer,
 * then transposed back. C's tiles were one vector wide (or two, the second part empty), each
 * FMA under a broadcast load of A with only n of its lanes live; C''s are whole NR-wide tiles
 * of A's contiguous rows. tools/gemm_ab.py, AVX-512, same bits: float32 64x1x2048 4.1x,
 * 128x2x512 3.1x, 128x4x512 2.9x, 32x8x256 1.44x, 64x12x512 1.9x, 64x16x512 1.24x,
 * 256x16x512 1.21x, 64x20x128 1.19x, 64x24x512 1.35x, 64x26x512 1.15x, 64x28x512 1.03x,
 * 64x31x256 0.98x (hence the 3/4), 100x13x512 1.00x; float64 64x4x512 1.95x, 64x8x512 1.44x,
 * 64x12x512 1.55x; two threads 256x16x512 1.22x, 128x4x2048 3.4x. Every element is the same K
 * terms in the same blocks and order, each one FMA, and the same epilogue, so the same bits;
 * beta's old C goes into C' first, and the update runs on C once it is final. */
static fbp_status LFN(gemm_transposed)(REAL *c, const REAL *a, const REAL *b, const int64_t *b_idx,
                                       int64_t m, int64_t n, int64_t k, int64_t cs_a, int64_t rs_b,
                                       int64_t cs_b, int64_t ldc, REAL alpha, REAL beta,
                                       const LFN(sgd) * sgd) {
    const int64_t ldt = round_up(m, VL); /* C' rows start on vector boundaries */
    const size_t ct_bytes = (size_t)round_up(n * ldt * (int64_t)sizeof(REAL), FBP_ALIGN);
    /* an indexed B (fit's shuffled batch in a first layer's weight gradient) is gathered first,
     * its rows copied as the packing it replaces copied them */
    const size_t gathered_bytes = b_idx ? (size_t)(k * n) * sizeof(REAL) : 0;
    char *scratch = fbp_scratch_aux(ct_bytes + gathered_bytes);
    if (!scratch) return FBP_ERR_NOMEM;
    REAL *ct = (REAL *)scratch;
    if (b_idx) {
        REAL *rows = (REAL *)(scratch + ct_bytes);
        for (int64_t p = 0; p < k; p++)
            memcpy(rows + p * n, b + b_idx[p] * rs_b, (size_t)n * sizeof(REAL));
        b = rows;
        rs_b = n;
        cs_b = 1;
    }
    if (beta != 0)
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < n; j++) ct[j * ldt + i] = c[i * ldc + j];
    /* C'[j][i] = sum_p B'[p][j] A'[i][p]: B'^T is (n x k) at strides (cs_b, rs_b), A'^T is
     * (k x m) at (cs_a, 1) */
    const fbp_status st = LFN(gemm_any)(ct, b, a, NULL, n, m, k, cs_b, rs_b, cs_a, 1, ldt, alpha,
                                        beta, FBP_ACT_IDENTITY, NULL, NULL, NULL, NULL);
    if (st != FBP_OK) return st;
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < n; j++) c[i * ldc + j] = ct[j * ldt + i];
    if (sgd) LFN(sgd_block)(sgd, c, ldc, ldc, 0, m, 0, n);
    return FBP_OK;
}

/* The micro-kernel's arithmetic alone: its MR * NV accumulators, each a chain of iters
 * multiply-adds (no loads), on each of `threads` threads at once. What the GEMM's inner loop
 * could reach with its operands free, for the benchmark report's "of FMA peak": the machine's
 * peak for these kernels, measured rather than taken from a data sheet (turbo, a VM's share of
 * the core and the FMA units' count all vary). The values settle towards 1 (x -> x * 0.999 +
 * 0.001), never subnormal or infinite. *flops: the floating-point operations done. */
fbp_status KFN(fma_probe)(double *flops, int64_t iters, int threads) {
    if (!flops || iters < 0 || threads < 1) return FBP_ERR_INVALID;
    int team = 1;
    REAL sink = 0;
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    {
#pragma omp single
        team = omp_get_num_threads();
        VEC acc[MR * NV];
        const VEC mul = V_(vbcast)((REAL)0.999), add = V_(vbcast)((REAL)0.001);
#pragma GCC unroll 32
        for (int i = 0; i < MR * NV; i++) acc[i] = V_(vbcast)((REAL)i);
        for (int64_t it = 0; it < iters; it++) {
#pragma GCC unroll 32
            for (int i = 0; i < MR * NV; i++) acc[i] = acc[i] * mul + add;
        }
        VEC total = acc[0];
        for (int i = 1; i < MR * NV; i++) total += acc[i];
        for (int64_t l = 0; l < VL; l++) sink += total[l];
    }
    *flops = 2.0 * (double)iters * (double)(MR * NV * VL) * team;
    /* the sum is finite and positive; a check the compiler cannot drop keeps the loop */
    return sink > 0 ? FBP_OK : FBP_ERR_NONFINITE;
}

fbp_status KFN(gemm)(REAL *c, const REAL *a, const REAL *b, const REAL *bias, int64_t m, int64_t n,
                     int64_t k, int64_t rs_a, int64_t cs_a, int64_t rs_b, int64_t cs_b, int64_t ldc,
                     REAL alpha, REAL beta, fbp_activation act) {
    return LFN(gemm_any)(c, a, b, bias, m, n, k, rs_a, cs_a, rs_b, cs_b, ldc, alpha, beta, act,
                         NULL, NULL, NULL, NULL);
}

fbp_status KFN(gemm_check_a)(REAL *c, const REAL *a, const REAL *b, const REAL *bias, int64_t m,
                             int64_t n, int64_t k, int64_t rs_a, int64_t cs_a, int64_t rs_b,
                             int64_t cs_b, int64_t ldc, REAL alpha, REAL beta, fbp_activation act,
                             int *a_finite) {
    if (!a_finite) return FBP_ERR_INVALID;
    return LFN(gemm_any)(c, a, b, bias, m, n, k, rs_a, cs_a, rs_b, cs_b, ldc, alpha, beta, act,
                         NULL, NULL, a_finite, NULL);
}

fbp_status KFN(gemm_dact)(REAL *dz, REAL *dbias, const REAL *a, const REAL *b, const REAL *y,
                          int64_t m, int64_t n, int64_t k, int64_t rs_a, int64_t cs_a, int64_t rs_b,
                          int64_t cs_b, fbp_activation act, int accumulate) {
    if (m < 0 || n < 0 || k < 0 || (unsigned)act > FBP_ACT_TANH) return FBP_ERR_INVALID;
    /* A shallow product (a 10-class layer's, k = 10) is too short to hide the epilogue's extra
     * loads: at 2 threads W3's 128 x 128 x 10 input gradient took 11-12 us fused against 10
     * for the two kernels in turn. Those run in turn, as does an empty product, unless dZ is so
     * large that the second kernel's pass over it leaves L2: W4's 256 x 1024 x 10 (1 MB of dZ)
     * took 70 us fused against 113 at one thread, 89 against 103 at two (interleaved fits).
     * Nothing between those two sizes was measured. */
    const int shallow = k < GEMM_DACT_MIN_K &&
                        (double)m * (double)n * (double)sizeof(REAL) < GEMM_DACT_SHALLOW_BYTES;
    if (m == 0 || n == 0 || shallow) {
        fbp_status st =
            KFN(gemm)(dz, a, b, NULL, m, n, k, rs_a, cs_a, rs_b, cs_b, n, 1, 0, FBP_ACT_IDENTITY);
        if (st == FBP_OK) st = KFN(activation_backward)(dz, dbias, dz, y, m, n, act, accumulate);
        return st;
    }
    if (!dz || !a || !b || (!y && act != FBP_ACT_IDENTITY)) return FBP_ERR_INVALID;
    if (dbias && !accumulate) memset(dbias, 0, (size_t)n * sizeof(REAL));
    const LFN(dact) dact = {y ? y : dz, n, dbias, act}; /* identity never reads y */
    return LFN(gemm_any)(dz, a, b, NULL, m, n, k, rs_a, cs_a, rs_b, cs_b, n, 1, 0, FBP_ACT_IDENTITY,
                         &dact, NULL, NULL, NULL);
}

fbp_status KFN(gemm_sgd)(REAL *c, const REAL *a, const REAL *b, int64_t m, int64_t n, int64_t k,
                         int64_t rs_a, int64_t cs_a, int64_t rs_b, int64_t cs_b, REAL *param,
                         double lr, double weight_decay, int keep_grad) {
    if (m < 0 || n < 0 || k < 0) return FBP_ERR_INVALID;
    if (m == 0 || n == 0) return FBP_OK;
    if (!param) return FBP_ERR_INVALID;
    const LFN(sgd) u = {param, (REAL)lr, (REAL)weight_decay, keep_grad != 0, NULL};
    return LFN(gemm_any)(c, a, b, NULL, m, n, k, rs_a, cs_a, rs_b, cs_b, n, 1, 0, FBP_ACT_IDENTITY,
                         NULL, &u, NULL, NULL);
}

fbp_status KFN(gemm_rows)(REAL *c, const REAL *a, const int64_t *a_rows, const REAL *b,
                          const int64_t *b_rows, const REAL *bias, int64_t m, int64_t n, int64_t k,
                          int64_t rs_a, int64_t cs_a, int64_t rs_b, int64_t cs_b, int64_t ldc,
                          fbp_activation act, REAL *param, double lr, double weight_decay,
                          int keep_grad, int *a_finite) {
    if (m < 0 || n < 0 || k < 0) return FBP_ERR_INVALID;
    if (m == 0 || n == 0) return FBP_OK;
    const LFN(rows) through = {a_rows, b_rows};
    const LFN(sgd) u = {param, (REAL)lr, (REAL)weight_decay, keep_grad != 0, NULL};
    return LFN(gemm_any)(c, a, b, bias, m, n, k, rs_a, cs_a, rs_b, cs_b, ldc, 1, 0, act, NULL,
                         param ? &u : NULL, a_finite, &through);
}

static fbp_status LFN(gemm_any)(REAL *c, const REAL *a, const REAL *b, const REAL *bias, int64_t m,
                                int64_t n, int64_t k, int64_t rs_a, int64_t cs_a, int64_t rs_b,
                                int64_t cs_b, int64_t ldc, REAL alpha, REAL beta,
                                fbp_activation act, const LFN(dact) * dact, const LFN(sgd) * sgd,
                                int *a_finite, const LFN(rows) * through) {
    if (m < 0 || n < 0 || k < 0 || (unsigned)act > FBP_ACT_TANH) return FBP_ERR_INVALID;
    if (m == 0 || n == 0) return FBP_OK;
    if (!c || ldc < n || (k > 0 && (!a || !b))) return FBP_ERR_INVALID;
    if (k == 0) { /* no product: C = act(beta * C + bias) */
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < n; j += VL)
                LFN(epilogue)(c + i * ldc + j, V_(vbcast)(0), min_i64(VL, n - j),
                              bias ? bias + j : NULL, alpha, beta, 1, 1, act);
        if (sgd) LFN(sgd_block)(sgd, c, ldc, ldc, 0, m, 0, n);
        return FBP_OK;
    }
    const double macs = (double)m * (double)n * (double)k;
    /* an indexed operand is packed: not for the direct path (the caller's choice, see gemm_rows) */
    if (through && (macs <= FBP_GEMM_DIRECT_MAX_MACS || (through->a && cs_a != 1) ||
                    (through->b && cs_b != 1)))
        return FBP_ERR_INVALID;
    /* One output column (a regression head's x @ w.T): the packed path fills 1 of NR lanes of
     * its tiles: 256x1x128 and 1024x1x256 (w strided) 1.33x faster direct at one thread and at
     * two, float64 1.8x. One K block only, where the two paths give the same bits. */
    const int one_column = n == 1 && k <= KC && !a_finite && macs <= GEMM_DIRECT_COLUMN_MAX_MACS;
    if (macs <= FBP_GEMM_DIRECT_MAX_MACS || (one_column && !through)) {
        /* small: the packed path's fixed costs would dominate */
        LFN(gemm_direct)(c, a, b, bias, m, n, k, rs_a, cs_a, rs_b, cs_b, ldc, alpha, beta, act,
                         dact);
        if (sgd) LFN(sgd_block)(sgd, c, ldc, ldc, 0, m, 0, n);
        return FBP_OK;
    }
    if (GEMM_TRANSPOSED_ROUTE && rs_a == 1 && cs_a != 1 && 4 * n <= 3 * NR && m >= NR && !bias &&
        fbp_get_transposed_a_paths() && act == FBP_ACT_IDENTITY && !dact && !a_finite &&
        (!through || !through->a))
        return LFN(gemm_transposed)(c, a, b, through ? through->b : NULL, m, n, k, cs_a, rs_b, cs_b,
                                    ldc, alpha, beta, sgd);
    const int64_t kc_max = min_i64(LFN(balanced_kc)(k), k);
    const size_t b_bytes =
        (size_t)round_up(kc_max * round_up(min_i64(NC, n), NR) * (int64_t)sizeof(REAL), FBP_ALIGN);
    const size_t a_bytes =
        (size_t)round_up(kc_max * round_up(min_i64(MC, m), MR) * (int64_t)sizeof(REAL), FBP_ALIGN);
    /* the SGD epilogue's band (see LFN(sgd)), asked for by every product, so that a step whose
     * products repeat the last step's never grows a thread's scratch (see train.c) */
    const size_t band_bytes =
        GEMM_A_OUTER ? (size_t)round_up((int64_t)(MR * NC) * (int64_t)sizeof(REAL), FBP_ALIGN) : 0;
    const int64_t work = macs > (double)INT64_MAX ? INT64_MAX : (int64_t)macs;
    const int nthreads = fbp_team_size(work, GEMM_THREAD_GRAIN_MACS);
    /* with more than one thread configured, the operands are often another core's output */
    const int fetch_a = fbp_get_num_threads() > 1;
    int checked = a_finite ? 1 : 0; /* every A value is read, and checked, by a tile below */
    const fbp_status st = LFN(gemm_packed)(c, a, b, bias, m, n, k, rs_a, cs_a, rs_b, cs_b, ldc,
                                           alpha, beta, act, b_bytes, a_bytes, band_bytes, nthreads,
                                           fetch_a, dact, sgd, a_finite ? &checked : NULL, through);
    if (st == FBP_OK && a_finite) *a_finite = checked;
    return st;
}

#undef FBP_LANES
#undef MASK_LO
#undef MASK_HI
#undef TRANSPOSE_STAGE
#undef MR
#undef NV
#undef NR
#undef MC
#undef KC
#undef NC
#endif /* FBP_TEMPLATE_PASS */
