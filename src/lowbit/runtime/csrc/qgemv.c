/* Batch-few matrix-vector products on lowbit's stored weights, without a float copy.
 *
 *   y[b, o] = sum_g  s[o, g] * sum_{i in g} x[b, i] * q[o, i]  -  s[o, g] * z[o, g] * sum_{i in g} x[b, i]
 *
 * which is x . ((q - z) * s) per group. Everything is read as the artifact stores it: codes
 * row-major and LSB-first (4 bits: byte k of a row holds q[2k] in its low nibble and q[2k+1] in
 * its high one; 8 bits: one byte each), scales as fp16 bits [out, n_groups], zero points as one
 * byte per group or, for symmetric grids, one constant. Groups are whole multiples of 32 weights
 * (the caller checks); the per-group sums of x are computed once per call and shared by all rows.
 * Arithmetic is fp32 throughout. Also here: the same product for bf16/fp16 dense weights (a tied
 * embedding used as the output layer), and the exact decode used for many-row inputs.
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define LOWBIT_AVX512 1
#endif
#if defined(LOWBIT_AVX512) || defined(__F16C__)
#include <immintrin.h>
#endif

#define MAXB 8

static inline float half_to_float(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3FF) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

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

static inline float zero_of(const uint8_t *zero, float zc, int64_t k) { return zero ? (float)zero[k] : zc; }

/* codes [out, in/2]; x [batch, in]; scale fp16 [out, n_groups]; zero uint8 [out, n_groups] or NULL
 * (then zc); y [batch, out]. Vector accumulators carry the scale (acc += s * (q . x) per 32-block),
 * so a row needs one horizontal sum; the zero-point term is a scalar per group. */
void lowbit_gemv_int4(const uint8_t *codes, const float *x, const uint16_t *scale, const uint8_t *zero, float zc,
                      float *y, int64_t batch, int64_t out, int64_t in, int64_t group, int64_t n_groups, float *x_sum) {
    group_sums(x, batch, in, group, n_groups, x_sum);
    #pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < out; o++) {
        const uint8_t *row = codes + o * (in / 2);
        float zacc[MAXB] = {0};
#ifdef LOWBIT_AVX512
        /* the low nibbles of 16 bytes are the even positions of a 32-block, the high ones the odd */
        const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
        const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
        const __m128i mask = _mm_set1_epi8(0x0F);
        __m512 acc[MAXB];
        for (int64_t b = 0; b < batch; b++) acc[b] = _mm512_setzero_ps();
        for (int64_t g = 0; g < n_groups; g++) {
            int64_t lo = g * group, hi = lo + group < in ? lo + group : in;
            float sg = half_to_float(scale[o * n_groups + g]);
            __m512 s = _mm512_set1_ps(sg);
            for (int64_t i = lo; i < hi; i += 32) {
                __m128i bytes = _mm_loadu_si128((const __m128i *)(row + i / 2));
                __m512 qlo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(bytes, mask)));
                __m512 qhi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask)));
                for (int64_t b = 0; b < batch; b++) {
                    const float *xb = x + b * in + i;
                    __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
                    __m512 p = _mm512_mul_ps(qlo, _mm512_permutex2var_ps(x0, even, x1));
                    p = _mm512_fmadd_ps(qhi, _mm512_permutex2var_ps(x0, odd, x1), p);
                    acc[b] = _mm512_fmadd_ps(p, s, acc[b]);
                }
            }
            float sz = sg * zero_of(zero, zc, o * n_groups + g);
            for (int64_t b = 0; b < batch; b++) zacc[b] += sz * x_sum[b * n_groups + g];
        }
        for (int64_t b = 0; b < batch; b++) y[b * out + o] = _mm512_reduce_add_ps(acc[b]) - zacc[b];
#else
        float acc[MAXB] = {0};
        for (int64_t g = 0; g < n_groups; g++) {
            int64_t lo = g * group, hi = lo + group < in ? lo + group : in;
            float sg = half_to_float(scale[o * n_groups + g]);
            float dot[MAXB] = {0};
            for (int64_t i = lo; i < hi; i += 2) {
                uint8_t byte = row[i / 2];
                float ql = (float)(byte & 15), qh = (float)(byte >> 4);
                for (int64_t b = 0; b < batch; b++) dot[b] += ql * x[b * in + i] + qh * x[b * in + i + 1];
            }
            float sz = sg * zero_of(zero, zc, o * n_groups + g);
            for (int64_t b = 0; b < batch; b++) {
                acc[b] += sg * dot[b];
                zacc[b] += sz * x_sum[b * n_groups + g];
            }
        }
        for (int64_t b = 0; b < batch; b++) y[b * out + o] = acc[b] - zacc[b];
#endif
    }
}

/* codes [out, in]; otherwise as lowbit_gemv_int4 */
void lowbit_gemv_int8(const uint8_t *codes, const float *x, const uint16_t *scale, const uint8_t *zero, float zc,
                      float *y, int64_t batch, int64_t out, int64_t in, int64_t group, int64_t n_groups, float *x_sum) {
    group_sums(x, batch, in, group, n_groups, x_sum);
    #pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < out; o++) {
        const uint8_t *row = codes + o * in;
        float zacc[MAXB] = {0};
#ifdef LOWBIT_AVX512
        __m512 acc[MAXB];
        for (int64_t b = 0; b < batch; b++) acc[b] = _mm512_setzero_ps();
        for (int64_t g = 0; g < n_groups; g++) {
            int64_t lo = g * group, hi = lo + group < in ? lo + group : in;
            float sg = half_to_float(scale[o * n_groups + g]);
            __m512 s = _mm512_set1_ps(sg);
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
            float sz = sg * zero_of(zero, zc, o * n_groups + g);
            for (int64_t b = 0; b < batch; b++) zacc[b] += sz * x_sum[b * n_groups + g];
        }
        for (int64_t b = 0; b < batch; b++) y[b * out + o] = _mm512_reduce_add_ps(acc[b]) - zacc[b];
#else
        float acc[MAXB] = {0};
        for (int64_t g = 0; g < n_groups; g++) {
            int64_t lo = g * group, hi = lo + group < in ? lo + group : in;
            float sg = half_to_float(scale[o * n_groups + g]);
            float dot[MAXB] = {0};
            for (int64_t i = lo; i < hi; i++)
                for (int64_t b = 0; b < batch; b++) dot[b] += (float)row[i] * x[b * in + i];
            float sz = sg * zero_of(zero, zc, o * n_groups + g);
            for (int64_t b = 0; b < batch; b++) {
                acc[b] += sg * dot[b];
                zacc[b] += sz * x_sum[b * n_groups + g];
            }
        }
        for (int64_t b = 0; b < batch; b++) y[b * out + o] = acc[b] - zacc[b];
#endif
    }
}

/* w [out, in] bf16 (is_bf16) or fp16 bits; x [batch, in]; y [batch, out] = x . w^T in fp32 */
void lowbit_gemv_half(const uint16_t *w, int is_bf16, const float *x, float *y, int64_t batch, int64_t out, int64_t in) {
    #pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < out; o++) {
        const uint16_t *row = w + o * in;
#ifdef LOWBIT_AVX512
        __m512 acc[MAXB];
        for (int64_t b = 0; b < batch; b++) acc[b] = _mm512_setzero_ps();
        for (int64_t i = 0; i < in; i += 16) {
            int64_t n = in - i < 16 ? in - i : 16;
            __mmask16 m = (__mmask16)(n == 16 ? 0xFFFF : (1u << n) - 1u);
            __m256i h = _mm256_maskz_loadu_epi16(m, row + i);
            __m512 wv = is_bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)) : _mm512_cvtph_ps(h);
            for (int64_t b = 0; b < batch; b++) acc[b] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, x + b * in + i), acc[b]);
        }
        for (int64_t b = 0; b < batch; b++) y[b * out + o] = _mm512_reduce_add_ps(acc[b]);
#else
        for (int64_t b = 0; b < batch; b++) {
            float acc = 0.f;
            for (int64_t i = 0; i < in; i++) acc += (is_bf16 ? bf16_to_float(row[i]) : half_to_float(row[i])) * x[b * in + i];
            y[b * out + o] = acc;
        }
#endif
    }
}

/* w [out, in] = (q - z) * s exactly as lowbit decodes it (fp32 subtract, then multiply), for
 * many-row inputs: dequantize once, then a float matmul */
void lowbit_dequant(const uint8_t *codes, int bits, const uint16_t *scale, const uint8_t *zero, float zc, float *w,
                    int64_t out, int64_t in, int64_t group, int64_t n_groups) {
    #pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < out; o++) {
        for (int64_t i = 0; i < in; i++) {
            int64_t k = o * n_groups + i / group;
            float q = bits == 4 ? (float)((codes[(o * in + i) / 2] >> (4 * (i & 1))) & 15) : (float)codes[o * in + i];
            w[o * in + i] = (q - zero_of(zero, zc, k)) * half_to_float(scale[k]);
        }
    }
}
