/* The products of gemv.c as the decoding step (decode.c) calls them. */
#ifndef CPMLIVE_GEMV_H
#define CPMLIVE_GEMV_H
#include <stdint.h>

/* The vector forms need AVX2, FMA and F16C (any x86 CPU since 2013); otherwise the scalar ones run. */
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CPMLIVE_VECTOR 1
#include <immintrin.h>
#endif

/* Weight formats (see gemv.c). */
enum { KIND_F32 = 0, KIND_BF16 = 1, KIND_F16 = 2, KIND_I8 = 3, KIND_W8A8 = 4, KIND_I4 = 5 };

/* One bias-free linear layer: y[rows, n] = x[rows, k] @ w.T. */
typedef struct {
    int64_t kind;
    const void *weight;
    const float *scale;  /* i8, w8a8: [n]; i4: [n, k / group] */
    const uint8_t *zero; /* i4: [n, k / group] */
    int64_t n, k, group;
} Matrix;

void matrix_product(const Matrix *m, const float *x, float *y, int64_t rows, int threads);

/* work(context, first, end) over units [0, units) in chunks of `chunk`, by the caller and up to
 * threads - 1 helpers (pool.c); returns when every unit is done. */
typedef void (*PoolWork)(void *context, int64_t first, int64_t end);
void pool_run(PoolWork work, void *context, int64_t units, int64_t chunk, int threads);

/* ys[p] = x @ ms[p].T for p < count (at most MAX_PRODUCTS) in one parallel loop: products of one
 * input (q, k and v; the gate and up projections) then share one wait for the slowest thread. */
#define MAX_PRODUCTS 4
void matrix_products(const Matrix *ms, float *const *ys, int count, const float *x, int64_t rows, int threads);

#endif
