/* Shared by vitlab's native kernels (gelu_kernel.c, attention_kernel.c, linear_kernel.c): AVX-512 helpers. */
#ifndef VITLAB_KERNEL_MATH_H
#define VITLAB_KERNEL_MATH_H
#include <immintrin.h>
#include <stdint.h>

/* exp(z) for 16 floats: z = n ln2 + r with |r| <= ln2 / 2, exp(r) by a degree-6 polynomial, times 2^n.
 * z is clamped at -105, where the result flushes to 0 (below the smallest subnormal); a NaN stays NaN
 * (vmaxps returns its second operand when either is NaN, so z goes second). */
static inline __m512 exp16(__m512 z) {
    const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
    z = _mm512_max_ps(_mm512_set1_ps(-105.0f), z);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(z, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), z);  /* z - n ln2, in two parts */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
    __m512 p = _mm512_set1_ps(1.98756915e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.39819994e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.33345980e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.16664783e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.66666672e-1f));
    p = _mm512_fmadd_ps(p, r, half);
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, one));
    return _mm512_scalef_ps(p, n);
}

/* 16 bf16 (as uint16) -> fp32, lanes outside the mask read as 0: a bf16 is the high half of a float */
static inline __m512 load_bf16(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

/* 16 fp32 -> bf16 (round to nearest even), the lanes in the mask stored */
static inline void store_bf16(uint16_t *p, __mmask16 m, __m512 v) {
    _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}

static inline __mmask16 mask16(int64_t n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n > 0 ? n : 0)) - 1u); }
static inline __mmask32 mask32(int64_t n) { return n >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << (n > 0 ? n : 0)) - 1u); }

/* y = gelu(x) (exact, erf) and d = gelu'(x) for 16 floats: gelu_kernel.c says how */
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

#endif
