/* One decoding step of CPM-Ant's blocks in a single call: the same computation as
 * cpmlive.model.ant.Block.forward for new positions of one token per row, with the keys and
 * values written into (and read from) the model's own cache tensors.
 *
 * Per block: h += attention_out(attention(rms_norm(h))) when the block has attention, then
 * h += w_out(gelu(w_0 x) * w_1 x) with x = rms_norm(h) when it has a feed-forward part. The
 * attention bias (position bias plus mask, [rows, heads, keys]) is computed once per step by
 * the caller, as the model does.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gemv.h"

typedef struct {
    const float *attn_norm; /* NULL: the block has no attention */
    Matrix q, k, v, out;
    const float *ffn_norm;  /* NULL: the block has no feed-forward part */
    Matrix w_0, w_1, w_out;
} Block;

static void rms_norm(const float *h, const float *weight, float *out, int64_t rows, int64_t dim, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float *x = h + r * dim;
        float sum = 0;
        for (int64_t j = 0; j < dim; j++) sum += x[j] * x[j];
        float inv = 1.0f / sqrtf(sum / (float)dim + eps);
        for (int64_t j = 0; j < dim; j++) out[r * dim + j] = x[j] * inv * weight[j];
    }
}

static void add_into(float *h, const float *y, int64_t count) {
    for (int64_t j = 0; j < count; j++) h[j] += y[j];
}

static inline float dot(const float *a, const float *b, int64_t n) {
    int64_t d = 0;
    float s = 0;
#ifdef CPMLIVE_VECTOR
    __m256 acc = _mm256_setzero_ps();
    for (; d + 8 <= n; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    s = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
#endif
    for (; d < n; d++) s += a[d] * b[d];
    return s;
}

/* y += alpha * x */
static inline void axpy(float alpha, const float *x, float *y, int64_t n) {
    int64_t d = 0;
#ifdef CPMLIVE_VECTOR
    __m256 a = _mm256_set1_ps(alpha);
    for (; d + 8 <= n; d += 8) _mm256_storeu_ps(y + d, _mm256_fmadd_ps(a, _mm256_loadu_ps(x + d), _mm256_loadu_ps(y + d)));
#endif
    for (; d < n; d++) y[d] += alpha * x[d];
}

/* softmax(q k^T / sqrt(d) + bias) v for every (row, head) over keys 0 .. keys-1. */
static void attend(const float *q, const float *key_cache, const float *value_cache, const float *bias,
                   float *out, int64_t rows, int64_t heads, int64_t dim_head, int64_t capacity,
                   int64_t keys, int threads) {
    float scale = 1.0f / sqrtf((float)dim_head);
#pragma omp parallel for schedule(dynamic, 8) num_threads(threads)
    for (int64_t rh = 0; rh < rows * heads; rh++) {
        int64_t r = rh / heads, h = rh % heads;
        const float *qv = q + r * heads * dim_head + h * dim_head;
        const float *kc = key_cache + rh * capacity * dim_head, *vc = value_cache + rh * capacity * dim_head;
        const float *b = bias + rh * keys;
        float *scores = malloc((size_t)keys * sizeof(float)), peak = -INFINITY, total = 0;
        for (int64_t j = 0; j < keys; j++) {
            scores[j] = dot(qv, kc + j * dim_head, dim_head) * scale + b[j];
            peak = fmaxf(peak, scores[j]);
        }
        for (int64_t j = 0; j < keys; j++) total += (scores[j] = expf(scores[j] - peak));
        float *o = out + r * heads * dim_head + h * dim_head;
        memset(o, 0, (size_t)dim_head * sizeof(float));
        for (int64_t j = 0; j < keys; j++) axpy(scores[j] / total, vc + j * dim_head, o, dim_head);
        free(scores);
    }
}

/* Copy this step's keys and values ([rows, heads * dim_head]) to cache column `columns[r]` of
 * each row (rows of an engine's batch have lengths of their own). */
static void store(float *cache, const float *x, int64_t rows, int64_t heads, int64_t dim_head,
                  int64_t capacity, const int64_t *columns) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t h = 0; h < heads; h++)
            memcpy(cache + ((r * heads + h) * capacity + columns[r]) * dim_head, x + (r * heads + h) * dim_head,
                   (size_t)dim_head * sizeof(float));
}

#ifdef CPMLIVE_VECTOR
/* exp(x) for x <= 0 (all GELU needs): x = n ln 2 + r, |r| <= ln 2 / 2, a degree-6 polynomial
 * for exp(r) (Cephes' expf coefficients) and 2^n from the exponent bits. */
static inline __m256 exp_nonpositive(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

/* erf by Abramowitz & Stegun 7.1.26 (absolute error 1.5e-7 in exact arithmetic, ~5e-7 measured
 * in float32), the form PyTorch's own vectorized erf uses. */
static inline __m256 erf8(__m256 x) {
    __m256 sign = _mm256_and_ps(x, _mm256_set1_ps(-0.0f)), ax = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
    __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), ax, _mm256_set1_ps(1.0f)));
    __m256 poly = _mm256_set1_ps(1.061405429f);
    poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(-1.453152027f));
    poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(1.421413741f));
    poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(-0.284496736f));
    poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(0.254829592f));
    poly = _mm256_mul_ps(poly, t);
    __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(ax, ax)));
    __m256 y = _mm256_fnmadd_ps(poly, e, _mm256_set1_ps(1.0f));
    return _mm256_or_ps(y, sign);
}
#endif

/* a = gelu(a) * b, GELU in its erf form. */
static void gelu_gate(float *a, const float *b, int64_t count) {
    int64_t j = 0;
#ifdef CPMLIVE_VECTOR
    __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f), root_half = _mm256_set1_ps((float)M_SQRT1_2);
    for (; j + 8 <= count; j += 8) {
        __m256 x = _mm256_loadu_ps(a + j);
        __m256 g = _mm256_mul_ps(_mm256_mul_ps(half, x), _mm256_add_ps(one, erf8(_mm256_mul_ps(x, root_half))));
        _mm256_storeu_ps(a + j, _mm256_mul_ps(g, _mm256_loadu_ps(b + j)));
    }
#endif
    for (; j < count; j++) a[j] = 0.5f * a[j] * (1.0f + erff(a[j] * (float)M_SQRT1_2)) * b[j];
}

/* `hidden` [rows, dim] in place; `bias` [rows, heads, keys] (columns a row must not see are
 * masked there); row r's new keys and values go to column `columns[r]` < keys; `key_caches[i]` and
 * `value_caches[i]` the [rows, heads, capacity, dim_head] cache of block i (NULL without attention).
 * The caches come with each call, so concurrent calls on one model share only read-only state. */
void decode_blocks(const Block *blocks, int64_t num_blocks, float *const *key_caches, float *const *value_caches,
                   float *hidden, const float *bias, int64_t rows,
                   int64_t dim, int64_t heads, int64_t dim_head, int64_t dim_ff, int64_t capacity,
                   const int64_t *columns, int64_t keys, float eps, int threads) {
    int64_t width = heads * dim_head;
    float *x = malloc((size_t)(rows * dim) * sizeof(float));
    float *q = malloc((size_t)(rows * width) * sizeof(float)), *k = malloc((size_t)(rows * width) * sizeof(float));
    float *v = malloc((size_t)(rows * width) * sizeof(float)), *att = malloc((size_t)(rows * width) * sizeof(float));
    float *y = malloc((size_t)(rows * dim) * sizeof(float));
    float *a = malloc((size_t)(rows * dim_ff) * sizeof(float)), *g = malloc((size_t)(rows * dim_ff) * sizeof(float));
    for (int64_t i = 0; i < num_blocks; i++) {
        const Block *blk = blocks + i;
        if (blk->attn_norm) {
            rms_norm(hidden, blk->attn_norm, x, rows, dim, eps);
            matrix_product(&blk->q, x, q, rows, threads);
            matrix_product(&blk->k, x, k, rows, threads);
            matrix_product(&blk->v, x, v, rows, threads);
            store(key_caches[i], k, rows, heads, dim_head, capacity, columns);
            store(value_caches[i], v, rows, heads, dim_head, capacity, columns);
            attend(q, key_caches[i], value_caches[i], bias, att, rows, heads, dim_head, capacity, keys, threads);
            matrix_product(&blk->out, att, y, rows, threads);
            add_into(hidden, y, rows * dim);
        }
        if (blk->ffn_norm) {
            int64_t ff = blk->w_0.n;
            rms_norm(hidden, blk->ffn_norm, x, rows, dim, eps);
            matrix_product(&blk->w_0, x, a, rows, threads);
            matrix_product(&blk->w_1, x, g, rows, threads);
            gelu_gate(a, g, rows * ff);
            matrix_product(&blk->w_out, a, y, rows, threads);
            add_into(hidden, y, rows * dim);
        }
    }
    free(x); free(q); free(k); free(v); free(att); free(y); free(a); free(g);
}
