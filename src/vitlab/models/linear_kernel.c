/* A Linear layer's weight and bias gradients, dW = dy^T x and db = the sum of dy's rows, in bf16
 * with fp32 results, for the compiled CPU training step.
 *
 * Why: in a compiled ViT-Tiny bf16 step, oneDNN's weight-gradient products ran at 610-740 GFLOP/s
 * against 850-940 for the step's other products: their operands (the layer's input, saved since
 * the forward pass, and the output gradient) come from memory rather than cache, and both are read
 * along the reduced dimension, the batch x tokens rows, which oneDNN first packs at the pace of
 * memory latency. Here each thread packs chunks of rows into L2 with software prefetch ahead of
 * the rows it reads (gemm_bf16.h), sums dy's columns for the bias gradient in the same pass, and
 * writes dW in fp32, so the step also loses the separate bias-gradient reduction and the casts of
 * bf16 gradients to the fp32 parameters' dtype.
 *
 * dy (K, M) and x (K, N) are row-major bf16 (uint16_t); dw (M, N) and db (M) fp32. N must be a
 * multiple of 16 (the vector lanes run along it). Threads (torch's OpenMP pool) take contiguous
 * blocks of 6 rows of dW; each packs its own columns of dy and all of x's chunk.
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
    #pragma omp parallel
    {
        int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
        int64_t blocks = (M + 5) / 6, per = (blocks + nt - 1) / nt;
        int64_t m0 = t * per * 6 < M ? t * per * 6 : M, m1 = (t + 1) * per * 6 < M ? (t + 1) * per * 6 : M;
        int64_t mt = m1 - m0;
        uint32_t *ap = NULL, *bp = NULL;
        if (mt > 0) {
            ap = aligned_alloc(64, ((size_t)KC * mt * 4 + 63) / 64 * 64);
            bp = aligned_alloc(64, ((size_t)KC * N * 4 + 63) / 64 * 64);
            if (!ap || !bp) {
                #pragma omp atomic write
                failed = 1;
            }
        }
        if (ap && bp) {
            for (int64_t k0 = 0; k0 < K; k0 += 2 * KC) {
                int64_t rows = K - k0 < 2 * KC ? K - k0 : 2 * KC, S = (rows + 1) / 2;
                rowpair(dy + k0 * M + m0, M, rows, mt, ap, mt, db ? db + m0 : NULL);  /* ap[s][m] */
                rowpair(x + k0 * N, N, rows, N, bp, N, NULL);                         /* bp[s][n] */
                /* dW[m0 + m][:] (+)= sum over s of ap[s][m] bp[s][:], the first chunk overwriting */
                gemm((const pair_t *)ap, 1, mt, bp, N, S, dw + m0 * N, N, mt, N, k0 > 0);
            }
        }
        free(ap); free(bp);
    }
    return failed ? -1 : 0;
}
