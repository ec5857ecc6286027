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
#ifdef _OPENMP
#include <omp.h>
#endif
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

/* Per 32-block of x: its 16 even positions, then its 16 odd ones, so that the low and high nibbles
 * of a block's 16 code bytes each meet 16 contiguous floats. Done once per call, shared by all rows. */
static void deinterleave32(const float *x, int64_t batch, int64_t in, float *xd) {
    for (int64_t b = 0; b < batch; b++)
        for (int64_t k = 0; k < in; k += 32)
            for (int64_t j = 0; j < 16; j++) {
                xd[b * in + k + j] = x[b * in + k + 2 * j];
                xd[b * in + k + 16 + j] = x[b * in + k + 2 * j + 1];
            }
}

/* Each row's scales widened once per block (scale_of_block[k]) and its zero-point term, per batch row. */
static inline void row_scales(const uint16_t *scale, const uint8_t *zero, float zc, const float *x_sum, int64_t o, int64_t batch,
                              int64_t n_groups, int64_t blocks_per_group, int64_t n_blocks, float *scale_of_block, float *zterm) {
    for (int64_t b = 0; b < batch; b++) zterm[b] = 0.f;
    for (int64_t g = 0; g < n_groups; g++) {
        float sg = half_to_float(scale[o * n_groups + g]);
        float sz = sg * zero_of(zero, zc, o * n_groups + g);
        int64_t k1 = (g + 1) * blocks_per_group < n_blocks ? (g + 1) * blocks_per_group : n_blocks;
        for (int64_t k = g * blocks_per_group; k < k1; k++) scale_of_block[k] = sg;
        for (int64_t b = 0; b < batch; b++) zterm[b] += sz * x_sum[b * n_groups + g];
    }
}

#ifdef LOWBIT_AVX512
/* Rows [o0, o1) for a batch of exactly B (a constant after inlining: accumulators stay in
 * registers). Two accumulators per batch row, alternating blocks, to hide the FMA latency. */
static inline __attribute__((always_inline)) void int4_rows(const uint8_t *codes, const float *xd, const uint16_t *scale,
        const uint8_t *zero, float zc, float *y, const int B, int64_t out, int64_t in, int64_t n_groups,
        int64_t blocks_per_group, const float *x_sum, int64_t o0, int64_t o1) {
    const int64_t n_blocks = in / 32;
    const __m128i mask = _mm_set1_epi8(0x0F);
    float scale_of_block[n_blocks], zterm[MAXB];
    for (int64_t o = o0; o < o1; o++) {
        const uint8_t *row = codes + o * (in / 2);
        row_scales(scale, zero, zc, x_sum, o, B, n_groups, blocks_per_group, n_blocks, scale_of_block, zterm);
        __m512 acc0[MAXB], acc1[MAXB];
        for (int b = 0; b < B; b++) acc0[b] = acc1[b] = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 2 <= n_blocks; k += 2) {
            __m128i v0 = _mm_loadu_si128((const __m128i *)(row + 16 * k));
            __m128i v1 = _mm_loadu_si128((const __m128i *)(row + 16 * k + 16));
            __m512 lo0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(v0, mask)));
            __m512 hi0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v0, 4), mask)));
            __m512 lo1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(v1, mask)));
            __m512 hi1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v1, 4), mask)));
            __m512 s0 = _mm512_set1_ps(scale_of_block[k]), s1 = _mm512_set1_ps(scale_of_block[k + 1]);
            for (int b = 0; b < B; b++) {
                const float *xb = xd + b * in + 32 * k;
                __m512 p0 = _mm512_fmadd_ps(hi0, _mm512_loadu_ps(xb + 16), _mm512_mul_ps(lo0, _mm512_loadu_ps(xb)));
                __m512 p1 = _mm512_fmadd_ps(hi1, _mm512_loadu_ps(xb + 48), _mm512_mul_ps(lo1, _mm512_loadu_ps(xb + 32)));
                acc0[b] = _mm512_fmadd_ps(p0, s0, acc0[b]);
                acc1[b] = _mm512_fmadd_ps(p1, s1, acc1[b]);
            }
        }
        if (k < n_blocks) {
            __m128i v0 = _mm_loadu_si128((const __m128i *)(row + 16 * k));
            __m512 lo0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(v0, mask)));
            __m512 hi0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v0, 4), mask)));
            __m512 s0 = _mm512_set1_ps(scale_of_block[k]);
            for (int b = 0; b < B; b++) {
                const float *xb = xd + b * in + 32 * k;
                __m512 p0 = _mm512_fmadd_ps(hi0, _mm512_loadu_ps(xb + 16), _mm512_mul_ps(lo0, _mm512_loadu_ps(xb)));
                acc0[b] = _mm512_fmadd_ps(p0, s0, acc0[b]);
            }
        }
        for (int b = 0; b < B; b++) y[b * out + o] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[b], acc1[b])) - zterm[b];
    }
}
#endif

#ifndef LOWBIT_AVX512
/* Portable rows: the same sums, one block at a time. */
static void int4_rows_portable(const uint8_t *codes, const float *xd, const uint16_t *scale, const uint8_t *zero, float zc,
                               float *y, int64_t batch, int64_t out, int64_t in, int64_t n_groups, int64_t blocks_per_group,
                               const float *x_sum, int64_t o0, int64_t o1) {
    const int64_t n_blocks = in / 32;
    float scale_of_block[n_blocks], zterm[MAXB];
    for (int64_t o = o0; o < o1; o++) {
        const uint8_t *row = codes + o * (in / 2);
        row_scales(scale, zero, zc, x_sum, o, batch, n_groups, blocks_per_group, n_blocks, scale_of_block, zterm);
        float acc[MAXB] = {0};
        for (int64_t k = 0; k < n_blocks; k++) {
            float dot[MAXB] = {0};
            for (int64_t j = 0; j < 16; j++) {
                uint8_t byte = row[16 * k + j];
                float ql = (float)(byte & 15), qh = (float)(byte >> 4);
                for (int64_t b = 0; b < batch; b++) dot[b] += ql * xd[b * in + 32 * k + j] + qh * xd[b * in + 32 * k + 16 + j];
            }
            for (int64_t b = 0; b < batch; b++) acc[b] += scale_of_block[k] * dot[b];
        }
        for (int64_t b = 0; b < batch; b++) y[b * out + o] = acc[b] - zterm[b];
    }
}
#endif

/* This thread's share [o0, o1) of `out` rows (OpenMP static split, done by hand so that each
 * thread runs one specialised loop). */
static inline void thread_rows(int64_t out, int64_t *o0, int64_t *o1) {
#ifdef _OPENMP
    int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
#else
    int64_t t = 0, n = 1;
#endif
    int64_t per = (out + n - 1) / n;
    *o0 = t * per < out ? t * per : out;
    *o1 = *o0 + per < out ? *o0 + per : out;
}

/* codes [out, in/2]; x [batch, in]; scale fp16 [out, n_groups]; zero uint8 [out, n_groups] or NULL
 * (then zc); y [batch, out]; work: batch * (in + n_groups) floats. Vector accumulators
 * carry the scale (acc += s * (q . x) per 32-block), so a row needs one horizontal sum; the
 * zero-point term is a scalar per group. */
void lowbit_gemv_int4(const uint8_t *codes, const float *x, const uint16_t *scale, const uint8_t *zero, float zc,
                      float *y, int64_t batch, int64_t out, int64_t in, int64_t group, int64_t n_groups, float *work) {
    float *xd = work, *x_sum = work + batch * in;
    deinterleave32(x, batch, in, xd);
    group_sums(x, batch, in, group, n_groups, x_sum);
    const int64_t bpg = group / 32;
    #pragma omp parallel
    {
        int64_t o0, o1;
        thread_rows(out, &o0, &o1);
#ifdef LOWBIT_AVX512
        switch (batch) {
#define CASE(B) case B: int4_rows(codes, xd, scale, zero, zc, y, B, out, in, n_groups, bpg, x_sum, o0, o1); break;
            CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
        }
#else
        int4_rows_portable(codes, xd, scale, zero, zc, y, batch, out, in, n_groups, bpg, x_sum, o0, o1);
#endif
    }
}

/* Any width b in 2..8 (used for all but 4 bits): codes are one LSB-first bit stream over the
 * whole row-major matrix, so code i of a row starts at bit b * i of the row (rows hold in * b / 8
 * bytes, in being a multiple of 32). 16 codes fill 2b whole bytes. */
static inline uint32_t code_at(const uint8_t *row, int64_t i, int bits, int64_t row_bytes) {
    int64_t bit = i * bits, byte = bit >> 3;
    uint32_t v = row[byte];
    if ((bit & 7) + bits > 8 && byte + 1 < row_bytes) v |= (uint32_t)row[byte + 1] << 8;
    return (v >> (bit & 7)) & ((1u << bits) - 1u);
}

#ifdef LOWBIT_AVX512
/* 16 codes from the 2b bytes at p, one per 32-bit lane. 8 bits: widened bytes. Otherwise, with
 * AVX-512 VBMI, a byte shuffle brings the two bytes that hold code j into lane j, a variable shift
 * and a mask cut it out; without VBMI the codes are cut out one by one. */
static inline __m512 codes16(const uint8_t *p, int bits, __m512i pick, __m512i shift, __m512i mask) {
    if (bits == 8) return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)));
#ifdef __AVX512VBMI__
    __m128i raw = _mm_maskz_loadu_epi8((__mmask16)((1u << (2 * bits)) - 1u), p);  /* never reads past 2b bytes */
    __m512i v = _mm512_permutexvar_epi8(pick, _mm512_castsi128_si512(raw));
    return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(v, shift), mask));
#else
    (void)pick; (void)shift; (void)mask;
    int32_t q[16];
    for (int j = 0; j < 16; j++) q[j] = (int32_t)code_at(p, j, bits, 2 * bits);
    return _mm512_cvtepi32_ps(_mm512_loadu_si512(q));
#endif
}

static inline __attribute__((always_inline)) void bits_rows(const uint8_t *codes, int bits, const float *x, const uint16_t *scale,
        const uint8_t *zero, float zc, float *y, const int B, int64_t out, int64_t in, int64_t n_groups,
        int64_t blocks_per_group, const float *x_sum, int64_t o0, int64_t o1) {
    const int64_t n_blocks = in / 32, row_bytes = in * bits / 8;
    int32_t pick_i[16], shift_i[16];
    for (int j = 0; j < 16; j++) {
        pick_i[j] = (bits * j) / 8;
        shift_i[j] = (bits * j) % 8;
    }
    uint8_t pick_b[64];
    for (int j = 0; j < 16; j++) {
        pick_b[4 * j] = (uint8_t)pick_i[j];
        pick_b[4 * j + 1] = (uint8_t)(pick_i[j] + 1 < 16 ? pick_i[j] + 1 : 15);
        pick_b[4 * j + 2] = pick_b[4 * j + 3] = 0;  /* lands above bit 16: masked off after the shift */
    }
    const __m512i pick = _mm512_loadu_si512(pick_b), shift = _mm512_loadu_si512(shift_i);
    const __m512i mask = _mm512_set1_epi32((1 << bits) - 1);
    float scale_of_block[n_blocks], zterm[MAXB];
    for (int64_t o = o0; o < o1; o++) {
        const uint8_t *row = codes + o * row_bytes;
        row_scales(scale, zero, zc, x_sum, o, B, n_groups, blocks_per_group, n_blocks, scale_of_block, zterm);
        __m512 acc0[MAXB], acc1[MAXB];
        for (int b = 0; b < B; b++) acc0[b] = acc1[b] = _mm512_setzero_ps();
        for (int64_t k = 0; k < n_blocks; k++) {
            const uint8_t *p = row + 4 * bits * k;
            __m512 q0 = codes16(p, bits, pick, shift, mask), q1 = codes16(p + 2 * bits, bits, pick, shift, mask);
            __m512 s = _mm512_set1_ps(scale_of_block[k]);
            for (int b = 0; b < B; b++) {
                const float *xb = x + b * in + 32 * k;
                acc0[b] = _mm512_fmadd_ps(_mm512_mul_ps(q0, s), _mm512_loadu_ps(xb), acc0[b]);
                acc1[b] = _mm512_fmadd_ps(_mm512_mul_ps(q1, s), _mm512_loadu_ps(xb + 16), acc1[b]);
            }
        }
        for (int b = 0; b < B; b++) y[b * out + o] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[b], acc1[b])) - zterm[b];
    }
}
#else
static void bits_rows_portable(const uint8_t *codes, int bits, const float *x, const uint16_t *scale, const uint8_t *zero, float zc,
                               float *y, int64_t batch, int64_t out, int64_t in, int64_t n_groups, int64_t blocks_per_group,
                               const float *x_sum, int64_t o0, int64_t o1) {
    const int64_t n_blocks = in / 32, row_bytes = in * bits / 8;
    float scale_of_block[n_blocks], zterm[MAXB];
    for (int64_t o = o0; o < o1; o++) {
        const uint8_t *row = codes + o * row_bytes;
        row_scales(scale, zero, zc, x_sum, o, batch, n_groups, blocks_per_group, n_blocks, scale_of_block, zterm);
        float acc[MAXB] = {0};
        for (int64_t k = 0; k < n_blocks; k++) {
            float dot[MAXB] = {0};
            for (int64_t i = 32 * k; i < 32 * k + 32; i++) {
                float q = (float)code_at(row, i, bits, row_bytes);
                for (int64_t b = 0; b < batch; b++) dot[b] += q * x[b * in + i];
            }
            for (int64_t b = 0; b < batch; b++) acc[b] += scale_of_block[k] * dot[b];
        }
        for (int64_t b = 0; b < batch; b++) y[b * out + o] = acc[b] - zterm[b];
    }
}
#endif

/* b-bit codes (see code_at); otherwise as lowbit_gemv_int4; work: batch * n_groups floats */
void lowbit_gemv_bits(const uint8_t *codes, int bits, const float *x, const uint16_t *scale, const uint8_t *zero, float zc,
                      float *y, int64_t batch, int64_t out, int64_t in, int64_t group, int64_t n_groups, float *work) {
    group_sums(x, batch, in, group, n_groups, work);
    const int64_t bpg = group / 32;
    #pragma omp parallel
    {
        int64_t o0, o1;
        thread_rows(out, &o0, &o1);
#ifdef LOWBIT_AVX512
        switch (batch) {
#define CASE(B) case B: bits_rows(codes, bits, x, scale, zero, zc, y, B, out, in, n_groups, bpg, work, o0, o1); break;
            CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
        }
#else
        bits_rows_portable(codes, bits, x, scale, zero, zc, y, batch, out, in, n_groups, bpg, work, o0, o1);
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
            float q = bits == 8 ? (float)codes[o * in + i] : (float)code_at(codes + o * (in * bits / 8), i, bits, in * bits / 8);
            w[o * in + i] = (q - zero_of(zero, zc, k)) * half_to_float(scale[k]);
        }
    }
}
