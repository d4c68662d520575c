/* Multi-head self-attention, forward and backward, for the compiled CPU training step in bf16.
 *
 * Why: a compiled ViT-Tiny step spends a tenth of its time in attention outside its Linears, and
 * most of that is not arithmetic. ATen's batched matmuls need q, k and v head-major, so inductor
 * copies them out of the qkv Linear's output (and the result, and every gradient, back again),
 * and its softmax loops handle a row of 65 tokens as four vectors and a masked tail. Here each
 * (image, head) pair is one small problem done in L1/L2: q, k and v are read in place from the
 * qkv output (B, N, 3, H, D), the output is written in place as (B, N, H, D) for the projection,
 * and the backward pass writes straight into the (B, N, 3, H, D) gradient of the qkv output.
 *
 * Forward:  S = q k^T (fp32), P = softmax(scale S) (kept in bf16 for the backward pass, rows
 *           padded with a zero to even length), O = P v.
 * Backward: dP = dO v^T, dS = scale P (dP - rowsum(P dP)), dq = dS k, dk = dS^T q, dv = P^T dO.
 * Every product runs on AVX-512 BF16 dot products (vdpbf16ps: pairs of bf16 along the reduced
 * dimension, summed into fp32), so the operand that varies along the vector lanes is packed in
 * pairs first: rows 2s and 2s+1 interleaved (rowpair), or, when the reduced dimension is the
 * head dimension, each row's pairs transposed (pair_transpose). The products round to bf16 only
 * where the unfused path does (P, dS, the outputs), and the softmax runs in fp32.
 * Threads (torch's OpenMP pool) take (image, head) problems. D must be a multiple of 32, and
 * scale positive (the softmax subtracts the row's largest unscaled logit, times scale).
 */
#include <stdlib.h>
#include <math.h>
#include "gemm_bf16.h"

/* xt[t][j] = pair t of row j (32 bits), t < d / 2, j < nj; rows from n on are 0; d a multiple of 32 */
static void pair_transpose(const uint16_t *x, int64_t stride, int64_t n, int64_t d, uint32_t *xt, int64_t nj) {
    for (int64_t j = 0; j < nj; j += 16)
        for (int64_t t = 0; t < d / 2; t += 16) {
            __m512i r[16];
            UNROLL for (int i = 0; i < 16; i++)
                r[i] = j + i < n ? _mm512_loadu_si512(x + (j + i) * stride + 2 * t) : _mm512_setzero_si512();
            transpose16(r);
            UNROLL for (int i = 0; i < 16; i++) _mm512_storeu_si512(xt + (t + i) * nj + j, r[i]);
        }
}

/* p's rows (bf16, stride np2, a zero past n) = softmax(scale s) of s's rows (fp32, stride lds, which
 * are overwritten); two rows at a time, so that one row's reductions overlap the other's arithmetic */
static void softmax_rows(float *s, int64_t lds, int64_t n, int64_t np2, float scale, uint16_t *p) {
    const __m512 vs = _mm512_set1_ps(scale);
    for (int64_t i = 0; i < n; i += 2) {
        int two = i + 1 < n;
        float *r0 = s + i * lds, *r1 = two ? r0 + lds : r0;
        __m512 mx0 = _mm512_set1_ps(-INFINITY), mx1 = mx0;
        for (int64_t j = 0; j < n; j += 16) {
            __mmask16 m = mask16(n - j);
            mx0 = _mm512_mask_max_ps(mx0, m, mx0, _mm512_loadu_ps(r0 + j));
            mx1 = _mm512_mask_max_ps(mx1, m, mx1, _mm512_loadu_ps(r1 + j));
        }
        __m512 b0 = _mm512_set1_ps(_mm512_reduce_max_ps(mx0) * scale);
        __m512 b1 = _mm512_set1_ps(_mm512_reduce_max_ps(mx1) * scale);
        __m512 s0 = _mm512_setzero_ps(), s1 = s0;
        for (int64_t j = 0; j < n; j += 16) {
            __mmask16 m = mask16(n - j);
            __m512 e0 = _mm512_maskz_mov_ps(m, exp16(_mm512_fmsub_ps(_mm512_loadu_ps(r0 + j), vs, b0)));
            __m512 e1 = _mm512_maskz_mov_ps(m, exp16(_mm512_fmsub_ps(_mm512_loadu_ps(r1 + j), vs, b1)));
            _mm512_storeu_ps(r0 + j, e0);
            _mm512_storeu_ps(r1 + j, e1);
            s0 = _mm512_add_ps(s0, e0);
            s1 = _mm512_add_ps(s1, e1);
        }
        __m512 i0 = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(s0));
        __m512 i1 = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(s1));
        uint16_t *p0 = p + i * np2, *p1 = p0 + np2;
        for (int64_t j = 0; j < np2; j += 16) {
            __mmask16 m = mask16(n - j), ms = mask16(np2 - j);
            store_bf16(p0 + j, ms, _mm512_maskz_mul_ps(m, _mm512_loadu_ps(r0 + j), i0));
            if (two) store_bf16(p1 + j, ms, _mm512_maskz_mul_ps(m, _mm512_loadu_ps(r1 + j), i1));
        }
    }
}

/* rows x d fp32 (stride d) -> bf16 rows of dst (stride ld) */
static void store_rows(const float *src, int64_t rows, int64_t d, uint16_t *dst, int64_t ld) {
    for (int64_t i = 0; i < rows; i++)
        for (int64_t c = 0; c < d; c += 16) store_bf16(dst + i * ld + c, 0xffff, _mm512_loadu_ps(src + i * d + c));
}

static void *scratch(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }

/* qkv (B, N, 3, H, D) -> out (B, N, H, D) and p (B, H, N, N + N % 2), all bf16. Returns 0, or -1 if
 * a thread could not allocate its scratch space (about 30 KiB for ViT-Tiny). */
int vitlab_attention_fwd_bf16(const uint16_t *qkv, uint16_t *out, uint16_t *p, int64_t B, int64_t N,
                              int64_t H, int64_t D, float scale) {
    const int64_t RS = 3 * H * D, OS = H * D, NP2 = N + (N & 1), NJ = (N + 15) / 16 * 16, SP = NP2 / 2;
    int failed = 0;
    #pragma omp parallel
    {
        uint32_t *kt = scratch((size_t)(D / 2) * NJ * 4), *vp = scratch((size_t)SP * D * 4);
        float *sb = scratch((size_t)N * (NJ > D ? NJ : D) * 4);
        if (!kt || !vp || !sb) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            if (!kt || !vp || !sb) continue;
            int64_t b = bh / H, h = bh % H;
            const uint16_t *q = qkv + b * N * RS + h * D, *k = q + H * D, *v = q + 2 * H * D;
            uint16_t *pp = p + bh * N * NP2;
            pair_transpose(k, RS, N, D, kt, NJ);
            rowpair(v, RS, N, D, vp, D, NULL);
            gemm((const pair_t *)q, RS / 2, 1, kt, NJ, D / 2, sb, NJ, N, NJ, 0);  /* S = q k^T */
            softmax_rows(sb, NJ, N, NP2, scale, pp);
            gemm((const pair_t *)pp, SP, 1, vp, D, SP, sb, D, N, D, 0);  /* O = P v */
            store_rows(sb, N, D, out + b * N * OS + h * D, OS);
        }
        free(kt); free(vp); free(sb);
    }
    return failed ? -1 : 0;
}

/* dout (B, N, H, D), qkv and p as the forward pass wrote it -> dqkv (B, N, 3, H, D), all bf16 */
int vitlab_attention_bwd_bf16(const uint16_t *dout, const uint16_t *qkv, const uint16_t *p, uint16_t *dqkv,
                              int64_t B, int64_t N, int64_t H, int64_t D, float scale) {
    const int64_t RS = 3 * H * D, OS = H * D, NP2 = N + (N & 1), NJ = (N + 15) / 16 * 16, SP = NP2 / 2;
    int failed = 0;
    #pragma omp parallel
    {
        uint32_t *vt = scratch((size_t)(D / 2) * NJ * 4), *dop = scratch((size_t)SP * D * 4);
        uint32_t *kp = scratch((size_t)SP * D * 4), *qp = scratch((size_t)SP * D * 4);
        uint32_t *pt = scratch((size_t)SP * NJ * 4), *dst = scratch((size_t)SP * NJ * 4);
        uint16_t *ds = scratch((size_t)N * NP2 * 2);
        float *sb = scratch((size_t)N * (NJ > D ? NJ : D) * 4);
        int ok = vt && dop && kp && qp && pt && dst && ds && sb;
        if (!ok) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            if (!ok) continue;
            int64_t b = bh / H, h = bh % H;
            const uint16_t *q = qkv + b * N * RS + h * D, *k = q + H * D, *v = q + 2 * H * D;
            const uint16_t *pp = p + bh * N * NP2, *dO = dout + b * N * OS + h * D;
            uint16_t *dq = dqkv + b * N * RS + h * D, *dk = dq + H * D, *dv = dq + 2 * H * D;
            pair_transpose(v, RS, N, D, vt, NJ);
            gemm((const pair_t *)dO, OS / 2, 1, vt, NJ, D / 2, sb, NJ, N, NJ, 0);  /* dP = dO v^T */
            const __m512 vs = _mm512_set1_ps(scale);
            for (int64_t i = 0; i < N; i++) {  /* dS = scale P (dP - rowsum(P dP)), bf16, padded with 0 */
                const float *row = sb + i * NJ;
                const uint16_t *prow = pp + i * NP2;
                __m512 acc = _mm512_setzero_ps();
                for (int64_t j = 0; j < N; j += 16) {
                    __mmask16 m = mask16(N - j);
                    acc = _mm512_fmadd_ps(load_bf16(prow + j, m), _mm512_maskz_loadu_ps(m, row + j), acc);
                }
                __m512 di = _mm512_set1_ps(_mm512_reduce_add_ps(acc));
                for (int64_t j = 0; j < NP2; j += 16) {
                    __mmask16 m = mask16(N - j);
                    __m512 dp = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + j), di);
                    __m512 d = _mm512_mul_ps(_mm512_mul_ps(load_bf16(prow + j, m), dp), vs);
                    store_bf16(ds + i * NP2 + j, mask16(NP2 - j), _mm512_maskz_mov_ps(m, d));
                }
            }
            rowpair(k, RS, N, D, kp, D, NULL);
            gemm((const pair_t *)ds, SP, 1, kp, D, SP, sb, D, N, D, 0);  /* dq = dS k */
            store_rows(sb, N, D, dq, RS);
            rowpair(q, RS, N, D, qp, D, NULL);
            rowpair(ds, NP2, N, N, dst, NJ, NULL);
            gemm(dst, 1, NJ, qp, D, SP, sb, D, N, D, 0);  /* dk = dS^T q */
            store_rows(sb, N, D, dk, RS);
            rowpair(dO, OS, N, D, dop, D, NULL);
            rowpair(pp, NP2, N, N, pt, NJ, NULL);
            gemm(pt, 1, NJ, dop, D, SP, sb, D, N, D, 0);  /* dv = P^T dO */
            store_rows(sb, N, D, dv, RS);
        }
        free(vt); free(dop); free(kp); free(qp); free(pt); free(dst); free(ds); free(sb);
    }
    return failed ? -1 : 0;
}
