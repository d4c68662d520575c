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
