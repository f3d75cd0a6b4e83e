/* One decoding step of a stack of pre-norm blocks in a single call: the same computation as the
 * blocks' forward (cpmlive.model.stack.Block, cpmlive.model.decoder.DecoderBlock) for new positions
 * of one token per row (several rows may be consecutive tokens of one sequence: a speculative step
 * verifying drafted tokens), with the keys and values written into (and read from) the model's own
 * cache tensors.
 *
 * Per block, with s the residual scale (1: a plain sum):
 *   h = (h / s + attention_out(attention(rms_norm(h))) [+ bias_out]) * s   when it has attention,
 *   h = (h / s + w_out(act(w_0 x) * w_1 x)) * s with x = rms_norm(h)       when it has a feed-forward part,
 * act GELU (erf or tanh form) or SiLU (or w_out(relu(w_in x)), T5 v1.0's). An encoder-decoder's
 * decoder block (T5's) also has, between the two, h = h + cross_out(attention(cross_q(rms_norm(h))))
 * over the encoder's keys and values, computed once per request and held in cache tensors of their
 * own (no position bias there: the bias masks the encoder's padding). Attention: q, k, v products plus their biases, per-head RMS norms of
 * q and k (Qwen3), the rotation of the first `rotary_dim` dims of each q and k head (half-split
 * pairs, cos / sin given per row), then softmax(q k^T * scale + bias) v (scale 1 / sqrt(dim_head)
 * unless the step says otherwise: T5 does not scale) where each of
 * `kv_heads` key heads serves heads / kv_heads consecutive query heads. The additive bias (position
 * bias and mask, [rows, bias_heads, keys] with bias_heads 1 or heads) is computed by the caller,
 * once per step, for each block (blocks of one sliding window share theirs).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gemv.h"

enum { ACT_GELU = 0, ACT_SILU = 1, ACT_GELU_TANH = 2, ACT_GELU_TANH_GATED = 3, ACT_RELU = 4 };

typedef struct {
    const float *attn_norm; /* NULL: the block has no attention */
    const float *attn_norm_bias; /* a LayerNorm's bias; NULL: none */
    Matrix q, k, v, out;
    const float *bias_q, *bias_k, *bias_v, *bias_out; /* NULL: none */
    const float *q_norm, *k_norm;                     /* [dim_head] per-head RMS norms, NULL: none */
    const float *ffn_norm;  /* NULL: the block has no feed-forward part */
    const float *ffn_norm_bias;
    Matrix w_0, w_1, w_out; /* w_1.weight NULL: not gated, w_out(act(w_0 x + bias_in)) + bias_ffn_out */
    const float *bias_in, *bias_ffn_out;
    int64_t activation;
    int64_t layer_norm; /* 1: LayerNorms (mean removed, then weight and bias), 0: RMS norms */
    const float *cross_norm; /* NULL: no cross-attention */
    Matrix cross_q, cross_out;
} Block;

/* What every block of one step shares. */
typedef struct {
    int64_t rows, dim, heads, kv_heads, dim_head, dim_ff, capacity, keys, bias_heads, rotary_dim;
    const int64_t *columns; /* [rows]: the cache column of each row's new position (< keys) */
    const int64_t *cache_rows; /* [rows]: the cache row each row reads and writes; NULL: its own */
    const float *cos, *sin; /* [rows, rotary_dim]; NULL: no rotation */
    float eps, residual_scale;
    int threads;
    int divides; /* 1: h = (h + branch) / s (model.stack.Block's scale), 0: h = (h / s + branch) * s */
    float scale; /* of q k^T; 0: 1 / sqrt(dim_head) */
    int64_t cross_keys; /* the encoder's columns cross-attention reads (0: none) */
    float *const *cross_key_caches, *const *cross_value_caches; /* [blocks]: [rows, heads, capacity, dim_head] */
    const float *cross_bias; /* [rows, cross_keys]: the encoder's padding masked */
} Step;

static inline int64_t cache_row(const Step *st, int64_t r) { return st->cache_rows ? st->cache_rows[r] : r; }

static void rms_norm(const float *h, const float *weight, float *out, int64_t rows, int64_t dim, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float *x = h + r * dim;
        float sum = 0;
        for (int64_t j = 0; j < dim; j++) sum += x[j] * x[j];
        float inv = 1.0f / sqrtf(sum / (float)dim + eps);
        for (int64_t j = 0; j < dim; j++) out[r * dim + j] = x[j] * inv * weight[j];
    }
}

/* LayerNorm over each row: (x - mean) / sqrt(variance + eps) * weight + bias (bias NULL: none). */
static void layer_norm(const float *h, const float *weight, const float *bias, float *out, int64_t rows,
                       int64_t dim, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float *x = h + r * dim;
        float mean = 0, variance = 0;
        for (int64_t j = 0; j < dim; j++) mean += x[j];
        mean /= (float)dim;
        for (int64_t j = 0; j < dim; j++) variance += (x[j] - mean) * (x[j] - mean);
        float inv = 1.0f / sqrtf(variance / (float)dim + eps);
        for (int64_t j = 0; j < dim; j++) out[r * dim + j] = (x[j] - mean) * inv * weight[j] + (bias ? bias[j] : 0.0f);
    }
}

static void block_norm(const Block *blk, const float *h, const float *weight, const float *bias, float *out,
                       int64_t rows, int64_t dim, float eps) {
    if (blk->layer_norm)
        layer_norm(h, weight, bias, out, rows, dim, eps);
    else
        rms_norm(h, weight, out, rows, dim, eps);
}

static void add_into(float *h, const float *y, int64_t count) {
    for (int64_t j = 0; j < count; j++) h[j] += y[j];
}

/* h = (h / scale + y [+ bias]) * scale over [rows, dim], as the blocks sum a scaled branch (a
 * plain h += y [+ bias] when scale is 1), or with `divides` h = (h + y [+ bias]) / scale. */
static void add_branch(float *h, const float *y, const float *bias, int64_t rows, int64_t dim, float scale,
                       int divides) {
    if (divides && scale != 1.0f) {
        for (int64_t r = 0; r < rows; r++)
            for (int64_t j = 0; j < dim; j++) {
                float sum = h[r * dim + j] + y[r * dim + j];
                if (bias) sum += bias[j];
                h[r * dim + j] = sum / scale;
            }
        return;
    }
    if (scale == 1.0f) {
        add_into(h, y, rows * dim);
        if (bias)
            for (int64_t r = 0; r < rows; r++) add_into(h + r * dim, bias, dim);
        return;
    }
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < dim; j++) {
            float sum = h[r * dim + j] / scale + y[r * dim + j];
            if (bias) sum += bias[j];
            h[r * dim + j] = sum * scale;
        }
}

/* x[r, :] += bias for each of `rows` rows of `width` (a projection's bias; nothing without one). */
static void add_bias(float *x, const float *bias, int64_t rows, int64_t width) {
    if (bias)
        for (int64_t r = 0; r < rows; r++) add_into(x + r * width, bias, width);
}

/* Each of the rows * heads heads of `x` [rows, heads, dim_head]: its RMS norm (weight [dim_head]),
 * when there is one; then the half-split rotation of its first `rotary` dims by row r's cos / sin:
 * x_i cos_i - x_{i+half} sin_i and x_{i+half} cos_{i+half} + x_i sin_{i+half}. */
static void norm_and_rotate(float *x, const float *norm, const Step *st, int64_t heads) {
    int64_t d = st->dim_head, half = st->rotary_dim / 2;
    for (int64_t r = 0; r < st->rows; r++)
        for (int64_t h = 0; h < heads; h++) {
            float *v = x + (r * heads + h) * d;
            if (norm) rms_norm(v, norm, v, 1, d, st->eps);
            if (!st->cos) continue;
            const float *c = st->cos + r * st->rotary_dim, *s = st->sin + r * st->rotary_dim;
            for (int64_t i = 0; i < half; i++) {
                float a = v[i], b = v[i + half];
                v[i] = a * c[i] - b * s[i];
                v[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
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

typedef struct {
    const float *q, *key_cache, *value_cache, *bias;
    float *out;
    const Step *st;
} Attention;

/* softmax(q k^T / sqrt(d) + bias) v of the (row, head) pairs first .. end - 1 over keys 0 .. keys-1;
 * query head h reads key / value head h / (heads / kv_heads). */
static void attend_heads(void *context, int64_t first, int64_t end) {
    const Attention *a = context;
    const Step *st = a->st;
    int64_t heads = st->heads, dim_head = st->dim_head, capacity = st->capacity, keys = st->keys;
    int64_t group = heads / st->kv_heads;
    float scale = st->scale != 0.0f ? st->scale : 1.0f / sqrtf((float)dim_head);
    float *scores = malloc((size_t)keys * sizeof(float));
    for (int64_t rh = first; rh < end; rh++) {
        int64_t r = rh / heads, h = rh % heads;
        int64_t kv = cache_row(st, r) * st->kv_heads + h / group;
        const float *qv = a->q + r * heads * dim_head + h * dim_head;
        const float *kc = a->key_cache + kv * capacity * dim_head, *vc = a->value_cache + kv * capacity * dim_head;
        const float *b = a->bias + (st->bias_heads == 1 ? r : rh) * keys;
        float peak = -INFINITY, total = 0;
        for (int64_t j = 0; j < keys; j++) {
            scores[j] = dot(qv, kc + j * dim_head, dim_head) * scale + b[j];
            peak = fmaxf(peak, scores[j]);
        }
        for (int64_t j = 0; j < keys; j++) total += (scores[j] = expf(scores[j] - peak));
        float *o = a->out + r * heads * dim_head + h * dim_head;
        memset(o, 0, (size_t)dim_head * sizeof(float));
        for (int64_t j = 0; j < keys; j++) axpy(scores[j] / total, vc + j * dim_head, o, dim_head);
    }
    free(scores);
}

static void attend(const float *q, const float *key_cache, const float *value_cache, const float *bias,
                   float *out, const Step *st) {
    Attention a = {q, key_cache, value_cache, bias, out, st};
    int64_t head_bytes = 2 * st->keys * st->dim_head * (int64_t)sizeof(float);
    pool_run(attend_heads, &a, st->rows * st->heads, 65536 / (head_bytes > 0 ? head_bytes : 1), st->threads);
}

/* Copy this step's keys and values ([rows, heads * dim_head]) to cache column `columns[r]` of
 * each row's cache row (rows of an engine's batch have lengths of their own; the drafted tokens
 * of one sequence are rows that share its cache row). */
static void store(float *cache, const float *x, const Step *st, int64_t heads) {
    int64_t dim_head = st->dim_head, capacity = st->capacity;
    for (int64_t r = 0; r < st->rows; r++)
        for (int64_t h = 0; h < heads; h++)
            memcpy(cache + ((cache_row(st, r) * heads + h) * capacity + st->columns[r]) * dim_head,
                   x + (r * heads + h) * dim_head, (size_t)dim_head * sizeof(float));
}

#ifdef CPMLIVE_VECTOR
/* exp(x) for x in [-87, 88] (clamped there): x = n ln 2 + r, |r| <= ln 2 / 2, a degree-6
 * polynomial for exp(r) (Cephes' expf coefficients) and 2^n from the exponent bits. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
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
    __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(ax, ax)));
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

/* a = gelu(a + bias) in its tanh form (GPT-2's gelu_new): 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))),
 * tanh(z) as 1 - 2 / (exp(2 z) + 1). `a` is [rows, count]; bias [count] or NULL. */
static void gelu_tanh(float *a, const float *bias, int64_t rows, int64_t count) {
    const float root = 0.7978845608028654f;
    for (int64_t r = 0; r < rows; r++) {
        float *x = a + r * count;
        int64_t j = 0;
        if (bias) add_into(x, bias, count);
#ifdef CPMLIVE_VECTOR
        __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f);
        for (; j + 8 <= count; j += 8) {
            __m256 v = _mm256_loadu_ps(x + j);
            __m256 cube = _mm256_mul_ps(_mm256_mul_ps(v, v), v);
            __m256 z = _mm256_mul_ps(_mm256_set1_ps(root), _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), cube, v));
            __m256 t = _mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(exp8(_mm256_add_ps(z, z)), one)));
            _mm256_storeu_ps(x + j, _mm256_mul_ps(_mm256_mul_ps(half, v), _mm256_add_ps(one, t)));
        }
#endif
        for (; j < count; j++) {
            float v = x[j];
            x[j] = 0.5f * v * (1.0f + tanhf(root * (v + 0.044715f * v * v * v)));
        }
    }
}

/* a = max(a + bias, 0) over [rows, count] (bias [count] or NULL). */
static void relu(float *a, const float *bias, int64_t rows, int64_t count) {
    for (int64_t r = 0; r < rows; r++) {
        float *x = a + r * count;
        if (bias) add_into(x, bias, count);
        for (int64_t j = 0; j < count; j++) x[j] = x[j] > 0.0f ? x[j] : 0.0f;
    }
}

/* a = a * b */
static void multiply_into(float *a, const float *b, int64_t count) {
    for (int64_t j = 0; j < count; j++) a[j] *= b[j];
}

/* a = silu(a) * b, SiLU as x / (1 + exp(-x)). */
static void silu_gate(float *a, const float *b, int64_t count) {
    int64_t j = 0;
#ifdef CPMLIVE_VECTOR
    __m256 one = _mm256_set1_ps(1.0f);
    for (; j + 8 <= count; j += 8) {
        __m256 x = _mm256_loadu_ps(a + j);
        __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
        _mm256_storeu_ps(a + j, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), _mm256_loadu_ps(b + j)));
    }
#endif
    for (; j < count; j++) a[j] = a[j] / (1.0f + expf(-a[j])) * b[j];
}

/* `hidden` [rows, dim] in place; `biases[i]` the attention bias of block i ([rows, bias_heads, keys],
 * columns a row must not see masked there); `key_caches[i]` and `value_caches[i]` the
 * [cache rows, kv_heads, capacity, dim_head] cache of block i (NULL without attention); row r's new
 * keys and values go to column `columns[r]` of cache row `cache_rows[r]` (every row's keys are
 * stored before any row attends, so the later tokens of one sequence see its earlier ones where
 * their bias lets them). The caches come with each call, so concurrent calls on one
 * model share only read-only state. */
void decode_blocks(const Block *blocks, int64_t num_blocks, const Step *st, float *const *key_caches,
                   float *const *value_caches, const float *const *biases, float *hidden) {
    int64_t rows = st->rows, dim = st->dim, width = st->heads * st->dim_head, kv_width = st->kv_heads * st->dim_head;
    int threads = st->threads;
    float *x = malloc((size_t)(rows * dim) * sizeof(float));
    float *q = malloc((size_t)(rows * width) * sizeof(float)), *att = malloc((size_t)(rows * width) * sizeof(float));
    float *k = malloc((size_t)(rows * kv_width) * sizeof(float)), *v = malloc((size_t)(rows * kv_width) * sizeof(float));
    float *y = malloc((size_t)(rows * dim) * sizeof(float));
    float *a = malloc((size_t)(rows * st->dim_ff) * sizeof(float)), *g = malloc((size_t)(rows * st->dim_ff) * sizeof(float));
    for (int64_t i = 0; i < num_blocks; i++) {
        const Block *blk = blocks + i;
        if (blk->attn_norm) {
            block_norm(blk, hidden, blk->attn_norm, blk->attn_norm_bias, x, rows, dim, st->eps);
            matrix_products((Matrix[]){blk->q, blk->k, blk->v}, (float *[]){q, k, v}, 3, x, rows, threads);
            add_bias(q, blk->bias_q, rows, width);
            add_bias(k, blk->bias_k, rows, kv_width);
            add_bias(v, blk->bias_v, rows, kv_width);
            norm_and_rotate(q, blk->q_norm, st, st->heads);
            norm_and_rotate(k, blk->k_norm, st, st->kv_heads);
            store(key_caches[i], k, st, st->kv_heads);
            store(value_caches[i], v, st, st->kv_heads);
            attend(q, key_caches[i], value_caches[i], biases[i], att, st);
            matrix_product(&blk->out, att, y, rows, threads);
            add_branch(hidden, y, blk->bias_out, rows, dim, st->residual_scale, st->divides);
        }
        if (blk->cross_norm) {
            Step cross = *st;
            cross.keys = st->cross_keys, cross.bias_heads = 1, cross.kv_heads = st->heads;
            rms_norm(hidden, blk->cross_norm, x, rows, dim, st->eps);
            matrix_product(&blk->cross_q, x, q, rows, threads);
            attend(q, st->cross_key_caches[i], st->cross_value_caches[i], st->cross_bias, att, &cross);
            matrix_product(&blk->cross_out, att, y, rows, threads);
            add_branch(hidden, y, NULL, rows, dim, st->residual_scale, st->divides);
        }
        if (blk->ffn_norm) {
            int64_t ff = blk->w_0.n;
            block_norm(blk, hidden, blk->ffn_norm, blk->ffn_norm_bias, x, rows, dim, st->eps);
            if (blk->w_1.weight) {
                matrix_products((Matrix[]){blk->w_0, blk->w_1}, (float *[]){a, g}, 2, x, rows, threads);
                if (blk->activation == ACT_GELU_TANH_GATED) {
                    gelu_tanh(a, NULL, rows, ff);
                    multiply_into(a, g, rows * ff);
                } else {
                    (blk->activation == ACT_SILU ? silu_gate : gelu_gate)(a, g, rows * ff);
                }
            } else {
                matrix_product(&blk->w_0, x, a, rows, threads);
                (blk->activation == ACT_RELU ? relu : gelu_tanh)(a, blk->bias_in, rows, ff);
            }
            matrix_product(&blk->w_out, a, y, rows, threads);
            add_branch(hidden, y, blk->bias_ffn_out, rows, dim, st->residual_scale, st->divides);
        }
    }
    free(x); free(q); free(k); free(v); free(att); free(y); free(a); free(g);
}
