/* Exact MaxSim over packed document vectors: the CPU kernel behind lfm2edge.runtime.maxsim.
 *
 * score(q, d) = sum over query rows i of max over d's rows t of <q_i, d_t>.
 *
 * Why a kernel: numpy has to widen float16 storage to a float32 copy before its GEMM and then
 * reduce a [tokens, queries] matrix in a second pass; both cost more than the arithmetic.
 * Here each block of R document rows is widened once into a 4-8 KB buffer that stays in L1,
 * multiplied against the query held transposed ([dim][32]) and max-reduced while the
 * products are still in registers. Products and sums are float32 (FMA), so scores are exact
 * to the float16 rounding of the stored vectors, like the numpy path.
 *
 * Layout: qt is the query transposed and zero-padded to passes of QW rows,
 * [passes][dim][QW] float32; tokens is [n_tokens][dim] float16 or float32; document d is
 * rows offsets[d] .. offsets[d+1]. The caller (maxsim.py) validates shapes and splits the
 * documents over threads; each call scores documents [first, last) with the GIL released.
 *
 * Paths, chosen at run time:
 * - amx (Linux, AMX-BF16 + AVX512-BF16, float16 storage, dimension a multiple of 32 up to 128):
 *   bf16 tiles screen every similarity, and the few document rows that can hold a query row's
 *   maximum are rescored with the AVX-512 path's own FMA sequence: its scores, bit for bit;
 * - avx512bf16 (AVX512-BF16 without AMX, e.g. Zen 4; the same sizes): the same screen and rescoring,
 *   the screen done by VDPBF16PS in vector registers;
 * - AVX-512 (AVX-512F + F16C, dimension a multiple of 16 up to 128: ColBERT's 128);
 * - AVX2 (AVX2 + FMA + F16C, dimension a multiple of 8).
 * Elsewhere (Apple Silicon, old x86) the module reports no path and maxsim.py uses numpy, whose
 * BLAS is good there.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LFM2EDGE_X86 1
#include <immintrin.h>
#endif

#if defined(LFM2EDGE_X86) && ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 10))
#define LFM2EDGE_BF16 1 /* a compiler with AVX512-BF16 intrinsics: the screened paths */
#endif

#if defined(LFM2EDGE_BF16) && defined(__linux__) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11))
#define LFM2EDGE_AMX 1 /* a compiler with AMX intrinsics, and a kernel that grants the tile state */
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define QW 32 /* query rows per pass: two 16-float vectors */
#define R 12  /* document rows per register block: 2 x 12 accumulators + 2 query vectors fit 32 zmm */
#define KC 128 /* dims widened at a time: a fixed row stride lets one pointer walk the block */

typedef struct {
    const float *qt; /* [passes][dim][QW] */
    int n_query;     /* real query rows; lanes beyond are zero padding */
    int dim;
    const void *tokens;
    int is_f16;
    const int64_t *offsets;
    int64_t first, last;
    float *out;            /* [n_docs]; out[d] for d in [first, last) is written */
    const uint8_t *codes;  /* vnni path only: [n_tokens][dim] int8 codes of the rows, offset by 128 */
    const float *meta;     /* vnni path only: [n_tokens][3] scale, error bound, norm bound (see code_rows) */
} Job;

#ifdef LFM2EDGE_X86
/* Where document d ends and the running max starts over. */
typedef struct {
    int64_t d, end;
} Cursor;

/* Finish the cursor's document: its score is the sum of the first `lanes` per-query maxima in
 * best (QW floats), written on the first pass and added on later ones; then move to the next. */
static inline void finish_doc(const Job *job, Cursor *c, const float *best, int lanes, int first_pass) {
    float s = 0.0f;
    for (int j = 0; j < lanes; j++) s += best[j];
    job->out[c->d] = first_pass ? s : job->out[c->d] + s;
    c->d++;
    c->end = c->d < job->last ? job->offsets[c->d + 1] : INT64_MAX;
}

/* AVX-512: 12 rows x 32 queries of float32 accumulators in zmm registers. The next block of
 * rows is widened into the other half of `rows` inside the FMA loop, one 16-float chunk per
 * dimension step, so its loads and stores are long done when the block is needed. */
__attribute__((target("avx512f,fma,f16c"))) static void score_avx512(const Job *job, float *rows) {
    const int dim = job->dim, passes = (job->n_query + QW - 1) / QW, chunks = dim / 16;
    const int64_t begin = job->offsets[job->first], end = job->offsets[job->last];
    const size_t row_bytes = (size_t)dim * (job->is_f16 ? 2 : 4);
    for (int p = 0; p < passes; p++) {
        const float *qt = job->qt + (size_t)p * dim * QW;
        const int lanes = job->n_query - p * QW < QW ? job->n_query - p * QW : QW;
        Cursor c = {job->first, job->first < job->last ? job->offsets[job->first + 1] : INT64_MAX};
        __m512 best0 = _mm512_set1_ps(-INFINITY), best1 = best0;
        float *cur = rows, *next = rows + R * KC;
        /* widen the first block */
        for (int64_t t = begin; t < end && t < begin + R; t++)
            for (int ch = 0; ch < chunks; ch++) {
                const size_t at = (size_t)t * dim + ch * 16;
                _mm512_store_ps(cur + (t - begin) * KC + ch * 16,
                                job->is_f16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)job->tokens + at)))
                                            : _mm512_loadu_ps((const float *)job->tokens + at));
            }
        for (int64_t t = begin; t < end; t += R) {
            const int nr = (int)(end - t < R ? end - t : R);
            const int64_t tn = t + R;
            const int next_chunks = (int)(end - tn < R ? (end - tn > 0 ? end - tn : 0) : R) * chunks;
            /* the block after next: on its way to cache while this one computes */
            if (tn + R < end) {
                const char *from = (const char *)job->tokens + (size_t)(tn + R) * row_bytes;
                const size_t bytes = (size_t)(end - tn - R < R ? end - tn - R : R) * row_bytes;
                for (size_t o = 0; o < bytes; o += 64) _mm_prefetch(from + o, _MM_HINT_T0);
            }
            __m512 a0[R], a1[R];
            for (int r = 0; r < R; r++) a0[r] = a1[r] = _mm512_setzero_ps();
            const float *q = qt, *b = cur;
            int nrow = 0, nch = 0; /* next block's chunk to widen on this step */
            for (int k = 0; k < dim; k++, q += QW, b++) {
                if (k < next_chunks) {
                    const size_t at = (size_t)(tn + nrow) * dim + nch * 16;
                    _mm512_store_ps(next + nrow * KC + nch * 16,
                                    job->is_f16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)job->tokens + at)))
                                                : _mm512_loadu_ps((const float *)job->tokens + at));
                    if (++nch == chunks) nch = 0, nrow++;
                }
                const __m512 q0 = _mm512_load_ps(q), q1 = _mm512_load_ps(q + 16);
#pragma GCC unroll 12
                for (int r = 0; r < R; r++) {
                    const __m512 x = _mm512_set1_ps(b[r * KC]); /* constant offsets: one pointer walks */
                    a0[r] = _mm512_fmadd_ps(x, q0, a0[r]);
                    a1[r] = _mm512_fmadd_ps(x, q1, a1[r]);
                }
            }
#pragma GCC unroll 12
            for (int r = 0; r < R; r++) {
                if (r >= nr) break;
                while (t + r >= c.end) { /* row t + r starts a new document */
                    float best[QW];
                    _mm512_storeu_ps(best, best0);
                    _mm512_storeu_ps(best + 16, best1);
                    finish_doc(job, &c, best, lanes, p == 0);
                    best0 = best1 = _mm512_set1_ps(-INFINITY);
                }
                best0 = _mm512_max_ps(best0, a0[r]);
                best1 = _mm512_max_ps(best1, a1[r]);
            }
            float *swap = cur;
            cur = next, next = swap;
        }
        while (c.d < job->last) { /* the last document, and any that ended with the stream */
            float best[QW];
            _mm512_storeu_ps(best, best0);
            _mm512_storeu_ps(best + 16, best1);
            finish_doc(job, &c, best, lanes, p == 0);
            best0 = best1 = _mm512_set1_ps(-INFINITY);
        }
    }
}

#ifdef LFM2EDGE_BF16
/* Screened paths: bf16 products screen every similarity, then the rows that can win are rescored exactly.
 *
 * A product of bf16-rounded vectors summed in float32 is off from the AVX-512 path's float32 FMA sum by at
 * most SCREEN_ERR * |q| * |d|: rounding to bf16 (8 significant bits) moves each operand by <= 2^-8
 * relative (a product by 2^-7 + 2^-16), and a float32 sum of up to 128 terms, screen or FMA, is off by
 * <= 128 * 2^-24 of sum |q_k d_k| <= |q| |d|. 2^-7 + 2^-16 + 2 * 7.7e-6 = 0.007843; 0.0079 covers
 * rounding the bound.
 * So a row can hold query row j's maximum only if its screened similarity is within 2 * bound of
 * the screened maximum. Those rows (a few per document) are rescored with the AVX-512 path's FMA
 * sequence and the maxima summed in its order, so the scores are bit-identical to that path.
 *
 * Two screens fill the same table of screened similarities:
 * - amx: AMX-BF16 tiles (Sapphire Rapids and later);
 * - avx512bf16: AVX512-BF16's VDPBF16PS in zmm registers (Zen 4, and Intel CPUs without AMX). One
 *   instruction does 32 bf16 products where an FMA does 16 float32 ones: half the FMA path's work.
 * Both treat bf16 denormals as zero and accumulate in float32, so one bound serves both.
 */
#define SCREEN_ERR 0.0079f
#define SCREEN_ABS 1e-30f      /* the screens count bf16 denormals as zero */
#define SCREEN_MAX_ROWS 2048   /* longer documents go to the AVX-512 path whole */
#define SCREEN_MAX_QUERY 1e15f /* larger query values could overflow bf16 sums: AVX-512 path */
#define TILE_U16 512           /* 16 k pairs x 16 query rows in bf16: one AMX tile, or 16 zmm operands */
#define RESCORE_ROWS 8         /* rows rescored at once: 8 FMA chains keep both FMA ports busy */
#define SCREEN_ROWS 8          /* rows per VDPBF16PS register block: 8 x 2 halves of accumulators */

static uint16_t bf16_rne(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

/* One query pass as bf16, [dim / 32 steps][2 halves of 16 query rows][16 k pairs][16][2], and each query
 * row's L2 norm. A step's half is an AMX B tile; its k pair r is the 64 bytes VDPBF16PS multiplies. */
static void query_tiles(const float *qt, int dim, uint16_t *tiles, float *norms) {
    for (int s = 0; s < dim / 32; s++)
        for (int h = 0; h < 2; h++)
            for (int r = 0; r < 16; r++)
                for (int n = 0; n < 16; n++)
                    for (int e = 0; e < 2; e++)
                        tiles[(((size_t)(s * 2 + h) * 16 + r) * 16 + n) * 2 + e] =
                            bf16_rne(qt[(size_t)(32 * s + 2 * r + e) * QW + 16 * h + n]);
    for (int j = 0; j < QW; j++) {
        double ss = 0.0; /* squares of tiny float32 values underflow in float32 */
        for (int k = 0; k < dim; k++) ss += (double)qt[(size_t)k * QW + j] * qt[(size_t)k * QW + j];
        norms[j] = (float)sqrt(ss);
    }
}

/* The larger of a running maximum and x, where a NaN, once seen, stays. */
static inline float larger(float running, float x) { return x > running || x != x ? x : running; }

/* Lane i of the result: the sum of v[i]'s 16 lanes (16 horizontal sums in 45 operations, not 16 x 8). */
__attribute__((target("avx512f"))) static inline __m512 lane_sums16(const __m512 *v) {
    __m512 u[8], w[4], z[2];
    for (int i = 0; i < 8; i++) /* per 128 bits: rows 2i, 2i + 1 interleaved, 2 partial sums each */
        u[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) { /* per 128 bits: rows 4i .. 4i + 3, one partial sum each */
        const __m512d a = _mm512_castps_pd(u[2 * i]), b = _mm512_castps_pd(u[2 * i + 1]);
        w[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    for (int i = 0; i < 2; i++) /* 128-bit chunks: w[2i] chunks 0+1, 2+3; w[2i+1] the same */
        z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], 0x88), _mm512_shuffle_f32x4(z[0], z[1], 0xDD));
}

/* n <= 32 float16 rows rounded to bf16 into dst (same layout), zero-padded to 32 rows; returns the
 * largest squared row norm (infinite where a row holds NaN or infinity). */
__attribute__((target("avx512f,avx512bf16,fma,f16c"))) static float rows_to_bf16(const uint16_t *src, int n,
                                                                                   int dim, uint16_t *dst) {
    __m512 largest = _mm512_setzero_ps();
    for (int t0 = 0; t0 < n; t0 += 16) {
        __m512 ss[16];
        for (int t = t0; t < t0 + 16; t++) {
            __m512 s0 = _mm512_setzero_ps(), s1 = s0; /* two chains: rows are short, latency shows */
            for (int k = 0; t < n && k < dim; k += 32) {
                const __m512 x0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + (size_t)t * dim + k)));
                const __m512 x1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + (size_t)t * dim + k + 16)));
                s0 = _mm512_fmadd_ps(x0, x0, s0);
                s1 = _mm512_fmadd_ps(x1, x1, s1);
                _mm512_storeu_si512((void *)(dst + (size_t)t * dim + k), (__m512i)_mm512_cvtne2ps_pbh(x1, x0));
            }
            ss[t - t0] = _mm512_add_ps(s0, s1);
        }
        const __m512 sums = lane_sums16(ss);
        /* NaN counts as infinity, so the caller's finiteness check sees it */
        largest = _mm512_max_ps(largest, _mm512_mask_mov_ps(sums, _mm512_cmp_ps_mask(sums, sums, _CMP_UNORD_Q),
                                                            _mm512_set1_ps(INFINITY)));
    }
    memset(dst + (size_t)n * dim, 0, (size_t)(32 - n) * dim * sizeof(uint16_t));
    return _mm512_reduce_max_ps(largest);
}

/* Document d alone, on the AVX-512 path: what the screens do not take. */
static void score_one_avx512(const Job *job, int64_t d, float *rows) {
    Job one = *job;
    one.first = d, one.last = d + 1;
    score_avx512(&one, rows);
}

/* What a screen works with: the query's passes in the screen's form, two 32-row blocks for bf16 document
 * rows, the screened similarities of the document at hand, [passes][cap rows][QW], and the bound's terms.
 *
 * The bound on |screened - exact| for row t and query row j is qn[j] * e_t + eq[j] * n_t + SCREEN_ABS:
 * - bf16 screens: qn = |q_j|, eq = 0, and one e for every row of a document (SCREEN_ERR * its largest norm);
 * - the int8 screen: qn and eq from the query's int8 rounding, e_t and n_t the row's own (meta). */
typedef struct {
    int dim, passes;
    const uint16_t *qtiles; /* bf16 screens: [passes][dim / 32][2][TILE_U16] */
    const int8_t *qcodes;   /* int8 screen: [passes][dim / 4][2 halves][16 rows][4] */
    const int32_t *qcorr;   /* int8 screen: [passes][QW] 128 * the sum of the row's codes (the rows' +128 offset) */
    const float *qscale;    /* int8 screen: [passes][QW] the row's scale */
    const float *qn, *eq;   /* [passes][QW] the bound's weights on a row's error and on its norm */
    uint16_t *blocks[2];
    float *screen;
    size_t cap;
    int per_row;    /* the bound's e and n are each row's (int8), or one e for the document (bf16) */
    float *doc_max; /* int8 screen: the document's largest e and n, written by the screen */
} Screen;

/* Screens the n rows of the document starting at row `begin` into s->screen; returns the largest squared
 * row norm (bf16) or row error bound (int8), infinite where a row holds NaN or infinity. */
typedef float (*ScreenDocFn)(const Screen *s, const Job *job, int64_t begin, int n);

/* VDPBF16PS: 8 rows x 32 query rows of float32 sums in 16 zmm registers; per k pair, one broadcast of a
 * row's pair and one instruction per half. Each 32-row block is rounded to bf16 once, then screened. */
__attribute__((target("avx512f,avx512bf16,fma,f16c"))) static float screen_doc_bf16(const Screen *s, const Job *job,
                                                                                      int64_t begin, int n) {
    const int dim = s->dim, steps = dim / 32;
    const uint16_t *src = (const uint16_t *)job->tokens + (size_t)begin * dim;
    uint16_t *block = s->blocks[0];
    float largest = 0.0f;
    for (int t0 = 0; t0 < n; t0 += 32) {
        const int nb = n - t0 < 32 ? n - t0 : 32;
        largest = larger(largest, rows_to_bf16(src + (size_t)t0 * dim, nb, dim, block));
        /* the next 32 rows, on their way while these are screened (4% faster on one thread, 7-15% on two) */
        const int64_t ahead = begin + t0 + 32, stop = job->offsets[job->last];
        if (ahead < stop) {
            const char *from = (const char *)job->tokens + (size_t)ahead * dim * sizeof(uint16_t);
            const size_t bytes = (size_t)(stop - ahead < 32 ? stop - ahead : 32) * dim * sizeof(uint16_t);
            for (size_t o = 0; o < bytes; o += 64) _mm_prefetch(from + o, _MM_HINT_T0);
        }
        for (int p = 0; p < s->passes; p++) {
            const uint16_t *qp = s->qtiles + (size_t)p * steps * 2 * TILE_U16;
            float *out = s->screen + ((size_t)p * s->cap + t0) * QW;
            for (int r0 = 0; r0 < nb; r0 += SCREEN_ROWS) { /* rows past nb are the block's zero padding */
                __m512 a0[SCREEN_ROWS], a1[SCREEN_ROWS];
                for (int r = 0; r < SCREEN_ROWS; r++) a0[r] = a1[r] = _mm512_setzero_ps();
                const uint16_t *x = block + (size_t)r0 * dim;
                for (int st = 0; st < steps; st++) {
                    const uint16_t *q = qp + (size_t)st * 2 * TILE_U16;
                    for (int k = 0; k < 16; k++) {
                        const __m512bh q0 = (__m512bh)_mm512_load_si512((const void *)(q + 32 * k));
                        const __m512bh q1 = (__m512bh)_mm512_load_si512((const void *)(q + TILE_U16 + 32 * k));
#pragma GCC unroll 8
                        for (int r = 0; r < SCREEN_ROWS; r++) {
                            int32_t pair;
                            memcpy(&pair, x + (size_t)r * dim + 32 * st + 2 * k, sizeof pair);
                            const __m512bh b = (__m512bh)_mm512_set1_epi32(pair);
                            a0[r] = _mm512_dpbf16_ps(a0[r], b, q0);
                            a1[r] = _mm512_dpbf16_ps(a1[r], b, q1);
                        }
                    }
                }
                for (int r = 0; r < SCREEN_ROWS; r++) {
                    _mm512_store_ps(out + (size_t)(r0 + r) * QW, a0[r]);
                    _mm512_store_ps(out + (size_t)(r0 + r) * QW + 16, a1[r]);
                }
            }
        }
    }
    return largest;
}

/* The int8 screen (vnni): the rows' int8 codes are made once per set of documents (code_rows), kept by the
 * caller and passed with every query, so a query pays no conversion; VPDPBUSD multiplies 64 int8 pairs per
 * instruction where VDPBF16PS multiplies 32 bf16 ones.
 *
 * A row d is coded as c = round(d / s) with s = max |d_k| / 127, and its own rounding measured: e = |d - s c|,
 * n >= max(|d|, |s c|). The query row q likewise (eq, qn). Then
 *   |q.d - q~.d~| <= |q| e + eq |d~|,
 * the AVX-512 path's float32 sum is off from q.d by <= 128 * 2^-24 |q| |d| = 7.63e-6 |q| |d|, and the screen's
 * two float32 products and the bound's own arithmetic by a few 2^-24 more: Q8_SLACK * qn * n covers these.
 * Stored as e' = e + Q8_SLACK * n, the bound is qn * e' + eq * n + SCREEN_ABS, all rounded up. */
#define Q8_SLACK 1e-5f
#define VNNI_ROWS 8 /* rows per VPDPBUSD register block: 8 x 2 halves of int32 sums */

/* The float nearest above v (v >= 0). */
static float round_up(double v) {
    const float f = (float)v;
    return (double)f < v ? nextafterf(f, INFINITY) : f;
}

/* int8 codes of x[0 .. dim) at stride `stride` with scale max |x| / 127; the codes' sum and (e, n) as above. */
static void code_vector(const float *x, int stride, int dim, int8_t *codes, float *scale,
                        int32_t *sum, double *e, double *n) {
    float m = 0.0f;
    for (int k = 0; k < dim; k++) m = fabsf(x[(size_t)k * stride]) > m ? fabsf(x[(size_t)k * stride]) : m;
    const float sc = m / 127.0f;
    double e2 = 0.0, xx = 0.0, yy = 0.0;
    int32_t total = 0;
    for (int k = 0; k < dim; k++) {
        const float v = x[(size_t)k * stride];
        long c = sc > 0.0f ? lrintf(v / sc) : 0;
        c = c > 127 ? 127 : c < -127 ? -127 : c;
        codes[k] = (int8_t)c;
        total += (int32_t)c;
        const double y = (double)sc * (double)c; /* exact: 24 x 8 bits */
        e2 += ((double)v - y) * ((double)v - y), xx += (double)v * v, yy += y * y;
    }
    *scale = sc, *sum = total, *e = sqrt(e2), *n = sqrt(xx > yy ? xx : yy);
}

/* Rows [first, last) of float16 tokens [*][dim] as the vnni screen's codes: codes[t][k] = c + 128 (VPDPBUSD
 * takes the document side unsigned), meta[t] = (s, e', n). A row holding NaN or infinity gets e' = inf, so
 * its document goes to the AVX-512 path. Vectorised (7x the scalar code_vector): e and n come from float32
 * sums of at most 128 squares, each off by < 2^-24 * 12 relative, so both are rounded up by 1e-5 first. */
__attribute__((target("avx512f,f16c"))) static void code_rows(const uint16_t *tokens, int dim, int64_t first,
                                                               int64_t last, uint8_t *codes, float *meta) {
    const int chunks = dim / 16;
    const __m512 zero = _mm512_setzero_ps();
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127), offset = _mm512_set1_epi32(128);
    for (int64_t t = first; t < last; t++) {
        __m512 x[KC / 16], largest = zero;
        __mmask16 bad = 0;
        for (int c = 0; c < chunks; c++) {
            x[c] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(tokens + (size_t)t * dim + 16 * c)));
            bad |= _mm512_cmp_ps_mask(_mm512_sub_ps(x[c], x[c]), zero, _CMP_NEQ_UQ); /* NaN or infinity */
            largest = _mm512_max_ps(largest, _mm512_abs_ps(x[c]));
        }
        float *m = meta + (size_t)t * 3;
        uint8_t *out = codes + (size_t)t * dim;
        if (bad) {
            memset(out, 128, (size_t)dim);
            m[0] = 0.0f, m[1] = INFINITY, m[2] = INFINITY;
            continue;
        }
        const float mx = _mm512_reduce_max_ps(largest), sc = mx / 127.0f;
        const __m512 to_code = _mm512_set1_ps(sc > 0.0f ? 127.0f / mx : 0.0f), scale = _mm512_set1_ps(sc);
        __m512 e2 = zero, xx = zero;
        __m512i cc = _mm512_setzero_si512();
        for (int c = 0; c < chunks; c++) {
            const __m512i q = _mm512_min_epi32(hi, _mm512_max_epi32(lo, _mm512_cvtps_epi32(_mm512_mul_ps(x[c], to_code))));
            const __m512 diff = _mm512_fnmadd_ps(scale, _mm512_cvtepi32_ps(q), x[c]); /* x - s c, rounded once */
            e2 = _mm512_fmadd_ps(diff, diff, e2);
            xx = _mm512_fmadd_ps(x[c], x[c], xx);
            cc = _mm512_add_epi32(cc, _mm512_mullo_epi32(q, q)); /* sum of c^2: exact */
            _mm_storeu_si128((__m128i *)(out + 16 * c), _mm512_cvtepi32_epi8(_mm512_add_epi32(q, offset)));
        }
        const double e = sqrt((double)_mm512_reduce_add_ps(e2)) * (1.0 + 1e-5);
        const double yy = (double)sc * sc * (double)_mm512_reduce_add_epi32(cc); /* |s c|^2: an exact sum, one rounding */
        const double xs = (double)_mm512_reduce_add_ps(xx) * (1.0 + 2e-5);
        const double n = sqrt(xs > yy ? xs : yy);
        m[0] = sc, m[1] = round_up(e + (double)Q8_SLACK * n), m[2] = round_up(n);
    }
}

/* One query pass as int8 codes, [dim / 4 quads][2 halves][16 rows][4] (a half's quad is the 64 bytes
 * VPDPBUSD multiplies), with each row's correction for the rows' +128 offset, scale, qn and eq. */
static void query_codes(const float *qt, int dim, int8_t *codes, int32_t *corr, float *scale, float *qn, float *eq) {
    for (int j = 0; j < QW; j++) {
        int32_t sum;
        double e, n;
        /* element k of row j: quad k / 4, half j / 16, row j % 16, byte k % 4 */
        int8_t *row = codes + (size_t)(j / 16) * 64 + (j % 16) * 4;
        int8_t c[KC];
        code_vector(qt + j, QW, dim, c, &scale[j], &sum, &e, &n);
        for (int k = 0; k < dim; k++) row[(size_t)(k / 4) * 128 + k % 4] = c[k];
        corr[j] = 128 * sum, qn[j] = round_up(n), eq[j] = round_up(e);
    }
}

/* VPDPBUSD: 8 rows x 32 query rows of int32 sums in 16 zmm registers; per quad of dims, one broadcast of a
 * row's 4 codes and one instruction per half. The sums become similarities with the two scales. */
__attribute__((target("avx512f,avx512vnni"))) static float screen_doc_vnni(const Screen *s, const Job *job,
                                                                           int64_t begin, int n) {
    const int dim = s->dim, quads = dim / 4;
    const uint8_t *codes = job->codes + (size_t)begin * dim;
    const float *meta = job->meta + (size_t)begin * 3;
    float emax = 0.0f, nmax = 0.0f;
    for (int t = 0; t < n; t++) {
        if (!(meta[3 * t + 1] <= FLT_MAX)) return INFINITY; /* code_rows' mark of NaN or infinity */
        emax = meta[3 * t + 1] > emax ? meta[3 * t + 1] : emax;
        nmax = meta[3 * t + 2] > nmax ? meta[3 * t + 2] : nmax;
    }
    s->doc_max[0] = emax, s->doc_max[1] = nmax;
    _Alignas(64) uint8_t tail[VNNI_ROWS * KC];
    for (int p = 0; p < s->passes; p++) {
        const int8_t *qp = s->qcodes + (size_t)p * QW * dim;
        const __m512i corr0 = _mm512_load_si512((const void *)(s->qcorr + p * QW));
        const __m512i corr1 = _mm512_load_si512((const void *)(s->qcorr + p * QW + 16));
        const __m512 qs0 = _mm512_load_ps(s->qscale + p * QW), qs1 = _mm512_load_ps(s->qscale + p * QW + 16);
        float *out = s->screen + (size_t)p * s->cap * QW;
        for (int r0 = 0; r0 < n; r0 += VNNI_ROWS) {
            const int nr = n - r0 < VNNI_ROWS ? n - r0 : VNNI_ROWS;
            const uint8_t *x = codes + (size_t)r0 * dim;
            if (nr < VNNI_ROWS) { /* the document's last rows: the rows after them may be past the array */
                memcpy(tail, x, (size_t)nr * dim);
                x = tail;
            }
            const int64_t ahead = begin + n + r0, stop = job->offsets[job->last];
            if (p == 0 && ahead < stop) { /* the next document's float16 rows, on their way for its rescoring */
                const char *from = (const char *)job->tokens + (size_t)ahead * dim * sizeof(uint16_t);
                const size_t bytes = (size_t)(stop - ahead < VNNI_ROWS ? stop - ahead : VNNI_ROWS) * dim * sizeof(uint16_t);
                for (size_t o = 0; o < bytes; o += 64) _mm_prefetch(from + o, _MM_HINT_T1);
            }
            __m512i a0[VNNI_ROWS], a1[VNNI_ROWS];
            for (int r = 0; r < VNNI_ROWS; r++) a0[r] = a1[r] = _mm512_setzero_si512();
            for (int u = 0; u < quads; u++) {
                const __m512i q0 = _mm512_load_si512((const void *)(qp + (size_t)u * 128));
                const __m512i q1 = _mm512_load_si512((const void *)(qp + (size_t)u * 128 + 64));
#pragma GCC unroll 8
                for (int r = 0; r < VNNI_ROWS; r++) {
                    int32_t quad;
                    memcpy(&quad, x + (size_t)r * dim + 4 * u, sizeof quad);
                    const __m512i b = _mm512_set1_epi32(quad);
                    a0[r] = _mm512_dpbusd_epi32(a0[r], b, q0);
                    a1[r] = _mm512_dpbusd_epi32(a1[r], b, q1);
                }
            }
            for (int r = 0; r < nr; r++) {
                const __m512 st = _mm512_set1_ps(meta[3 * (r0 + r)]);
                _mm512_store_ps(out + (size_t)(r0 + r) * QW,
                                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(a0[r], corr0)), _mm512_mul_ps(qs0, st)));
                _mm512_store_ps(out + (size_t)(r0 + r) * QW + 16,
                                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(a1[r], corr1)), _mm512_mul_ps(qs1, st)));
            }
        }
    }
    return 0.0f;
}

/* The running maxima `best` of 8 query rows (q: their lanes of the transposed pass) over nr <= RESCORE_ROWS
 * document rows, computed exactly as score_avx512 computes them: lane j of a row is fma(d[k], q_j[k], .)
 * over k from zero. Inlined with nr constant: nr FMA chains. */
__attribute__((target("avx512f,fma,f16c"), always_inline)) static inline __m256 rescore_rows(
    const Job *job, int64_t begin, const int *which, const int nr, const float *q, float *rows, __m256 best) {
    const int dim = job->dim;
    for (int r = 0; r < nr; r++)
        for (int k = 0; k < dim; k += 16)
            _mm512_store_ps(rows + r * KC + k, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(
                                                   (const uint16_t *)job->tokens + (size_t)(begin + which[r]) * dim + k))));
    __m256 acc[RESCORE_ROWS];
    for (int r = 0; r < nr; r++) acc[r] = _mm256_setzero_ps();
    const float *x = rows;
    for (int k = 0; k < dim; k++, q += QW, x++) {
        const __m256 qk = _mm256_load_ps(q);
#pragma GCC unroll 8
        for (int r = 0; r < nr; r++) acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(x[r * KC]), qk, acc[r]);
    }
    for (int r = 0; r < nr; r++) best = _mm256_max_ps(best, acc[r]);
    return best;
}

/* rescore_rows for nr of 8, 4, 2 or 1, out of line: inlined in its caller, its accumulators spilled. */
__attribute__((target("avx512f,fma,f16c"), noinline)) static __m256 rescore_block(const Job *job, int64_t begin,
                                                                               const int *which, int nr,
                                                                               const float *q, float *rows,
                                                                               __m256 best) {
    switch (nr) {
    case 8: return rescore_rows(job, begin, which, 8, q, rows, best);
    case 4: return rescore_rows(job, begin, which, 4, q, rows, best);
    case 2: return rescore_rows(job, begin, which, 2, q, rows, best);
    default: return rescore_rows(job, begin, which, 1, q, rows, best);
    }
}

/* A document's rows to rescore: per pass, a list of rows per quarter of the query rows. */
typedef struct {
    int64_t d;
    int *rows;   /* [passes][4][cap] */
    int *counts; /* [passes][4] */
} Candidates;

/* Document d's candidates from its screened similarities y. For query row j, a row t can hold the exact
 * maximum only if y_t + b_t reaches M_j = max over rows of (y - b), which the exact maximum is at least (b_t:
 * the bound on row t, see Screen). rescore_candidates then scores those rows as score_avx512 does.
 *
 * Found in two steps. With B the bound of the document's largest e and n (e_doc, n_doc; for the bf16
 * screens every row's), no row below top_j - 2 B can reach M_j >= top_j - B, so the rows at or above
 * top_j - COARSE * B (COARSE >= 2) are the only ones to look at. With one bound per document that is the
 * answer (COARSE = 2: y_t >= top_j - 2 B is y_t + B >= M_j); with a bound per row (int8), M_j and the test
 * are then taken over those few rows. */
__attribute__((target("avx512f,fma,f16c"))) static void find_candidates(const Job *job, const Screen *s, int64_t d,
                                                                        int n, float e_doc, float n_doc, int *kept,
                                                                        uint32_t *hits, Candidates *found) {
    const int64_t begin = job->offsets[d];
    const float *meta = s->per_row ? job->meta + (size_t)begin * 3 : NULL;
    found->d = d;
    for (int p = 0; p < s->passes; p++) {
        const float *screened = s->screen + (size_t)p * s->cap * QW;
        const int lanes = job->n_query - p * QW < QW ? job->n_query - p * QW : QW;
        const __mmask16 real0 = lanes >= 16 ? 0xFFFF : (__mmask16)((1u << lanes) - 1);
        const __mmask16 real1 = lanes <= 16 ? 0 : lanes >= 32 ? 0xFFFF : (__mmask16)((1u << (lanes - 16)) - 1);
        const __m512 qn0 = _mm512_load_ps(s->qn + p * QW), qn1 = _mm512_load_ps(s->qn + p * QW + 16);
        const __m512 eq0 = _mm512_load_ps(s->eq + p * QW), eq1 = _mm512_load_ps(s->eq + p * QW + 16);
        const __m512 abs = _mm512_set1_ps(SCREEN_ABS), inf = _mm512_set1_ps(INFINITY);
        __m512 top0 = _mm512_set1_ps(-INFINITY), top1 = top0;
        for (int t = 0; t < n; t++) {
            top0 = _mm512_max_ps(top0, _mm512_load_ps(screened + (size_t)t * QW));
            top1 = _mm512_max_ps(top1, _mm512_load_ps(screened + (size_t)t * QW + 16));
        }
        /* top - COARSE * B; +inf for padding lanes, which never pick rows */
        const __m512 coarse = _mm512_set1_ps(s->per_row ? 2.5f : 2.0f), ed = _mm512_set1_ps(e_doc),
                     nd = _mm512_set1_ps(n_doc);
        const __m512 lo0 = _mm512_mask_sub_ps(inf, real0, top0,
                                              _mm512_mul_ps(coarse, _mm512_fmadd_ps(qn0, ed, _mm512_fmadd_ps(eq0, nd, abs))));
        const __m512 lo1 = _mm512_mask_sub_ps(inf, real1, top1,
                                              _mm512_mul_ps(coarse, _mm512_fmadd_ps(qn1, ed, _mm512_fmadd_ps(eq1, nd, abs))));
        int nk = 0;
        for (int t = 0; t < n; t++) {
            const uint32_t hit = _mm512_cmp_ps_mask(_mm512_load_ps(screened + (size_t)t * QW), lo0, _CMP_GE_OQ) |
                                 (uint32_t)_mm512_cmp_ps_mask(_mm512_load_ps(screened + (size_t)t * QW + 16), lo1,
                                                              _CMP_GE_OQ) << 16;
            kept[nk] = t, hits[nk] = hit;
            nk += hit != 0;
        }
        if (s->per_row) { /* M_j and y_t + b_t >= M_j over the kept rows, each with its own bound */
            __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0;
            for (int i = 0; i < nk; i++) {
                const float *mt = meta + 3 * kept[i], *y = screened + (size_t)kept[i] * QW;
                const __m512 e = _mm512_set1_ps(mt[1]), nr = _mm512_set1_ps(mt[2]);
                m0 = _mm512_max_ps(m0, _mm512_sub_ps(_mm512_load_ps(y), _mm512_fmadd_ps(qn0, e, _mm512_fmadd_ps(eq0, nr, abs))));
                m1 = _mm512_max_ps(m1, _mm512_sub_ps(_mm512_load_ps(y + 16), _mm512_fmadd_ps(qn1, e, _mm512_fmadd_ps(eq1, nr, abs))));
            }
            for (int i = 0; i < nk; i++) { /* the same bounds, computed again: cheaper than keeping them */
                const float *mt = meta + 3 * kept[i], *y = screened + (size_t)kept[i] * QW;
                const __m512 e = _mm512_set1_ps(mt[1]), nr = _mm512_set1_ps(mt[2]);
                const __m512 up0 = _mm512_add_ps(_mm512_load_ps(y), _mm512_fmadd_ps(qn0, e, _mm512_fmadd_ps(eq0, nr, abs)));
                const __m512 up1 = _mm512_add_ps(_mm512_load_ps(y + 16), _mm512_fmadd_ps(qn1, e, _mm512_fmadd_ps(eq1, nr, abs)));
                hits[i] = _mm512_mask_cmp_ps_mask(real0, up0, m0, _CMP_GE_OQ) |
                          (uint32_t)_mm512_mask_cmp_ps_mask(real1, up1, m1, _CMP_GE_OQ) << 16;
            }
        }
        /* Candidates per quarter of the query rows (8 lanes): a row is one where any of its lanes is in.
         * Quarters, not halves: fewer rows per list, and 8-lane FMAs issue two per cycle. */
        int *nc = found->counts + 4 * p, *cand = found->rows + (size_t)4 * p * s->cap;
        nc[0] = nc[1] = nc[2] = nc[3] = 0;
        for (int i = 0; i < nk; i++)
            for (int h = 0; h < 4; h++) {
                cand[h * s->cap + nc[h]] = kept[i];
                nc[h] += (hits[i] >> 8 * h & 0xFF) != 0;
            }
    }
}

/* The candidates' document scored: each pass's rows rescored, the maxima summed in score_avx512's order. */
__attribute__((target("avx512f,fma,f16c"))) static void rescore_candidates(const Job *job, const Screen *s,
                                                                           const Candidates *found, float *rows) {
    const int64_t d = found->d, begin = job->offsets[d];
    for (int p = 0; p < s->passes; p++) {
        const float *qt = job->qt + (size_t)p * s->dim * QW;
        const int lanes = job->n_query - p * QW < QW ? job->n_query - p * QW : QW;
        const int *nc = found->counts + 4 * p, *cand = found->rows + (size_t)4 * p * s->cap;
        /* Each quarter rescores its candidates, RESCORE_ROWS at a time, then 4, 2, 1 for the rest: a list
         * holds ~17 rows, and a full block for its last one computed 7 rows for nothing. */
        __m256 best[4];
        for (int h = 0; h < 4; h++) {
            best[h] = _mm256_set1_ps(-INFINITY);
            const int *rows_h = cand + h * s->cap;
            const float *q = qt + 8 * h;
            int i = 0;
            for (int nr = RESCORE_ROWS; i < nc[h]; i += nr) {
                while (nc[h] - i < nr) nr /= 2;
                best[h] = rescore_block(job, begin, rows_h + i, nr, q, rows, best[h]);
            }
        }
        Cursor c = {d, INT64_MAX};
        float maxima[QW];
        for (int h = 0; h < 4; h++) _mm256_storeu_ps(maxima + 8 * h, best[h]);
        finish_doc(job, &c, maxima, lanes, p == 0);
    }
}

/* A screened path: every document screened by screen_doc and rescored, or scored on the AVX-512 path
 * whole where the screen's bound does not hold (float32 storage, huge query values, a document longer
 * than SCREEN_MAX_ROWS or holding NaN or infinity) or memory runs out. `int8`: the vnni screen, whose
 * query is int8 codes and whose rows' codes come with the job; else a bf16 screen. */
__attribute__((target("avx512f,fma,f16c"))) static void score_screened(const Job *job, float *rows,
                                                                       ScreenDocFn screen_doc, int int8) {
    const int dim = job->dim, passes = (job->n_query + QW - 1) / QW, steps = dim / 32;
    float qmax = 0.0f;
    for (size_t i = 0; i < (size_t)passes * dim * QW; i++) qmax = fabsf(job->qt[i]) > qmax ? fabsf(job->qt[i]) : qmax;
    int64_t longest = 0;
    for (int64_t d = job->first; d < job->last; d++) {
        const int64_t n = job->offsets[d + 1] - job->offsets[d];
        longest = n <= SCREEN_MAX_ROWS && n > longest ? n : longest;
    }
    const size_t cap = (size_t)(longest + 31) / 32 * 32; /* screened rows per pass, whole 32-row steps */
    const size_t lanes = (size_t)passes * QW;
    float doc_max[2] = {0.0f, 0.0f};
    /* each screen's own buffers: the query's bf16 tiles and two bf16 row blocks, or the query's int8 codes */
    uint16_t *qtiles = int8 ? NULL : aligned_alloc(64, (size_t)passes * steps * 2 * TILE_U16 * sizeof(uint16_t));
    uint16_t *block0 = int8 ? NULL : aligned_alloc(64, 32 * (size_t)dim * sizeof(uint16_t));
    uint16_t *block1 = int8 ? NULL : aligned_alloc(64, 32 * (size_t)dim * sizeof(uint16_t));
    int8_t *qcodes = int8 ? aligned_alloc(64, lanes * dim) : NULL;
    int32_t *qcorr = int8 ? aligned_alloc(64, lanes * sizeof(int32_t)) : NULL;
    float *qscale = int8 ? aligned_alloc(64, lanes * sizeof(float)) : NULL;
    float *qn = aligned_alloc(64, lanes * sizeof(float)), *eq = aligned_alloc(64, lanes * sizeof(float));
    Screen s = {dim, passes, qtiles, qcodes, qcorr, qscale, qn, eq, {block0, block1},
                aligned_alloc(64, (cap ? cap : 32) * passes * QW * sizeof(float)), cap, int8, doc_max};
    /* A document's candidates, and the rows near a maximum they come from with their lanes */
    const size_t lists = (size_t)passes * 4 * (cap ? cap : 32);
    int *cand = malloc((lists + passes * 4 + 2 * (cap ? cap : 32)) * sizeof(int));
    Candidates found = {0, cand, cand + lists};
    int *kept = cand + lists + passes * 4;
    uint32_t *hits = (uint32_t *)(kept + (cap ? cap : 32));
    if (!job->is_f16 || !(qmax <= SCREEN_MAX_QUERY) || (int8 ? !qcodes || !qcorr || !qscale : !qtiles || !block0 || !block1) ||
        !qn || !eq || !s.screen || !cand) {
        score_avx512(job, rows); /* float32 storage, huge query values, or no memory: the FMA path */
        goto done;
    }
    for (int p = 0; p < passes; p++) {
        const float *qp = job->qt + (size_t)p * dim * QW;
        if (int8) {
            query_codes(qp, dim, qcodes + (size_t)p * QW * dim, qcorr + p * QW, qscale + p * QW, qn + p * QW,
                        eq + p * QW);
        } else {
            query_tiles(qp, dim, qtiles + (size_t)p * steps * 2 * TILE_U16, qn + p * QW);
            memset(eq + p * QW, 0, QW * sizeof(float));
        }
    }
    for (int64_t d = job->first; d < job->last; d++) {
        const int64_t begin = job->offsets[d];
        const int n = (int)(job->offsets[d + 1] - begin);
        if (n > SCREEN_MAX_ROWS) {
            score_one_avx512(job, d, rows);
            continue;
        }
        const float largest = screen_doc(&s, job, begin, n);
        if (!(largest <= FLT_MAX)) { /* NaN or infinity in the document: its scores are the FMA path's */
            score_one_avx512(job, d, rows);
            continue;
        }
        if (int8)
            find_candidates(job, &s, d, n, s.doc_max[0], s.doc_max[1], kept, hits, &found);
        else
            find_candidates(job, &s, d, n, SCREEN_ERR * sqrtf(largest), 0.0f, kept, hits, &found);
        rescore_candidates(job, &s, &found, rows);
    }
done:
    free(qtiles), free(qcodes), free(qcorr), free(qscale), free(qn), free(eq);
    free(s.blocks[0]), free(s.blocks[1]), free(s.screen), free(cand);
}

static void score_bf16(const Job *job, float *rows) { score_screened(job, rows, screen_doc_bf16, 0); }
static void score_vnni(const Job *job, float *rows) { score_screened(job, rows, screen_doc_vnni, 1); }
#endif

#ifdef LFM2EDGE_AMX
/* GCC's tileloadd has no memory operand: keep the stores that fill a block before it. */
static inline void compiler_barrier(void) { __asm__ volatile("" ::: "memory"); }

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

/* Whether this CPU has AMX-BF16 and AVX512-BF16 and Linux lets this process use the tiles. */
static int amx_usable(void) {
    static int usable = -1; /* asked once; a race only asks twice */
    if (usable < 0) {
        unsigned a, b, c, d, a1 = 0, b1, c1, d1;
        const int hw = __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d >> 24 & 1) /* AMX-TILE */ &&
                       (d >> 22 & 1) /* AMX-BF16 */ && __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1) &&
                       (a1 >> 5 & 1) /* AVX512-BF16 */;
        /* Linux (5.16+) hands the 8 KB tile state only to processes that ask: ARCH_REQ_XCOMP_PERM, XTILEDATA */
        usable = hw && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("f16c") &&
                 syscall(SYS_arch_prctl, 0x1023, 18) == 0;
    }
    return usable;
}

/* AMX tiles: 32 rows at a time; the tiles multiply one block while the vector units widen the next. */
__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bf16,fma,f16c"))) static float screen_doc_amx(
    const Screen *s, const Job *job, int64_t begin, int n) {
    const int dim = s->dim, passes = s->passes, steps = dim / 32;
    uint16_t *const *blocks = s->blocks;
    const size_t cap = s->cap;
    const uint16_t *src = (const uint16_t *)job->tokens + (size_t)begin * dim;
    float largest = rows_to_bf16(src, n < 32 ? n : 32, dim, blocks[0]);
    for (int t0 = 0, c = 0; t0 < n; t0 += 32, c ^= 1) {
        /* the rows after next, on their way while these compute: the stream is the bound */
        const int64_t ahead = begin + t0 + 64, stop = job->offsets[job->last];
        if (ahead < stop) {
            const char *from = (const char *)job->tokens + (size_t)ahead * dim * sizeof(uint16_t);
            const size_t bytes = (size_t)(stop - ahead < 32 ? stop - ahead : 32) * dim * sizeof(uint16_t);
            for (size_t o = 0; o < bytes; o += 64) _mm_prefetch(from + o, _MM_HINT_T0);
        }
        const uint16_t *block = blocks[c];
        compiler_barrier(); /* tileloadd does not tell the compiler it reads the block */
        for (int p = 0; p < passes; p++) {
            const uint16_t *qp = s->qtiles + (size_t)p * steps * 2 * TILE_U16;
            float *out = s->screen + ((size_t)p * cap + t0) * QW;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int st = 0; st < steps; st++) {
                _tile_loadd(4, block + 32 * st, dim * (int)sizeof(uint16_t));
                _tile_loadd(5, block + (size_t)16 * dim + 32 * st, dim * (int)sizeof(uint16_t));
                _tile_loadd(6, qp + (size_t)(2 * st) * TILE_U16, 64);
                _tile_loadd(7, qp + (size_t)(2 * st + 1) * TILE_U16, 64);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
            }
            if (p == 0 && t0 + 32 < n) {
                const float sq = rows_to_bf16(src + (size_t)(t0 + 32) * dim, n - t0 - 32 < 32 ? n - t0 - 32 : 32,
                                              dim, blocks[c ^ 1]);
                largest = larger(largest, sq);
            }
            _tile_stored(0, out, QW * (int)sizeof(float));
            _tile_stored(1, out + 16, QW * (int)sizeof(float));
            _tile_stored(2, out + 16 * QW, QW * (int)sizeof(float));
            _tile_stored(3, out + 16 * QW + 16, QW * (int)sizeof(float));
        }
    }
    return largest;
}

__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bf16,fma,f16c"))) static void score_amx(const Job *job,
                                                                                            float *rows) {
    /* The thread's own configuration is put back at the end: llama.cpp configures its tiles once
     * per thread and the calling thread is one of its workers (it would fault, or compute with ours). */
    _Alignas(64) TileConfig theirs, cfg = {.palette = 1};
    _tile_storeconfig(&theirs);
    /* tiles 0-3: similarities of 2 blocks of 16 rows x 2 halves of 32 query rows; 4-5 the blocks; 6-7 the halves */
    for (int i = 0; i < 8; i++) cfg.rows[i] = 16, cfg.colsb[i] = 64;
    /* ldtilecfg and sttilecfg name only a config's first bytes to the compiler: keep it in memory */
    __asm__ volatile("" ::"r"(&cfg), "r"(&theirs) : "memory");
    _tile_loadconfig(&cfg);
    score_screened(job, rows, screen_doc_amx, 0);
    __asm__ volatile("" ::"r"(&theirs) : "memory");
    if (theirs.palette)
        _tile_loadconfig(&theirs);
    else
        _tile_release();
}
#endif

/* AVX2: 3 rows x 32 queries in 12 ymm accumulators; the query is read from L1 by the FMAs. */
__attribute__((target("avx2,fma,f16c"))) static void score_avx2(const Job *job, float *rows) {
    enum { R2 = 3 };
    const int dim = job->dim, passes = (job->n_query + QW - 1) / QW, chunks = dim / 8;
    const int64_t begin = job->offsets[job->first], end = job->offsets[job->last];
    for (int p = 0; p < passes; p++) {
        const float *qt = job->qt + (size_t)p * dim * QW;
        const int lanes = job->n_query - p * QW < QW ? job->n_query - p * QW : QW;
        Cursor c = {job->first, job->first < job->last ? job->offsets[job->first + 1] : INT64_MAX};
        __m256 best[4];
        for (int v = 0; v < 4; v++) best[v] = _mm256_set1_ps(-INFINITY);
        for (int64_t t = begin; t < end; t += R2) {
            const int nr = (int)(end - t < R2 ? end - t : R2);
            for (int r = 0; r < nr; r++)
                for (int ch = 0; ch < chunks; ch++) {
                    const size_t at = (size_t)(t + r) * dim + ch * 8;
                    _mm256_store_ps(rows + r * dim + ch * 8,
                                    job->is_f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)job->tokens + at)))
                                                : _mm256_loadu_ps((const float *)job->tokens + at));
                }
            __m256 acc[R2][4];
            for (int r = 0; r < R2; r++)
                for (int v = 0; v < 4; v++) acc[r][v] = _mm256_setzero_ps();
            const float *q = qt;
            for (int k = 0; k < dim; k++, q += QW)
                for (int r = 0; r < R2; r++) {
                    const __m256 x = _mm256_set1_ps(rows[r * dim + k]);
                    for (int v = 0; v < 4; v++) acc[r][v] = _mm256_fmadd_ps(x, _mm256_load_ps(q + 8 * v), acc[r][v]);
                }
            for (int r = 0; r < nr; r++) {
                while (t + r >= c.end) {
                    float b[QW];
                    for (int v = 0; v < 4; v++) _mm256_storeu_ps(b + 8 * v, best[v]), best[v] = _mm256_set1_ps(-INFINITY);
                    finish_doc(job, &c, b, lanes, p == 0);
                }
                for (int v = 0; v < 4; v++) best[v] = _mm256_max_ps(best[v], acc[r][v]);
            }
        }
        while (c.d < job->last) {
            float b[QW];
            for (int v = 0; v < 4; v++) _mm256_storeu_ps(b + 8 * v, best[v]), best[v] = _mm256_set1_ps(-INFINITY);
            finish_doc(job, &c, b, lanes, p == 0);
        }
    }
}
#endif

/* Whether this CPU runs a path for vectors of this size. */
static int path_runs(const char *name, int dim) {
#ifdef LFM2EDGE_AMX
    if (strcmp(name, "amx") == 0) return dim % 32 == 0 && dim <= KC && amx_usable();
#endif
#ifdef LFM2EDGE_BF16
    if (strcmp(name, "avx512bf16") == 0)
        return dim % 32 == 0 && dim <= KC && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("f16c") &&
               __builtin_cpu_supports("avx512bf16");
    if (strcmp(name, "vnni") == 0)
        return dim % 32 == 0 && dim <= KC && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("f16c") &&
               __builtin_cpu_supports("avx512vnni");
#endif
#ifdef LFM2EDGE_X86
    if (strcmp(name, "avx512") == 0)
        return dim % 16 == 0 && dim <= KC && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("f16c");
    if (strcmp(name, "avx2") == 0)
        return dim % 8 == 0 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("f16c");
#endif
    (void)name, (void)dim;
    return 0;
}

/* The fastest path for this size, or NULL where none runs (the caller then uses numpy). */
static const char *best_path(int dim) {
    static const char *const fastest_first[] = {"amx", "avx512bf16", "avx512", "avx2"};
    for (size_t i = 0; i < sizeof fastest_first / sizeof *fastest_first; i++)
        if (path_runs(fastest_first[i], dim)) return fastest_first[i];
    return NULL;
}

typedef void (*ScoreFn)(const Job *, float *);

static ScoreFn path_fn(const char *name) {
#ifdef LFM2EDGE_AMX
    if (strcmp(name, "amx") == 0) return score_amx;
#endif
#ifdef LFM2EDGE_BF16
    if (strcmp(name, "avx512bf16") == 0) return score_bf16;
    if (strcmp(name, "vnni") == 0) return score_vnni;
#endif
#ifdef LFM2EDGE_X86
    if (strcmp(name, "avx512") == 0) return score_avx512;
    if (strcmp(name, "avx2") == 0) return score_avx2;
#endif
    (void)name;
    return NULL;
}

static int check_size(Py_buffer *b, Py_ssize_t need, const char *what) {
    if (b->len < need) {
        PyErr_Format(PyExc_ValueError, "%s: buffer of %zd bytes, need %zd", what, b->len, need);
        return 0;
    }
    return 1;
}

/* score(qt, n_query, tokens, is_f16, dim, offsets, first, last, out, path[, codes, meta]); codes and meta
 * (from code_rows over all the tokens) are the vnni path's and only its */
static PyObject *py_score(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer qt, tokens, offsets, out, codes = {0}, meta = {0};
    int n_query, is_f16, dim;
    Py_ssize_t first, last;
    const char *path;
    if (!PyArg_ParseTuple(args, "y*iy*iiy*nnw*s|y*y*", &qt, &n_query, &tokens, &is_f16, &dim, &offsets, &first,
                          &last, &out, &path, &codes, &meta))
        return NULL;
    PyObject *result = NULL;
    const Py_ssize_t n_docs = offsets.len / (Py_ssize_t)sizeof(int64_t) - 1;
    const int passes = (n_query + QW - 1) / QW;
    if (n_query < 1 || dim < 1 || n_docs < 0 || first < 0 || last > n_docs || first > last) {
        PyErr_SetString(PyExc_ValueError, "maxsim kernel: bad query size, dimension or document range");
        goto done;
    }
    if (!check_size(&qt, (Py_ssize_t)passes * dim * QW * (Py_ssize_t)sizeof(float), "qt") ||
        !check_size(&out, n_docs * (Py_ssize_t)sizeof(float), "out"))
        goto done;
    const int64_t *off = (const int64_t *)offsets.buf;
    if (n_docs > 0 && !check_size(&tokens, (Py_ssize_t)off[n_docs] * dim * (is_f16 ? 2 : 4), "tokens")) goto done;
    const int coded = strcmp(path, "vnni") == 0;
    if (coded != (codes.buf != NULL) || coded != (meta.buf != NULL) || (coded && !is_f16)) {
        PyErr_SetString(PyExc_ValueError, "maxsim kernel: the vnni path, and only it, takes float16 tokens' codes and meta");
        goto done;
    }
    if (coded && n_docs > 0 &&
        (!check_size(&codes, (Py_ssize_t)off[n_docs] * dim, "codes") ||
         !check_size(&meta, (Py_ssize_t)off[n_docs] * 3 * (Py_ssize_t)sizeof(float), "meta")))
        goto done;
    if (((uintptr_t)qt.buf & 63) != 0) {
        PyErr_SetString(PyExc_ValueError, "maxsim kernel: qt must be 64-byte aligned");
        goto done;
    }
    if (!path_runs(path, dim)) {
        PyErr_Format(PyExc_ValueError, "maxsim kernel: path %s does not run here for dimension %d", path, dim);
        goto done;
    }
    /* two blocks of rows; aligned_alloc wants a multiple of the alignment */
    const size_t rows_bytes = (2 * (size_t)R * (dim > KC ? dim : KC) * sizeof(float) + 63) / 64 * 64;
    float *rows = aligned_alloc(64, rows_bytes);
    if (!rows) {
        PyErr_NoMemory();
        goto done;
    }
    memset(rows, 0, rows_bytes);
    Job job = {qt.buf, n_query, dim, tokens.buf, is_f16, off, first, last, out.buf, codes.buf, meta.buf};
    ScoreFn fn = path_fn(path);
    Py_BEGIN_ALLOW_THREADS
    fn(&job, rows);
    Py_END_ALLOW_THREADS
    free(rows);
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&qt);
    PyBuffer_Release(&tokens);
    PyBuffer_Release(&offsets);
    PyBuffer_Release(&out);
    if (codes.obj) PyBuffer_Release(&codes);
    if (meta.obj) PyBuffer_Release(&meta);
    return result;
}

/* code_rows(tokens, dim, first, last, codes, meta): rows [first, last) of float16 tokens as the vnni path's
 * codes [n_tokens][dim] uint8 and meta [n_tokens][3] float32 */
static PyObject *py_code_rows(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer tokens, codes, meta;
    int dim;
    Py_ssize_t first, last;
    if (!PyArg_ParseTuple(args, "y*innw*w*", &tokens, &dim, &first, &last, &codes, &meta)) return NULL;
    PyObject *result = NULL;
    if (!path_runs("vnni", dim) || first < 0 || first > last) {
        PyErr_Format(PyExc_ValueError, "maxsim kernel: no vnni codes here for dimension %d, rows %zd..%zd", dim,
                     first, last);
        goto done;
    }
    if (!check_size(&tokens, last * dim * 2, "tokens") || !check_size(&codes, last * dim, "codes") ||
        !check_size(&meta, last * 3 * (Py_ssize_t)sizeof(float), "meta"))
        goto done;
#ifdef LFM2EDGE_BF16
    Py_BEGIN_ALLOW_THREADS
    code_rows(tokens.buf, dim, first, last, codes.buf, meta.buf);
    Py_END_ALLOW_THREADS
#endif
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&tokens);
    PyBuffer_Release(&codes);
    PyBuffer_Release(&meta);
    return result;
}

/* best_path(dim) -> the fastest path this CPU runs for vectors of this size */
static PyObject *py_best_path(PyObject *self, PyObject *args) {
    (void)self;
    int dim;
    if (!PyArg_ParseTuple(args, "i", &dim)) return NULL;
    const char *name = best_path(dim);
    if (!name) Py_RETURN_NONE;
    return PyUnicode_FromString(name);
}

/* path_runs(name, dim) -> whether this CPU runs that path for vectors of this size */
static PyObject *py_path_runs(PyObject *self, PyObject *args) {
    (void)self;
    const char *name;
    int dim;
    if (!PyArg_ParseTuple(args, "si", &name, &dim)) return NULL;
    return PyBool_FromLong(path_runs(name, dim));
}

static PyMethodDef methods[] = {
    {"score", py_score, METH_VARARGS, "Score documents [first, last) into out (see _maxsim.c)."},
    {"code_rows", py_code_rows, METH_VARARGS, "Rows of float16 tokens as the vnni path's codes and meta."},
    {"path_runs", py_path_runs, METH_VARARGS, "Whether this CPU runs a kernel path for a vector dimension."},
    {"best_path", py_best_path, METH_VARARGS, "The fastest kernel path for a vector dimension on this CPU."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_maxsim", "Exact MaxSim kernel", -1, methods};

PyMODINIT_FUNC PyInit__maxsim(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddIntConstant(m, "QW", QW) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
