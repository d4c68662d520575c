/* A Linear layer's weight and bias gradients, dW = dy^T x and db = the sum of dy's rows, in bf16
 * with fp32 results, for the compiled CPU training step.
 *
 * Why: in a compiled ViT-Tiny bf16 step, oneDNN's weight-gradient products were the slowest for
 * their FLOPs: their operands (the layer's input, saved since the forward pass, and the output
 * gradient) come from memory rather than cache, and both are read along the reduced dimension,
 * the batch x tokens rows, which oneDNN first packs at the pace of memory latency. Here each
 * thread packs chunks of rows into L2 with software prefetch ahead of the rows it reads
 * (gemm_bf16.h), sums dy's columns for the bias gradient in the same pass, and writes dW in fp32,
 * so the step also loses the separate bias-gradient reduction and the casts of bf16 gradients to
 * the fp32 parameters' dtype.
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
            bp = aligned_alloc(64, ((size_t)KC * ntc * 4 + 63) / 64 * 64);
            if (!ap || !bp) {
                #pragma omp atomic write
                failed = 1;
            }
        }
        if (ap && bp) {
            for (int64_t k0 = 0; k0 < K; k0 += 2 * KC) {
                int64_t rows = K - k0 < 2 * KC ? K - k0 : 2 * KC, S = (rows + 1) / 2;
                rowpair(dy + k0 * M + m0, M, rows, mt, ap, mt, sums);   /* ap[s][m] */
                rowpair(x + k0 * N + n0, N, rows, ntc, bp, ntc, NULL);  /* bp[s][n] */
                /* dW[m0 + m][n0 + n] (+)= sum over s of ap[s][m] bp[s][n], the first chunk overwriting */
                gemm((const pair_t *)ap, 1, mt, bp, ntc, S, dw + m0 * N + n0, N, mt, ntc, k0 > 0);
            }
        }
        free(ap); free(bp);
    }
    return failed ? -1 : 0;
}
