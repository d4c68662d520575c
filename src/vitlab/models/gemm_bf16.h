/* Shared by attention_kernel.c and linear_kernel.c: small bf16 matrix products on AVX-512 BF16.
 *
 * vdpbf16ps multiplies pairs of bf16 along the reduced dimension and adds both products into one
 * fp32 lane, so the operand that varies along the vector lanes (b) is stored as 32-bit pairs:
 * b[s][l] = (B[2s][l], B[2s+1][l]). rowpair() packs rows that way; the other operand (a) is read
 * one pair at a time and broadcast, from any layout with a pair stride along s.
 */
#ifndef VITLAB_GEMM_BF16_H
#define VITLAB_GEMM_BF16_H
#include "kernel_math.h"

#define UNROLL _Pragma("GCC unroll 16")

/* a bf16 pair read as one 32-bit word: may alias the uint16_t bf16 buffers it reads, and needs
 * only their 2-byte alignment */
typedef uint32_t __attribute__((may_alias, aligned(2))) pair_t;

/* c[r][0 : 16V] (+)= sum over s < S of pair a(r, s) times the 16V pairs of row s of b, for R rows:
 * R x V accumulators in registers (6 x 4 = 24 of the 32), a's pair broadcast, b's row loaded once
 * per s; with `accumulate` the sums are added to c, otherwise they overwrite it. */
#define DEF_KERNEL(R, V)                                                                              \
static void k_##R##_##V(const pair_t *a, int64_t ars, int64_t aks, const uint32_t *b, int64_t ldb, \
                        int64_t S, float *c, int64_t ldc, int accumulate) {                           \
    __m512 acc[R][V];                                                                                 \
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int v = 0; v < V; v++) acc[r][v] = _mm512_setzero_ps(); \
    for (int64_t s = 0; s < S; s++) {                                                                 \
        __m512bh bv[V];                                                                               \
        UNROLL for (int v = 0; v < V; v++) bv[v] = (__m512bh)_mm512_loadu_si512(b + s * ldb + 16 * v); \
        UNROLL for (int r = 0; r < R; r++) {                                                          \
            __m512bh av = (__m512bh)_mm512_set1_epi32((int)a[r * ars + s * aks]);                      \
            UNROLL for (int v = 0; v < V; v++) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);    \
        }                                                                                             \
    }                                                                                                 \
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int v = 0; v < V; v++) {                           \
        __m512 o = acc[r][v];                                                                         \
        if (accumulate) o = _mm512_add_ps(o, _mm512_loadu_ps(c + r * ldc + 16 * v));                 \
        _mm512_storeu_ps(c + r * ldc + 16 * v, o);                                                    \
    }                                                                                                 \
}
DEF_KERNEL(1, 4) DEF_KERNEL(2, 4) DEF_KERNEL(3, 4) DEF_KERNEL(4, 4) DEF_KERNEL(5, 4) DEF_KERNEL(6, 4)
DEF_KERNEL(1, 1) DEF_KERNEL(2, 1) DEF_KERNEL(3, 1) DEF_KERNEL(4, 1) DEF_KERNEL(5, 1) DEF_KERNEL(6, 1)

typedef void (*kernel)(const pair_t *, int64_t, int64_t, const uint32_t *, int64_t, int64_t, float *, int64_t, int);
static const kernel K4[7] = {0, k_1_4, k_2_4, k_3_4, k_4_4, k_5_4, k_6_4};
static const kernel K1[7] = {0, k_1_1, k_2_1, k_3_1, k_4_1, k_5_1, k_6_1};

/* C (M x L, fp32, row stride ldc) (+)= A B: A's pair (r, s) at a[r ars + s aks], B (S pairs x L) with
 * row stride ldb; L a multiple of 16 */
static void gemm(const pair_t *a, int64_t ars, int64_t aks, const uint32_t *b, int64_t ldb, int64_t S,
                 float *c, int64_t ldc, int64_t M, int64_t L, int accumulate) {
    for (int64_t m = 0; m < M; m += 6) {
        int R = (int)(M - m < 6 ? M - m : 6);
        int64_t l = 0;
        for (; l + 64 <= L; l += 64) K4[R](a + m * ars, ars, aks, b + l, ldb, S, c + m * ldc + l, ldc, accumulate);
        for (; l < L; l += 16) K1[R](a + m * ars, ars, aks, b + l, ldb, S, c + m * ldc + l, ldc, accumulate);
    }
}

/* gemm() with B packed in panels of 64 columns: the S x 64 pairs of the panel at column l (a multiple
 * of 64) start at b + l S, row stride 64, so that a tile's product streams through memory in order
 * rather than striding across B's whole width. Columns go in blocks of 256: each 6-row slice of A
 * is read from L1 by the block's four panels. L a multiple of 16. */
static void gemm_panels(const pair_t *a, int64_t ars, int64_t aks, const uint32_t *b, int64_t S, float *c,
                        int64_t ldc, int64_t M, int64_t L, int accumulate) {
    for (int64_t nb = 0; nb < L; nb += 256)
        for (int64_t m = 0; m < M; m += 6) {
            int R = (int)(M - m < 6 ? M - m : 6);
            for (int64_t l = nb; l < L && l < nb + 256; l += 64) {
                const uint32_t *bl = b + l * S;
                if (L - l >= 64) {
                    K4[R](a + m * ars, ars, aks, bl, 64, S, c + m * ldc + l, ldc, accumulate);
                } else {
                    for (int64_t j = 0; j < L - l; j += 16)
                        K1[R](a + m * ars, ars, aks, bl + j, 64, S, c + m * ldc + l + j, ldc, accumulate);
                }
            }
        }
}

/* 16 x 16 transpose of 32-bit elements in registers */
static inline __attribute__((always_inline)) void transpose16(__m512i r[16]) {
    __m512i t[16];
    UNROLL for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    UNROLL for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    UNROLL for (int m = 0; m < 4; m++) {
        t[m] = _mm512_shuffle_i32x4(r[m], r[4 + m], 0x88);
        t[4 + m] = _mm512_shuffle_i32x4(r[m], r[4 + m], 0xdd);
        t[8 + m] = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], 0x88);
        t[12 + m] = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], 0xdd);
    }
    UNROLL for (int m = 0; m < 4; m++) {
        r[m] = _mm512_shuffle_i32x4(t[m], t[8 + m], 0x88);
        r[4 + m] = _mm512_shuffle_i32x4(t[4 + m], t[12 + m], 0x88);
        r[8 + m] = _mm512_shuffle_i32x4(t[m], t[8 + m], 0xdd);
        r[12 + m] = _mm512_shuffle_i32x4(t[4 + m], t[12 + m], 0xdd);
    }
}

/* Rows this far ahead are prefetched while packing: the rows are strided (a head's slice of the qkv
 * output, a thread's columns of a gradient), and with the hardware prefetcher alone the packing
 * waited on memory (linear_kernel.c's operands come from memory, not cache). */
#define PREFETCH_ROWS 16

/* The index vector that interleaves two rows of 32 bf16, a and b, into 32-bit pairs (a[c], b[c]):
 * _mm512_permutex2var_epi16(a, pair_index(0), b) gives the pairs of c = 0-15, pair_index(16) those of
 * c = 16-31. */
static inline __m512i pair_index(short first) {
    return _mm512_add_epi16(_mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                             39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0),
                            _mm512_set1_epi16(first));
}

/* xp[s][c] = (x[2s][c], x[2s+1][c]) as one 32-bit pair, s < (n + 1) / 2, c < m; a missing row 2s+1
 * is 0. With `sums`, also sums[c] += x[i][c] over the n rows, in fp32. */
static void rowpair(const uint16_t *x, int64_t stride, int64_t n, int64_t m, uint32_t *xp, int64_t ldxp,
                    float *sums) {
    const __m512i lo = pair_index(0), hi = pair_index(16);
    for (int64_t s = 0; s < (n + 1) / 2; s++) {
        const uint16_t *r0 = x + 2 * s * stride, *r1 = r0 + stride;
        int second = 2 * s + 1 < n, ahead = 2 * s + 1 + PREFETCH_ROWS < n;
        for (int64_t c = 0; c < m; c += 32) {
            __mmask32 mk = mask32(m - c);
            if (ahead) {
                _mm_prefetch((const char *)(r0 + PREFETCH_ROWS * stride + c), _MM_HINT_T0);
                _mm_prefetch((const char *)(r1 + PREFETCH_ROWS * stride + c), _MM_HINT_T0);
            }
            __m512i a = _mm512_maskz_loadu_epi16(mk, r0 + c);
            __m512i b = second ? _mm512_maskz_loadu_epi16(mk, r1 + c) : _mm512_setzero_si512();
            _mm512_mask_storeu_epi32(xp + s * ldxp + c, mask16(m - c), _mm512_permutex2var_epi16(a, lo, b));
            if (m - c > 16)
                _mm512_mask_storeu_epi32(xp + s * ldxp + c + 16, mask16(m - c - 16),
                                         _mm512_permutex2var_epi16(a, hi, b));
            if (sums) {  /* a bf16 is the high half of a float; masked-off lanes loaded as 0 */
                for (int half = 0; half < 2 && c + 16 * half < m; half++) {
                    __mmask16 mh = mask16(m - c - 16 * half);
                    __m256i a16 = half ? _mm512_extracti64x4_epi64(a, 1) : _mm512_castsi512_si256(a);
                    __m256i b16 = half ? _mm512_extracti64x4_epi64(b, 1) : _mm512_castsi512_si256(b);
                    __m512 fa = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(a16), 16));
                    __m512 fb = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b16), 16));
                    float *dst = sums + c + 16 * half;
                    _mm512_mask_storeu_ps(dst, mh, _mm512_add_ps(_mm512_maskz_loadu_ps(mh, dst), _mm512_add_ps(fa, fb)));
                }
            }
        }
    }
}

#endif
