/* A Linear layer's products in bf16 with fp32 sums, for the compiled CPU training step: the weight and
 * bias gradients (dW = dy^T x, db = the sum of dy's rows), the forward product (y = x W^T + b, or
 * through GELU), and the input gradient (dx = dy W, or times GELU's derivative).
 *
 * Why the weight gradients: in a compiled ViT-Tiny bf16 step, oneDNN's weight-gradient products
 * were the slowest for their FLOPs: their operands (the layer's input, saved since the forward
 * pass, and the output gradient) come from memory rather than cache, and both are read along the
 * reduced dimension, the batch x tokens rows, which oneDNN first packs at the pace of memory
 * latency. Here each thread packs chunks of rows into L2 with software prefetch ahead of the rows
 * it reads (gemm_bf16.h), sums dy's columns for the bias gradient in the same pass, and writes dW
 * in fp32, so the step also loses the separate bias-gradient reduction and the casts of bf16
 * gradients to the fp32 parameters' dtype.
 *
 * Why the other two (below): what ATen runs around them as passes of their own over the output.
 *
 * dy (K, M) and x (K, N) are row-major bf16 (uint16_t); dw (M, N) and db (M) fp32. N must be a
 * multiple of 16 (the vector lanes run along it). Threads (torch's OpenMP pool) take contiguous
 * blocks of dW's rows or columns.
 */
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include "gemm_bf16.h"

/* pairs of rows per chunk: a thread's packed dy columns (up to 288 x 256 x 4 B for ViT-Tiny's qkv)
 * and x's chunk (256 x 192 x 4 B) stay in L2 while every 6 x 64 tile of dW runs through them */
#define KC 256

/* Returns 0, or -1 if a thread could not allocate its packing buffers. */
int vitlab_linear_wgrad_bf16(const uint16_t *dy, const uint16_t *x, int64_t K, int64_t M, int64_t N,
                             float *dw, float *db) {
    int failed = 0;
    if (db) memset(db, 0, (size_t)M * sizeof(float));
    if (K == 0) memset(dw, 0, (size_t)M * N * sizeof(float));
    /* Threads split dW along the wider of its two sides, so that the operand every thread packs
     * whole (and so reads once per thread) is the narrower: x for qkv and fc1, dy for fc2. */
    const int split_n = N > M;
    #pragma omp parallel
    {
        int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
        int64_t unit = split_n ? 16 : 6, side = split_n ? N : M;
        int64_t per = ((side + unit - 1) / unit + nt - 1) / nt * unit;
        int64_t lo = t * per < side ? t * per : side, hi = (t + 1) * per < side ? (t + 1) * per : side;
        int64_t mt = split_n ? M : hi - lo, ntc = split_n ? hi - lo : N;  /* this thread's block of dW */
        int64_t m0 = split_n ? 0 : lo, n0 = split_n ? lo : 0;
        float *sums = db && (!split_n || t == 0) ? db + m0 : NULL;  /* one thread per column sum */
        uint32_t *ap = NULL, *bp = NULL;
        if (mt > 0 && ntc > 0) {
            ap = aligned_alloc(64, ((size_t)KC * mt * 4 + 63) / 64 * 64);
            bp = aligned_alloc(64, (size_t)KC * ((ntc + 63) / 64 * 64) * 4);  /* whole panels of 64 columns */
            if (!ap || !bp) {
                #pragma omp atomic write
                failed = 1;
            }
        }
        if (ap && bp) {
            for (int64_t k0 = 0; k0 < K; k0 += 2 * KC) {
                int64_t rows = K - k0 < 2 * KC ? K - k0 : 2 * KC, S = (rows + 1) / 2;
                rowpair(dy + k0 * M + m0, M, rows, mt, ap, mt, sums);   /* ap[s][m] */
                for (int64_t p = 0; p < ntc; p += 64)  /* bp[s][n], in panels of 64 columns */
                    rowpair(x + k0 * N + n0 + p, N, rows, ntc - p < 64 ? ntc - p : 64, bp + p * S, 64, NULL);
                /* dW[m0 + m][n0 + n] (+)= sum over s of ap[s][m] bp[s][n], the first chunk overwriting */
                gemm_panels((const pair_t *)ap, 1, mt, bp, S, dw + m0 * N + n0, N, mt, ntc, k0 > 0);
            }
        }
        free(ap); free(bp);
    }
    return failed ? -1 : 0;
}

/* -- forward product and input gradient ----------------------------------------------------------
 * y = x W^T + b, optionally through GELU (y = gelu(h), d = gelu'(h) from the fp32 sums h), and
 * dx = (dy W) * d, optionally times a saved GELU derivative: the products with what ATen runs as
 * separate passes over the output (addmm's bias copy, the GELU kernel, GELU's backward multiply)
 * done on each 6 x 64 tile while it is still in L1. The weight is read in fp32 and packed in bf16
 * pairs once per call (the copy autocast would cast anyway).
 *
 * Threads split the rows (batch x tokens) and share the packed weight; each runs its rows in blocks
 * of RB, every 64-column panel of the packed weight through the block in turn. */
#define RB 24

static void *alloc64(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }

/* the rows [lo, hi) of n items in units of `unit`, for thread t of nt */
static void share(int64_t n, int64_t unit, int64_t t, int64_t nt, int64_t *lo, int64_t *hi) {
    int64_t per = ((n + unit - 1) / unit + nt - 1) / nt * unit;
    *lo = t * per < n ? t * per : n;
    *hi = (t + 1) * per < n ? (t + 1) * per : n;
}

/* rows x 64 fp32 sums (stride 64) -> bf16 out (stride ldo), plus bias (fp32, 64, or NULL); with d,
 * out = gelu and d = gelu' of the sum; with m (bf16, stride ldo), out = sum * m */
static void epilogue(const float *c, int64_t rows, const float *bias, uint16_t *out, uint16_t *d, const uint16_t *m,
                     int64_t ldo) {
    __m512 bv[4];
    UNROLL for (int v = 0; v < 4; v++) bv[v] = bias ? _mm512_loadu_ps(bias + 16 * v) : _mm512_setzero_ps();
    for (int64_t r = 0; r < rows; r++) {
        UNROLL for (int v = 0; v < 4; v += 2) {
            __m512 h0 = _mm512_add_ps(_mm512_loadu_ps(c + r * 64 + 16 * v), bv[v]);
            __m512 h1 = _mm512_add_ps(_mm512_loadu_ps(c + r * 64 + 16 * v + 16), bv[v + 1]);
            uint16_t *o = out + r * ldo + 16 * v;
            if (d) {
                __m512 y0, d0, y1, d1;
                gelu16(h0, &y0, &d0);
                gelu16(h1, &y1, &d1);
                _mm512_storeu_si512((void *)o, (__m512i)_mm512_cvtne2ps_pbh(y1, y0));
                _mm512_storeu_si512((void *)(d + r * ldo + 16 * v), (__m512i)_mm512_cvtne2ps_pbh(d1, d0));
            } else {
                if (m) {
                    h0 = _mm512_mul_ps(h0, load_bf16(m + r * ldo + 16 * v, 0xffff));
                    h1 = _mm512_mul_ps(h1, load_bf16(m + r * ldo + 16 * v + 16, 0xffff));
                }
                _mm512_storeu_si512((void *)o, (__m512i)_mm512_cvtne2ps_pbh(h1, h0));
            }
        }
    }
}

/* out (K, L) bf16 = a (K rows of S pairs, bf16) times the packed bp (S pairs x L, in panels of 64
 * columns: PANEL(l, s) below), through epilogue;
 * rows [lo, hi) */
static void rows_times_packed(const uint16_t *a, int64_t S, const uint32_t *bp, int64_t L, int64_t lo, int64_t hi,
                              const float *bias, uint16_t *out, uint16_t *d, const uint16_t *m, float *c) {
    for (int64_t r0 = lo; r0 < hi; r0 += RB) {
        int64_t rows = hi - r0 < RB ? hi - r0 : RB;
        for (int64_t l = 0; l < L; l += 64) {
            gemm((const pair_t *)(a + r0 * 2 * S), S, 1, bp + l * S, 64, S, c, 64, rows, 64, 0);
            epilogue(c, rows, bias ? bias + l : NULL, out + r0 * L + l, d ? d + r0 * L + l : NULL,
                     m ? m + r0 * L + l : NULL, L);
        }
    }
}

/* Where pair s of column l sits in a packed weight of S pairs: each 64 columns' S x 64 pairs are
 * contiguous, so that a tile's product streams through memory in order instead of striding a whole
 * row of the weight per pair (a new page every pair or two for ViT-B's widths). */
#define PANEL(l, s, S) ((l) / 64 * 64 * (S) + (s) * 64 + (l) % 64)

/* bp[s][l] = (W[l][2s], W[l][2s+1]) in bf16 for W (n_out, n_in) fp32, the pairs along the inputs
 * (the forward product): thread t of nt packs its share of W's rows, 16 at a time, 16 pairs of
 * each, transposed in registers. n_in a multiple of 32, n_out of 16. */
static void pack_transposed(const float *w, int64_t n_out, int64_t n_in, uint32_t *bp, int64_t t, int64_t nt) {
    int64_t lo, hi;
    share(n_out, 16, t, nt, &lo, &hi);
    for (int64_t l = lo; l < hi; l += 16)
        for (int64_t s = 0; s < n_in / 2; s += 16) {
            __m512i r[16];
            UNROLL for (int i = 0; i < 16; i++) {
                const float *row = w + (l + i) * n_in + 2 * s;
                r[i] = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(row + 16), _mm512_loadu_ps(row));
            }
            transpose16(r);
            UNROLL for (int i = 0; i < 16; i++) _mm512_storeu_si512(bp + PANEL(l, s + i, n_in / 2), r[i]);
        }
}

/* bp[s][l] = (W[2s][l], W[2s+1][l]) in bf16 for W (n_out, n_in) fp32, the pairs along the outputs
 * (the input gradient): thread t of nt packs its share of W's row pairs. n_out even, n_in a
 * multiple of 32. */
static void pack_rowpairs(const float *w, int64_t n_out, int64_t n_in, uint32_t *bp, int64_t t, int64_t nt) {
    const __m512i lo16 = pair_index(0), hi16 = pair_index(16);
    int64_t lo, hi;
    share(n_out / 2, 1, t, nt, &lo, &hi);
    for (int64_t s = lo; s < hi; s++)
        for (int64_t l = 0; l < n_in; l += 32) {
            const float *r0 = w + 2 * s * n_in + l, *r1 = r0 + n_in;
            __m512i a = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(r0 + 16), _mm512_loadu_ps(r0));
            __m512i b = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(r1 + 16), _mm512_loadu_ps(r1));
            _mm512_storeu_si512(bp + PANEL(l, s, n_out / 2), _mm512_permutex2var_epi16(a, lo16, b));
            _mm512_storeu_si512(bp + PANEL(l + 16, s, n_out / 2), _mm512_permutex2var_epi16(a, hi16, b));
        }
}

typedef void (*packer)(const float *, int64_t, int64_t, uint32_t *, int64_t, int64_t);

/* out (K, L) = a (K rows of S pairs) times W packed by `pack` (S pairs x L), through epilogue: the
 * threads pack W together, then each takes its share of the rows. Returns 0, or -1 if the buffers
 * could not be allocated. */
static int packed_product(const uint16_t *a, int64_t K, int64_t S, const float *w, int64_t n_out, int64_t n_in,
                          packer pack, int64_t L, const float *bias, uint16_t *out, uint16_t *d, const uint16_t *m) {
    uint32_t *bp = alloc64((size_t)S * L * 4);
    int failed = !bp;
    #pragma omp parallel if (!failed)
    {
        int64_t nt = omp_get_num_threads(), t = omp_get_thread_num(), lo, hi;
        float *c = alloc64(RB * 64 * 4);
        if (!c) {
            #pragma omp atomic write
            failed = 1;
        }
        if (bp) pack(w, n_out, n_in, bp, t, nt);
        #pragma omp barrier
        if (!failed) {
            share(K, 6, t, nt, &lo, &hi);
            rows_times_packed(a, S, bp, L, lo, hi, bias, out, d, m, c);
        }
        free(c);
    }
    free(bp);
    return failed ? -1 : 0;
}

/* y (K, n_out) = x (K, n_in) W^T + b, W (n_out, n_in) and b fp32, x and y bf16; with d non-NULL,
 * y = gelu and d = gelu' of that. n_in a multiple of 32, n_out of 64. Returns 0, or -1 if the
 * buffers could not be allocated. */
int vitlab_linear_fwd_bf16(const uint16_t *x, int64_t K, int64_t n_in, const float *w, const float *b,
                           int64_t n_out, uint16_t *y, uint16_t *d) {
    return packed_product(x, K, n_in / 2, w, n_out, n_in, pack_transposed, n_out, b, y, d, NULL);
}

/* dx (K, n_in) = dy (K, n_out) W, times m (K, n_in) where m is not NULL; W (n_out, n_in) fp32, the
 * rest bf16. n_out even, n_in a multiple of 64. Returns 0, or -1 if the buffers could not be
 * allocated. */
int vitlab_linear_dgrad_bf16(const uint16_t *dy, int64_t K, int64_t n_out, const float *w, int64_t n_in,
                             const uint16_t *m, uint16_t *dx) {
    return packed_product(dy, K, n_out / 2, w, n_out, n_in, pack_rowpairs, n_in, NULL, dx, NULL, m);
}
