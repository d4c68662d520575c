/* Exact (erf) GELU and its derivative in one pass, for the compiled CPU training step.
 *
 * Why: ATen computes GELU in the forward pass and, in the backward pass, reads the input again
 * to evaluate erf and exp a second time (aten::gelu_backward, the largest non-matmul kernel of a
 * ViT-Tiny bf16 step). Here the forward pass also writes g'(x), which costs one more store but
 * shares the exp: erf(x / sqrt 2) needs exp(-x^2 / 2) anyway, and so does the normal density in
 * the derivative. The backward pass is then grad * g'(x), a multiply in inductor's own loops
 * (one of which also sums the bias gradient). See vitlab/models/native.py (build, loading) and
 * ops.py (the op).
 *
 * For each x:  e = exp(-x^2 / 2),  h = erfc(|x| / sqrt 2) / 2  (Abramowitz & Stegun 7.1.26:
 * erfc(u) ~ (a1 t + ... + a5 t^5) exp(-u^2), t = 1 / (1 + p u), absolute error < 1.5e-7),
 *   cdf = h for x < 0, 1 - h otherwise (no cancellation for negative x),
 *   y   = x cdf,      d = cdf + x e / sqrt(2 pi).
 * Computed in fp32; bf16 in and out with round-to-nearest-even. AVX-512 (F, BW, VL, DQ, BF16).
 */
#include "kernel_math.h"

static inline void gelu16(__m512 x, __m512 *y, __m512 *d) {
    const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
    /* e = exp(-x^2/2): flushes to 0 beyond |x| ~ 14.5, as erf's tail does */
    __m512 e = exp16(_mm512_mul_ps(_mm512_mul_ps(x, x), _mm512_set1_ps(-0.5f)));
    /* h = erfc(u) / 2, u = |x| / sqrt 2 (clamped so that t stays finite for x = +-inf) */
    __m512 u = _mm512_min_ps(_mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(0.70710678118654752f)),
                             _mm512_set1_ps(1e6f));
    __m512 den = _mm512_fmadd_ps(u, _mm512_set1_ps(0.3275911f), one);
    __m512 t = _mm512_rcp14_ps(den);
    t = _mm512_mul_ps(t, _mm512_fnmadd_ps(den, t, _mm512_set1_ps(2.0f)));  /* one Newton step: ~2^-28 */
    __m512 q = _mm512_set1_ps(1.061405429f);
    q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(-1.453152027f));
    q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(1.421413741f));
    q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(-0.284496736f));
    q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(0.254829592f));
    __m512 h = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(q, t), e), half);
    __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
    __m512 cdf = _mm512_mask_mov_ps(_mm512_sub_ps(one, h), neg, h);
    *y = _mm512_mul_ps(x, cdf);
    *d = _mm512_fmadd_ps(_mm512_mul_ps(x, e), _mm512_set1_ps(0.39894228040143268f), cdf);
}

/* n elements of x (bf16, as uint16) -> y = gelu(x), d = gelu'(x); threads from the OpenMP runtime
 * torch itself uses (the same libgomp, found by its soname). */
void vitlab_gelu_fwd_bf16(const uint16_t *x, uint16_t *y, uint16_t *d, int64_t n) {
    int64_t nv = n / 32 * 32;
    #pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < nv; i += 32) {
        __m512 y0, d0, y1, d1;  /* two independent chains per iteration, and one 32-wide convert */
        gelu16(load_bf16(x + i, 0xffff), &y0, &d0);
        gelu16(load_bf16(x + i + 16, 0xffff), &y1, &d1);
        _mm512_storeu_si512((void *)(y + i), (__m512i)_mm512_cvtne2ps_pbh(y1, y0));
        _mm512_storeu_si512((void *)(d + i), (__m512i)_mm512_cvtne2ps_pbh(d1, d0));
    }
    for (int64_t i = nv; i < n; i += 16) {  /* the last n % 32 elements, masked */
        __mmask16 m = mask16(n - i);
        __m512 yy, dd;
        gelu16(load_bf16(x + i, m), &yy, &dd);
        store_bf16(y + i, m, yy);
        store_bf16(d + i, m, dd);
    }
}

void vitlab_gelu_fwd_f32(const float *x, float *y, float *d, int64_t n) {
    int64_t nv = n / 16 * 16;
    #pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < nv; i += 16) {
        __m512 yy, dd;
        gelu16(_mm512_loadu_ps(x + i), &yy, &dd);
        _mm512_storeu_ps(y + i, yy);
        _mm512_storeu_ps(d + i, dd);
    }
    if (nv < n) {
        __mmask16 m = mask16(n - nv);
        __m512 yy, dd;
        gelu16(_mm512_maskz_loadu_ps(m, x + nv), &yy, &dd);
        _mm512_mask_storeu_ps(y + nv, m, yy);
        _mm512_mask_storeu_ps(d + nv, m, dd);
    }
}
