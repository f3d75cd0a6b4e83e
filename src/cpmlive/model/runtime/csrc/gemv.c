/* Matrix-vector products for decoding on CPU: y[m, n] = sum_k x[m, k] * w[n, k] for a few rows m.
 *
 * Decoding one token reads every weight once and does two flops per weight, so its speed is the
 * rate at which weights stream from memory. These loops read each weight row once per call (every
 * x row uses it while it is in cache), keep eight independent accumulators in flight, and split
 * the output rows across threads (pool.c). Weight formats:
 *
 *   f32   float32
 *   bf16  bfloat16 (the upper half of a float32)
 *   f16   IEEE half
 *   i8    int8 codes and one float scale per output row; x stays float (weight-only)
 *   w8a8  int8 codes times int8 inputs, quantized here per row: scale = max(absmax / 127, 1e-12),
 *         code = round-half-even(x / scale)
 *   i4    4-bit codes two a byte (the even column in the low nibble), a float scale and an
 *         integer zero point per group of columns: w = (code - zero) * scale
 *
 * Each product has a scalar form (any CPU) and, when compiled for AVX2 + FMA, a vector form; the
 * two add the same terms in a different order.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "gemv.h"

#define INLINE static inline __attribute__((always_inline))
#define MIN_SCALE 1e-12f

enum { F32, BF16, F16, I8 };

INLINE float scalar_weight(const void *w, int kind, int64_t j) {
    uint32_t bits;
    float f;
    switch (kind) {
    case F32: return ((const float *)w)[j];
    case BF16:
        bits = (uint32_t)((const uint16_t *)w)[j] << 16;
        memcpy(&f, &bits, 4);
        return f;
    case F16: {
        uint16_t h = ((const uint16_t *)w)[j];
        uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
        if (exp == 31) {
            bits = sign | 0x7f800000u | (man << 13);
        } else if (exp) {
            bits = sign | ((exp + 112) << 23) | (man << 13);
        } else {
            f = ldexpf((float)man, -24);
            return sign ? -f : f;
        }
        memcpy(&f, &bits, 4);
        return f;
    }
    default: return (float)((const int8_t *)w)[j];
    }
}

INLINE size_t element_size(int kind) { return kind == F32 ? 4 : kind == I8 ? 1 : 2; }

#ifdef CPMLIVE_VECTOR
INLINE float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

INLINE int32_t hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* A tile reads four rows at once: four streams. When rows of int8 codes are short (a few KB, as
 * in models of a few hundred million parameters) the hardware prefetcher barely learns them
 * before they end (float rows, four times longer, it does follow), so
 * each step asks for the part of the next tile (contiguous after this one) that it will read at
 * the same pace; long rows are prefetched a fixed distance ahead within each row instead. */
#define SHORT_ROW_BYTES 16384
#define PREFETCH_AHEAD 512

INLINE void prefetch_tile(const char *w0, size_t row_bytes, int64_t offset, size_t step_bytes) {
    if (row_bytes <= SHORT_ROW_BYTES) {
        const char *next = w0 + 4 * row_bytes + 4 * offset;
        for (size_t b = 0; b < 4 * step_bytes; b += 64) _mm_prefetch(next + b, _MM_HINT_T0);
    } else {
        for (int r = 0; r < 4; r++)
            for (size_t b = 0; b < step_bytes; b += 64)
                _mm_prefetch(w0 + r * row_bytes + offset + PREFETCH_AHEAD + b, _MM_HINT_T0);
    }
}

/* Eight consecutive weights from element j, as floats. */
INLINE __m256 load8(const void *w, int kind, int64_t j) {
    switch (kind) {
    case F32: return _mm256_loadu_ps((const float *)w + j);
    case BF16: {
        __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + j)));
        return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    }
    case F16: return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + j)));
    default: return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)w + j))));
    }
}
#endif

/* Four output rows (i .. i+3) of a float-like product for every input row; `scale` (or NULL)
 * multiplies each output row. The columns go in chunks of K_CHUNK: the chunk of the four weight
 * rows stays in L1 while every input row's chunk passes over it. Each input row keeps its eight
 * vector sums in `acc` between chunks, so it adds its terms in the same order whether it is
 * alone or in a batch of any size (a row's result never depends on its batch). */
#define K_CHUNK 512
#define ROW_BLOCK 64

#ifdef CPMLIVE_VECTOR
INLINE void float_tile4_chunk(const char *w0, size_t row_bytes, int kind, const float *x, int64_t k,
                              int64_t rows, int64_t j0, int64_t j1, __m256 (*acc)[8], int prefetch) {
    const char *w1 = w0 + row_bytes, *w2 = w1 + row_bytes, *w3 = w2 + row_bytes;
    size_t esize = element_size(kind);
    int64_t m = 0;
    /* Two input rows at a time, each weight vector loaded once for both (a load per FMA is what
     * bounds one row), in two passes over the chunk: the first eight columns of every sixteen,
     * then the second eight, so that each accumulator adds the terms it adds alone. */
    const float *f0 = (const float *)w0, *f1 = (const float *)w1, *f2 = (const float *)w2, *f3 = (const float *)w3;
    for (; kind == F32 && m + 2 <= rows; m += 2) {  /* (several rows come as float32: widened if need be) */
        const float *xa = x + m * k, *xb = xa + k;
        for (int half = 0; half < 2; half++) {
            int o = 4 * half;
            __m256 a0 = acc[m][o], a1 = acc[m][o + 1], a2 = acc[m][o + 2], a3 = acc[m][o + 3];
            __m256 c0 = acc[m + 1][o], c1 = acc[m + 1][o + 1], c2 = acc[m + 1][o + 2], c3 = acc[m + 1][o + 3];
            for (int64_t j = j0 + 8 * half; j < j1; j += 16) {
                if (m == 0 && half == 0 && prefetch) prefetch_tile(w0, row_bytes, j * esize, 16 * esize);
                __m256 p = _mm256_loadu_ps(xa + j), q = _mm256_loadu_ps(xb + j);
                __m256 v0 = _mm256_loadu_ps(f0 + j), v1 = _mm256_loadu_ps(f1 + j);
                __m256 v2 = _mm256_loadu_ps(f2 + j), v3 = _mm256_loadu_ps(f3 + j);
                a0 = _mm256_fmadd_ps(v0, p, a0); c0 = _mm256_fmadd_ps(v0, q, c0);
                a1 = _mm256_fmadd_ps(v1, p, a1); c1 = _mm256_fmadd_ps(v1, q, c1);
                a2 = _mm256_fmadd_ps(v2, p, a2); c2 = _mm256_fmadd_ps(v2, q, c2);
                a3 = _mm256_fmadd_ps(v3, p, a3); c3 = _mm256_fmadd_ps(v3, q, c3);
            }
            acc[m][o] = a0; acc[m][o + 1] = a1; acc[m][o + 2] = a2; acc[m][o + 3] = a3;
            acc[m + 1][o] = c0; acc[m + 1][o + 1] = c1; acc[m + 1][o + 2] = c2; acc[m + 1][o + 3] = c3;
        }
    }
    for (; m < rows; m++) {
        const float *xm = x + m * k;
        __m256 a0 = acc[m][0], a1 = acc[m][1], a2 = acc[m][2], a3 = acc[m][3];
        __m256 b0 = acc[m][4], b1 = acc[m][5], b2 = acc[m][6], b3 = acc[m][7];
        for (int64_t j = j0; j < j1; j += 16) {
            if (m == 0 && prefetch) prefetch_tile(w0, row_bytes, j * esize, 16 * esize);  /* f32 rows: the hardware keeps up */
            __m256 x0 = _mm256_loadu_ps(xm + j), x1 = _mm256_loadu_ps(xm + j + 8);
            a0 = _mm256_fmadd_ps(load8(w0, kind, j), x0, a0);
            a1 = _mm256_fmadd_ps(load8(w1, kind, j), x0, a1);
            a2 = _mm256_fmadd_ps(load8(w2, kind, j), x0, a2);
            a3 = _mm256_fmadd_ps(load8(w3, kind, j), x0, a3);
            b0 = _mm256_fmadd_ps(load8(w0, kind, j + 8), x1, b0);
            b1 = _mm256_fmadd_ps(load8(w1, kind, j + 8), x1, b1);
            b2 = _mm256_fmadd_ps(load8(w2, kind, j + 8), x1, b2);
            b3 = _mm256_fmadd_ps(load8(w3, kind, j + 8), x1, b3);
        }
        acc[m][0] = a0; acc[m][1] = a1; acc[m][2] = a2; acc[m][3] = a3;
        acc[m][4] = b0; acc[m][5] = b1; acc[m][6] = b2; acc[m][7] = b3;
    }
}
#endif

INLINE void float_tile4_block(const char *w0, size_t row_bytes, int kind, const float *scale, const float *x,
                              float *y, int64_t i, int64_t n, int64_t k, int64_t rows) {
    const char *w[4] = {w0, w0 + row_bytes, w0 + 2 * row_bytes, w0 + 3 * row_bytes};
    int64_t j = 0;
#ifdef CPMLIVE_VECTOR
    __m256 acc[ROW_BLOCK][8];
    for (int64_t m = 0; m < rows; m++)
        for (int c = 0; c < 8; c++) acc[m][c] = _mm256_setzero_ps();
    int64_t vector_end = k - k % 16;
    for (; j < vector_end; j += K_CHUNK) {
        int64_t end = j + K_CHUNK < vector_end ? j + K_CHUNK : vector_end;
        if (kind == F32 || rows == 1) {
            float_tile4_chunk(w0, row_bytes, kind, x, k, rows, j, end, acc, kind != F32);
        } else {  /* several rows (a batch, drafted tokens): widen the chunk once, not once a row */
            static _Thread_local float widened[4 * K_CHUNK];
            size_t esize = element_size(kind), wide_bytes = K_CHUNK * sizeof(float);
            for (int64_t t = j; t < end; t += 16) {
                prefetch_tile(w0, row_bytes, t * esize, 16 * esize);
                for (int c = 0; c < 4; c++) {
                    float *out = widened + c * K_CHUNK + (t - j);
                    _mm256_storeu_ps(out, load8(w[c], kind, t));
                    _mm256_storeu_ps(out + 8, load8(w[c], kind, t + 8));
                }
            }
            /* the widened rows against the inputs' columns j .. end - 1 */
            float_tile4_chunk((const char *)widened, wide_bytes, F32, x + j, k, rows, 0, end - j, acc, 0);
        }
    }
    j = vector_end;
#endif
    for (int64_t m = 0; m < rows; m++) {
        const float *xm = x + m * k;
        float *ym = y + m * n + i;
        for (int c = 0; c < 4; c++) {
#ifdef CPMLIVE_VECTOR
            float sum = hsum(_mm256_add_ps(acc[m][c], acc[m][c + 4]));
#else
            float sum = 0;
#endif
            for (int64_t t = j; t < k; t++) sum += scalar_weight(w[c], kind, t) * xm[t];
            ym[c] = scale ? sum * scale[i + c] : sum;
        }
    }
}

#ifdef CPMLIVE_VECTOR
/* A tile of one input row with float16 weights, row after row: the same sums as
 * float_tile4_block's, in the same order, but the weights are read as one stream (prefetched
 * ONE_ROW_AHEAD bytes ahead), which measured 5-10% faster than four interleaved rows for float16,
 * and slower for float32 and int8 (benchmarks/README.md). */
#define ONE_ROW_AHEAD 1024

INLINE void f16_tile4_one_row(const char *w0, size_t row_bytes, const float *x, float *y, int64_t i, int64_t k) {
    int64_t vector_end = k - k % 16;
    for (int c = 0; c < 4; c++) {
        const char *wr = w0 + c * row_bytes;
        __m256 a = _mm256_setzero_ps(), b = a;
        for (int64_t j = 0; j < vector_end; j += 16) {
            _mm_prefetch(wr + 2 * j + ONE_ROW_AHEAD, _MM_HINT_T0);
            a = _mm256_fmadd_ps(load8(wr, F16, j), _mm256_loadu_ps(x + j), a);
            b = _mm256_fmadd_ps(load8(wr, F16, j + 8), _mm256_loadu_ps(x + j + 8), b);
        }
        float sum = hsum(_mm256_add_ps(a, b));
        for (int64_t t = vector_end; t < k; t++) sum += scalar_weight(wr, F16, t) * x[t];
        y[i + c] = sum;
    }
}
#endif

INLINE void float_tile4(const void *w, int kind, const float *scale, const float *x, float *y,
                        int64_t i, int64_t n, int64_t k, int64_t rows) {
    size_t row_bytes = (size_t)k * element_size(kind);
    const char *w0 = (const char *)w + i * row_bytes;
#ifdef CPMLIVE_VECTOR
    if (rows == 1 && kind == F16) {
        f16_tile4_one_row(w0, row_bytes, x, y, i, k);
        return;
    }
#endif
    for (int64_t m = 0; m < rows; m += ROW_BLOCK)
        float_tile4_block(w0, row_bytes, kind, scale, x + m * k, y + m * n, i, n, k,
                          rows - m < ROW_BLOCK ? rows - m : ROW_BLOCK);
}

INLINE void float_row(const void *w, int kind, const float *scale, const float *x, float *y,
                      int64_t i, int64_t n, int64_t k, int64_t rows) {
    const char *wi = (const char *)w + i * (size_t)k * element_size(kind);
    for (int64_t m = 0; m < rows; m++) {
        float s = 0;
        for (int64_t j = 0; j < k; j++) s += scalar_weight(wi, kind, j) * x[m * k + j];
        y[m * n + i] = scale ? s * scale[i] : s;
    }
}

/* The output rows i .. i + count - 1 of a float-like product: whole tiles of four, then single rows. */
INLINE void float_rows(const void *w, int kind, const float *scale, const float *x, float *y,
                       int64_t i, int64_t count, int64_t n, int64_t k, int64_t rows) {
    if (count == 4)
        float_tile4(w, kind, scale, x, y, i, n, k, rows);
    else
        for (int64_t r = i; r < i + count; r++) float_row(w, kind, scale, x, y, r, n, k, rows);
}

/* ---- int8 x int8 ----------------------------------------------------------------------------- */

/* Codes and scale of one input row, as torch computes them in cpmlive.model.quant (the same
 * division and round-half-to-even in both forms). */
static float quantize_row(const float *x, int8_t *codes, int64_t k) {
    float peak = 0;
    int64_t j = 0;
#ifdef CPMLIVE_VECTOR
    __m256 top = _mm256_setzero_ps(), magnitude_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (; j + 8 <= k; j += 8) top = _mm256_max_ps(top, _mm256_and_ps(_mm256_loadu_ps(x + j), magnitude_mask));
    float lanes[8];
    _mm256_storeu_ps(lanes, top);
    for (int t = 0; t < 8; t++) peak = fmaxf(peak, lanes[t]);
#endif
    for (; j < k; j++) peak = fmaxf(peak, fabsf(x[j]));
    float scale = fmaxf(peak / 127.0f, MIN_SCALE);
    j = 0;
#ifdef CPMLIVE_VECTOR
    __m256 vscale = _mm256_set1_ps(scale), low = _mm256_set1_ps(-127.0f), high = _mm256_set1_ps(127.0f);
    for (; j + 8 <= k; j += 8) {
        __m256 q = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + j), vscale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m256i n = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(q, low), high));
        __m128i n16 = _mm_packs_epi32(_mm256_castsi256_si128(n), _mm256_extracti128_si256(n, 1));
        _mm_storel_epi64((__m128i *)(codes + j), _mm_packs_epi16(n16, n16));
    }
#endif
    for (; j < k; j++) {
        float q = nearbyintf(x[j] / scale);
        codes[j] = (int8_t)fminf(fmaxf(q, -127.0f), 127.0f);
    }
    return scale;
}

INLINE int32_t dot_i8(const int8_t *a, const int8_t *b, int64_t k) {
    int32_t s = 0;
    int64_t j = 0;
#ifdef CPMLIVE_VECTOR
    /* |b| (unsigned) times a with b's sign: |b| <= 128 fits a byte even for the code -128, and
     * maddubs' pair sums stay below 2 * 128 * 127. */
    __m256i acc0 = _mm256_setzero_si256(), acc1 = acc0, ones = _mm256_set1_epi16(1);
    for (; j + 64 <= k; j += 64) {
        __m256i a0 = _mm256_loadu_si256((const __m256i *)(a + j)), b0 = _mm256_loadu_si256((const __m256i *)(b + j));
        __m256i a1 = _mm256_loadu_si256((const __m256i *)(a + j + 32)), b1 = _mm256_loadu_si256((const __m256i *)(b + j + 32));
        __m256i p0 = _mm256_maddubs_epi16(_mm256_sign_epi8(b0, b0), _mm256_sign_epi8(a0, b0));
        __m256i p1 = _mm256_maddubs_epi16(_mm256_sign_epi8(b1, b1), _mm256_sign_epi8(a1, b1));
        acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(p0, ones));
        acc1 = _mm256_add_epi32(acc1, _mm256_madd_epi16(p1, ones));
    }
    for (; j + 32 <= k; j += 32) {
        __m256i a0 = _mm256_loadu_si256((const __m256i *)(a + j)), b0 = _mm256_loadu_si256((const __m256i *)(b + j));
        acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(b0, b0),
                                                                            _mm256_sign_epi8(a0, b0)), ones));
    }
    s = hsum_i32(_mm256_add_epi32(acc0, acc1));
#endif
    for (; j < k; j++) s += (int32_t)a[j] * (int32_t)b[j];
    return s;
}

/* Four rows of codes against one int8 input row: x is read (and its magnitudes made) once. */
INLINE void dot4_i8(const int8_t *a, const int8_t *b0, const int8_t *b1, const int8_t *b2, const int8_t *b3,
                    int64_t k, int prefetch, int32_t out[4]) {
    int64_t j = 0;
    int32_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#ifdef CPMLIVE_VECTOR
    __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0, ones = _mm256_set1_epi16(1);
    for (; j + 32 <= k; j += 32) {
        if (prefetch) prefetch_tile((const char *)b0, (size_t)k, j, 32);
        __m256i av = _mm256_loadu_si256((const __m256i *)(a + j)), bv;
        /* |b| (unsigned) times a with b's sign: see dot_i8. */
#define DOT_ROW(acc, b) bv = _mm256_loadu_si256((const __m256i *)((b) + j)); \
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(bv, bv), \
                                                                           _mm256_sign_epi8(av, bv)), ones))
        DOT_ROW(c0, b0); DOT_ROW(c1, b1); DOT_ROW(c2, b2); DOT_ROW(c3, b3);
#undef DOT_ROW
    }
    s0 = hsum_i32(c0); s1 = hsum_i32(c1); s2 = hsum_i32(c2); s3 = hsum_i32(c3);
#endif
    for (; j < k; j++) {
        s0 += (int32_t)a[j] * b0[j]; s1 += (int32_t)a[j] * b1[j];
        s2 += (int32_t)a[j] * b2[j]; s3 += (int32_t)a[j] * b3[j];
    }
    out[0] = s0; out[1] = s1; out[2] = s2; out[3] = s3;
}

/* The output rows i .. i + count - 1 (a tile of four, or one row) of an int8 x int8 product
 * whose input rows are `codes` with scales `x_scale`. */
INLINE void w8a8_rows(const int8_t *w, const float *scale, const int8_t *codes, const float *x_scale, float *y,
                      int64_t i, int64_t count, int64_t n, int64_t k, int64_t rows) {
    if (count == 4) {
        const int8_t *w0 = w + i * k;
        for (int64_t m = 0; m < rows; m++) {
            int32_t sums[4];
            dot4_i8(codes + m * k, w0, w0 + k, w0 + 2 * k, w0 + 3 * k, k, m == 0, sums);
            for (int r = 0; r < 4; r++) y[m * n + i + r] = (float)sums[r] * x_scale[m] * scale[i + r];
        }
        return;
    }
    for (int64_t r = i; r < i + count; r++)
        for (int64_t m = 0; m < rows; m++)
            y[m * n + r] = (float)dot_i8(codes + m * k, w + r * k, k) * x_scale[m] * scale[r];
}

/* ---- int4 groups ------------------------------------------------------------------------------ */

/* One output row of an int4 product: sum over groups of scale * (codes . x - zero * sum(x)).
 * `xs` is the input row deinterleaved per 16 columns (the 8 even ones, then the 8 odd ones, as
 * a byte's low and high nibbles hold them); `group_sum` its sum per group. */
INLINE float int4_row(const uint8_t *packed, const float *scale, const uint8_t *zero, const float *xs,
                      const float *group_sum, int64_t k, int64_t group) {
    int64_t groups = k / group;
    float correction = 0, s = 0;
    for (int64_t g = 0; g < groups; g++) correction += scale[g] * (float)zero[g] * group_sum[g];
#ifdef CPMLIVE_VECTOR
    __m256 total0 = _mm256_setzero_ps(), total1 = total0;
    __m128i low_mask = _mm_set1_epi8(0x0f);
    for (int64_t g = 0; g < groups; g++) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0;
        const uint8_t *codes = packed + g * group / 2;
        const float *xg = xs + g * group;
        for (int64_t j = 0; j < group; j += 16) {
            __m128i bytes = _mm_loadl_epi64((const __m128i *)(codes + j / 2));
            __m128i low = _mm_and_si128(bytes, low_mask), high = _mm_and_si128(_mm_srli_epi16(bytes, 4), low_mask);
            a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(low)), _mm256_loadu_ps(xg + j), a0);
            a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(high)), _mm256_loadu_ps(xg + j + 8), a1);
        }
        __m256 group_scale = _mm256_set1_ps(scale[g]);
        total0 = _mm256_fmadd_ps(group_scale, a0, total0);
        total1 = _mm256_fmadd_ps(group_scale, a1, total1);
    }
    s = hsum(_mm256_add_ps(total0, total1));
#else
    for (int64_t g = 0; g < groups; g++) {
        float d = 0;
        for (int64_t j = 0; j < group; j += 16)
            for (int t = 0; t < 8; t++) {
                uint8_t b = packed[(g * group + j) / 2 + t];
                d += (float)(b & 0x0f) * xs[g * group + j + t] + (float)(b >> 4) * xs[g * group + j + 8 + t];
            }
        s += scale[g] * d;
    }
#endif
    return s - correction;
}

INLINE int kind_bits(int64_t kind) {
    return kind == KIND_F32 ? 32 : kind == KIND_BF16 || kind == KIND_F16 ? 16 : kind == KIND_I4 ? 4 : 8;
}

/* ---- products in one parallel loop ----------------------------------------------------------- */

/* One product prepared for its units of work: a unit is a tile of four output rows (a single row
 * for the last n % 4, and every row of an int4 product), computed as the product alone computes it. */
typedef struct {
    const Matrix *m;
    const float *x;
    float *y;
    int64_t rows, units, tiles;
    int8_t *codes;                 /* w8a8: the input rows as int8 codes */
    float *x_scale;                /* w8a8: their scales */
    float *xs, *group_sum;         /* i4: the input rows deinterleaved per 16 columns, their sums per group */
} Job;

static void prepare(Job *job, const Matrix *m, const float *x, float *y, int64_t rows) {
    int64_t n = m->n, k = m->k;
    *job = (Job){.m = m, .x = x, .y = y, .rows = rows, .tiles = n / 4, .units = n / 4 + n % 4};
    if (m->kind == KIND_W8A8) {
        job->codes = malloc((size_t)(rows * k));
        job->x_scale = malloc((size_t)rows * sizeof(float));
        for (int64_t r = 0; r < rows; r++) job->x_scale[r] = quantize_row(x + r * k, job->codes + r * k, k);
    } else if (m->kind == KIND_I4) {
        int64_t groups = k / m->group;
        job->tiles = 0;
        job->units = n;
        job->xs = malloc((size_t)(rows * k) * sizeof(float));
        job->group_sum = malloc((size_t)(rows * groups) * sizeof(float));
        for (int64_t r = 0; r < rows; r++) {
            const float *xm = x + r * k;
            for (int64_t j = 0; j < k; j += 16)
                for (int t = 0; t < 8; t++) {
                    job->xs[r * k + j + t] = xm[j + 2 * t];
                    job->xs[r * k + j + 8 + t] = xm[j + 2 * t + 1];
                }
            for (int64_t g = 0; g < groups; g++) {
                float sum = 0;
                for (int64_t j = 0; j < m->group; j++) sum += xm[g * m->group + j];
                job->group_sum[r * groups + g] = sum;
            }
        }
    }
}

static void run_unit(const Job *job, int64_t u) {
    const Matrix *m = job->m;
    int64_t n = m->n, k = m->k, rows = job->rows;
    int64_t i = u < job->tiles ? 4 * u : 4 * job->tiles + (u - job->tiles), count = u < job->tiles ? 4 : 1;
    static const int float_kind[] = {[KIND_F32] = F32, [KIND_BF16] = BF16, [KIND_F16] = F16, [KIND_I8] = I8};
    switch (m->kind) {
    case KIND_W8A8:
        w8a8_rows(m->weight, m->scale, job->codes, job->x_scale, job->y, i, count, n, k, rows);
        break;
    case KIND_I4: {
        int64_t groups = k / m->group;
        for (int64_t r = 0; r < rows; r++)
            job->y[r * n + i] = int4_row((const uint8_t *)m->weight + i * (k / 2), m->scale + i * groups,
                                         m->zero + i * groups, job->xs + r * k, job->group_sum + r * groups, k,
                                         m->group);
        break;
    }
    default:
        float_rows(m->weight, float_kind[m->kind], m->kind == KIND_I8 ? m->scale : NULL, job->x, job->y, i, count,
                   n, k, rows);
    }
}

typedef struct {
    const Job *jobs;
} Products;

static void run_units(void *context, int64_t first, int64_t end) {
    const Job *job = ((const Products *)context)->jobs;
    int64_t local = first;
    while (local >= job->units) local -= (job++)->units;
    for (int64_t u = first; u < end; u++) {
        run_unit(job, local);
        if (++local == job->units) local = 0, job++;
    }
}

/* Units claimed at a time: about CHUNK_BYTES of weights, so that claims cost little and the
 * caller waits at the end for no more than one chunk of a helper. */
#define CHUNK_BYTES (256 * 1024)

void matrix_products(const Matrix *ms, float *const *ys, int count, const float *x, int64_t rows, int threads) {
    Job jobs[MAX_PRODUCTS];
    int64_t total = 0;
    for (int p = 0; p < count; p++) {
        prepare(&jobs[p], &ms[p], x, ys[p], rows);
        total += jobs[p].units;
    }
    int64_t unit_bytes = (ms[0].kind == KIND_I4 ? 1 : 4) * ms[0].k * (int64_t)kind_bits(ms[0].kind) / 8;
    Products products = {jobs};
    pool_run(run_units, &products, total, CHUNK_BYTES / (unit_bytes > 0 ? unit_bytes : 1), threads);
    for (int p = 0; p < count; p++) {
        free(jobs[p].codes); free(jobs[p].x_scale); free(jobs[p].xs); free(jobs[p].group_sum);
    }
}

void matrix_product(const Matrix *m, const float *x, float *y, int64_t rows, int threads) {
    matrix_products(m, &y, 1, x, rows, threads);
}

/* The single products native.py calls. */
static void product(int64_t kind, const void *w, const float *scale, const uint8_t *zero, int64_t group,
                    const float *x, float *y, int64_t n, int64_t k, int64_t rows, int threads) {
    Matrix m = {.kind = kind, .weight = w, .scale = scale, .zero = zero, .n = n, .k = k, .group = group};
    matrix_product(&m, x, y, rows, threads);
}

void gemv_f32(const float *w, const float *x, float *y, int64_t n, int64_t k, int64_t rows, int threads) {
    product(KIND_F32, w, NULL, NULL, 0, x, y, n, k, rows, threads);
}
void gemv_bf16(const uint16_t *w, const float *x, float *y, int64_t n, int64_t k, int64_t rows, int threads) {
    product(KIND_BF16, w, NULL, NULL, 0, x, y, n, k, rows, threads);
}
void gemv_f16(const uint16_t *w, const float *x, float *y, int64_t n, int64_t k, int64_t rows, int threads) {
    product(KIND_F16, w, NULL, NULL, 0, x, y, n, k, rows, threads);
}
void gemv_i8(const int8_t *w, const float *scale, const float *x, float *y, int64_t n, int64_t k,
             int64_t rows, int threads) {
    product(KIND_I8, w, scale, NULL, 0, x, y, n, k, rows, threads);
}
void gemv_w8a8(const int8_t *w, const float *scale, const float *x, float *y, int64_t n, int64_t k,
               int64_t rows, int threads) {
    product(KIND_W8A8, w, scale, NULL, 0, x, y, n, k, rows, threads);
}
void gemv_i4(const uint8_t *w, const float *scale, const uint8_t *zero, const float *x, float *y,
             int64_t n, int64_t k, int64_t group, int64_t rows, int threads) {
    product(KIND_I4, w, scale, zero, group, x, y, n, k, rows, threads);
}
