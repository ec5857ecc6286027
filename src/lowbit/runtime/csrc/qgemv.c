/* Batch-few matrix-vector products on lowbit's packed integer weights, without a float copy.
 *
 *   y[b, o] = sum_g  s[o, g] * sum_{i in g} x[b, i] * q[o, i]  -  sz[o, g] * sum_{i in g} x[b, i]
 *
 * which is x . ((q - z) * s) per group, with sz = s * z precomputed. q is stored as lowbit stores
 * it: row-major, LSB-first, so for 4 bits byte k of a row holds q[2k] (low nibble) and q[2k+1]
 * (high nibble), and for 8 bits one byte per weight. Groups are whole multiples of 32 weights
 * (the caller checks); the per-group x sums are computed once per call and shared by all rows.
 * For 4 bits the caller passes x de-interleaved per 32-block (even positions, then odd), so that
 * the low and high nibbles of 16 bytes meet 16 contiguous floats each.
 */
#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define MAXB 8

/* x_sum[b, g] = sum of x[b, i] over group g */
static void group_sums(const float *x, int64_t batch, int64_t in, int64_t group, int64_t n_groups, float *x_sum) {
    for (int64_t b = 0; b < batch; b++)
        for (int64_t g = 0; g < n_groups; g++) {
            int64_t lo = g * group, hi = lo + group < in ? lo + group : in;
            float acc = 0.f;
            for (int64_t i = lo; i < hi; i++) acc += x[b * in + i];
            x_sum[b * n_groups + g] = acc;
        }
}

/* codes [out, in/2] bytes; xd [batch, in] de-interleaved x; scale, sz [out, n_groups]; y [batch, out].
 * Vector accumulators carry the scale (acc += s * (q . x) per 32-block), so no horizontal sum is
 * needed until the end of a row; the zero-point term is a scalar per group. */
void lowbit_gemv_int4(const uint8_t *codes, const float *x, const float *xd, const float *scale, const float *sz,
                      float *y, int64_t batch, int64_t out, int64_t in, int64_t group, int64_t n_groups, float *x_sum) {
    group_sums(x, batch, in, group, n_groups, x_sum);
    #pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < out; o++) {
        const uint8_t *row = codes + o * (in / 2);
        float zacc[MAXB] = {0};
#ifdef __AVX512F__
        __m512 acc[MAXB];
        for (int64_t b = 0; b < batch; b++) acc[b] = _mm512_setzero_ps();
        const __m128i mask = _mm_set1_epi8(0x0F);
        for (int64_t g = 0; g < n_groups; g++) {
            int64_t lo = g * group, hi = lo + group < in ? lo + group : in;
            __m512 s = _mm512_set1_ps(scale[o * n_groups + g]);
            for (int64_t i = lo; i < hi; i += 32) {
                __m128i bytes = _mm_loadu_si128((const __m128i *)(row + i / 2));
                __m512 qlo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(bytes, mask)));
                __m512 qhi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask)));
                for (int64_t b = 0; b < batch; b++) {
                    const float *xb = xd + b * in + i;
                    __m512 p = _mm512_mul_ps(qlo, _mm512_loadu_ps(xb));
                    p = _mm512_fmadd_ps(qhi, _mm512_loadu_ps(xb + 16), p);
                    acc[b] = _mm512_fmadd_ps(p, s, acc[b]);
                }
            }
            for (int64_t b = 0; b < batch; b++) zacc[b] += sz[o * n_groups + g] * x_sum[b * n_groups + g];
        }
        for (int64_t b = 0; b < batch; b++) y[b * out + o] = _mm512_reduce_add_ps(acc[b]) - zacc[b];
#else
        float acc[MAXB] = {0};
        for (int64_t g = 0; g < n_groups; g++) {
            int64_t lo = g * group, hi = lo + group < in ? lo + group : in;
            float dot[MAXB] = {0};
            for (int64_t i = lo; i < hi; i += 32)
                for (int64_t j = 0; j < 16; j++) {
                    uint8_t byte = row[i / 2 + j];
                    float ql = (float)(byte & 15), qh = (float)(byte >> 4);
                    for (int64_t b = 0; b < batch; b++)
                        dot[b] += ql * xd[b * in + i + j] + qh * xd[b * in + i + 16 + j];
                }
            for (int64_t b = 0; b < batch; b++) {
                acc[b] += scale[o * n_groups + g] * dot[b];
                zacc[b] += sz[o * n_groups + g] * x_sum[b * n_groups + g];
            }
        }
        for (int64_t b = 0; b < batch; b++) y[b * out + o] = acc[b] - zacc[b];
#endif
    }
}

/* codes [out, in] bytes; x [batch, in]; scale, sz [out, n_groups]; y [batch, out] */
void lowbit_gemv_int8(const uint8_t *codes, const float *x, const float *scale, const float *sz,
                      float *y, int64_t batch, int64_t out, int64_t in, int64_t group, int64_t n_groups, float *x_sum) {
    group_sums(x, batch, in, group, n_groups, x_sum);
    #pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < out; o++) {
        const uint8_t *row = codes + o * in;
        float zacc[MAXB] = {0};
#ifdef __AVX512F__
        __m512 acc[MAXB];
        for (int64_t b = 0; b < batch; b++) acc[b] = _mm512_setzero_ps();
        for (int64_t g = 0; g < n_groups; g++) {
            int64_t lo = g * group, hi = lo + group < in ? lo + group : in;
            __m512 s = _mm512_set1_ps(scale[o * n_groups + g]);
            for (int64_t i = lo; i < hi; i += 32) {
                __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + i))));
                __m512 q1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + i + 16))));
                for (int64_t b = 0; b < batch; b++) {
                    const float *xb = x + b * in + i;
                    __m512 p = _mm512_mul_ps(q0, _mm512_loadu_ps(xb));
                    p = _mm512_fmadd_ps(q1, _mm512_loadu_ps(xb + 16), p);
                    acc[b] = _mm512_fmadd_ps(p, s, acc[b]);
                }
            }
            for (int64_t b = 0; b < batch; b++) zacc[b] += sz[o * n_groups + g] * x_sum[b * n_groups + g];
        }
        for (int64_t b = 0; b < batch; b++) y[b * out + o] = _mm512_reduce_add_ps(acc[b]) - zacc[b];
#else
        float acc[MAXB] = {0};
        for (int64_t g = 0; g < n_groups; g++) {
            int64_t lo = g * group, hi = lo + group < in ? lo + group : in;
            float dot[MAXB] = {0};
            for (int64_t i = lo; i < hi; i++)
                for (int64_t b = 0; b < batch; b++) dot[b] += (float)row[i] * x[b * in + i];
            for (int64_t b = 0; b < batch; b++) {
                acc[b] += scale[o * n_groups + g] * dot[b];
                zacc[b] += sz[o * n_groups + g] * x_sum[b * n_groups + g];
            }
        }
        for (int64_t b = 0; b < batch; b++) y[b * out + o] = acc[b] - zacc[b];
#endif
    }
}

/* w [out, in] = (q - z) * s exactly as lowbit decodes it, for prefill (many rows: dequantize
 * once, then a float matmul) */
void lowbit_dequant(const uint8_t *codes, int bits, const float *scale, const float *zero, float *w,
                    int64_t out, int64_t in, int64_t group, int64_t n_groups) {
    #pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < out; o++) {
        for (int64_t i = 0; i < in; i++) {
            int64_t g = i / group;
            float q = bits == 4 ? (float)((codes[(o * in + i) / 2] >> (4 * (i & 1))) & 15) : (float)codes[o * in + i];
            w[o * in + i] = (q - zero[o * n_groups + g]) * scale[o * n_groups + g];
        }
    }
}
