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
    float *out; /* [n_docs]; out[d] for d in [first, last) is written */
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

/* What a screen works with: the query's bf16 passes, two 32-row blocks for bf16 document rows, and the
 * screened similarities of the document at hand, [passes][cap rows][QW]. */
typedef struct {
    int dim, passes;
    const uint16_t *qtiles; /* [passes][dim / 32][2][TILE_U16] */
    uint16_t *blocks[2];
    float *screen;
    size_t cap;
} Screen;

/* Screens the n rows of the document starting at row `begin` into s->screen; returns the largest
 * squared row norm (infinite where a row holds NaN or infinity). */
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

/* Document d's scores from its screened similarities: for each query row, the rows within 2 bounds of
 * its screened maximum are rescored as score_avx512 computes them and the maxima summed in its order. */
__attribute__((target("avx512f,fma,f16c"))) static void rescore_doc(const Job *job, const Screen *s,
                                                                    const float *qnorms, int64_t d, int n,
                                                                    float norm, int *cand, float *rows) {
    const int dim = s->dim;
    const int64_t begin = job->offsets[d];
    for (int p = 0; p < s->passes; p++) {
        const float *qt = job->qt + (size_t)p * dim * QW;
        const float *screened = s->screen + (size_t)p * s->cap * QW;
        const int lanes = job->n_query - p * QW < QW ? job->n_query - p * QW : QW;
        __m512 top0 = _mm512_set1_ps(-INFINITY), top1 = top0;
        for (int t = 0; t < n; t++) {
            top0 = _mm512_max_ps(top0, _mm512_load_ps(screened + (size_t)t * QW));
            top1 = _mm512_max_ps(top1, _mm512_load_ps(screened + (size_t)t * QW + 16));
        }
        /* Threshold: screened maximum - 2 * bound; +inf for padding lanes, which never pick rows. */
        const __m512 err = _mm512_set1_ps(2.0f * SCREEN_ERR * norm), abs2 = _mm512_set1_ps(2.0f * SCREEN_ABS);
        const __mmask16 real0 = lanes >= 16 ? 0xFFFF : (__mmask16)((1u << lanes) - 1);
        const __mmask16 real1 = lanes <= 16 ? 0 : lanes >= 32 ? 0xFFFF : (__mmask16)((1u << (lanes - 16)) - 1);
        const __m512 inf = _mm512_set1_ps(INFINITY);
        const __m512 lo0 = _mm512_mask_sub_ps(inf, real0, top0, _mm512_fmadd_ps(err, _mm512_load_ps(qnorms + p * QW), abs2));
        const __m512 lo1 = _mm512_mask_sub_ps(inf, real1, top1, _mm512_fmadd_ps(err, _mm512_load_ps(qnorms + p * QW + 16), abs2));
        /* Candidates per quarter of the query rows (8 lanes): a row is one where any of its lanes reaches
         * the threshold. Quarters, not halves: fewer rows per list, and 8-lane FMAs issue two per cycle. */
        int nc[4] = {0, 0, 0, 0};
        for (int t = 0; t < n; t++) {
            const uint32_t hit = _mm512_cmp_ps_mask(_mm512_load_ps(screened + (size_t)t * QW), lo0, _CMP_GE_OQ) |
                                 (uint32_t)_mm512_cmp_ps_mask(_mm512_load_ps(screened + (size_t)t * QW + 16), lo1,
                                                              _CMP_GE_OQ) << 16;
            for (int h = 0; h < 4; h++) {
                cand[h * s->cap + nc[h]] = t;
                nc[h] += (hit >> 8 * h & 0xFF) != 0;
            }
        }
        /* Each quarter rescores its candidates, RESCORE_ROWS at a time, exactly as score_avx512 computes
         * them: lane j of a row is fma(d[k], q_j[k], .) over k from zero. */
        __m256 best[4];
        for (int h = 0; h < 4; h++) {
            best[h] = _mm256_set1_ps(-INFINITY);
            const int *rows_h = cand + h * s->cap;
            for (int i = 0; i < nc[h]; i += RESCORE_ROWS) {
                const int nr = nc[h] - i < RESCORE_ROWS ? nc[h] - i : RESCORE_ROWS;
                for (int r = 0; r < nr; r++)
                    for (int k = 0; k < dim; k += 16)
                        _mm512_store_ps(rows + r * KC + k,
                                        _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(
                                            (const uint16_t *)job->tokens + (size_t)(begin + rows_h[i + r]) * dim + k))));
                __m256 acc[RESCORE_ROWS];
                for (int r = 0; r < RESCORE_ROWS; r++) acc[r] = _mm256_setzero_ps();
                const float *q = qt + 8 * h, *x = rows;
                for (int k = 0; k < dim; k++, q += QW, x++) {
                    const __m256 qk = _mm256_load_ps(q);
#pragma GCC unroll 8
                    for (int r = 0; r < RESCORE_ROWS; r++) acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(x[r * KC]), qk, acc[r]);
                }
                for (int r = 0; r < nr; r++) best[h] = _mm256_max_ps(best[h], acc[r]);
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
 * than SCREEN_MAX_ROWS or holding NaN or infinity) or memory runs out. */
__attribute__((target("avx512f,fma,f16c"))) static void score_screened(const Job *job, float *rows,
                                                                       ScreenDocFn screen_doc) {
    const int dim = job->dim, passes = (job->n_query + QW - 1) / QW, steps = dim / 32;
    float qmax = 0.0f;
    for (size_t i = 0; i < (size_t)passes * dim * QW; i++) qmax = fabsf(job->qt[i]) > qmax ? fabsf(job->qt[i]) : qmax;
    int64_t longest = 0;
    for (int64_t d = job->first; d < job->last; d++) {
        const int64_t n = job->offsets[d + 1] - job->offsets[d];
        longest = n <= SCREEN_MAX_ROWS && n > longest ? n : longest;
    }
    const size_t cap = (size_t)(longest + 31) / 32 * 32; /* screened rows per pass, whole 32-row steps */
    uint16_t *qtiles = aligned_alloc(64, (size_t)passes * steps * 2 * TILE_U16 * sizeof(uint16_t));
    float *qnorms = aligned_alloc(64, (size_t)passes * QW * sizeof(float));
    Screen s = {dim, passes, qtiles,
                {aligned_alloc(64, 32 * (size_t)dim * sizeof(uint16_t)), aligned_alloc(64, 32 * (size_t)dim * sizeof(uint16_t))},
                aligned_alloc(64, (cap ? cap : 32) * passes * QW * sizeof(float)), cap};
    int *cand = malloc(4 * (cap ? cap : 32) * sizeof(int)); /* a list per quarter of the query rows */
    if (!job->is_f16 || !(qmax <= SCREEN_MAX_QUERY) || !qtiles || !qnorms || !s.blocks[0] || !s.blocks[1] ||
        !s.screen || !cand) {
        score_avx512(job, rows); /* float32 storage, huge query values, or no memory: the FMA path */
        goto done;
    }
    for (int p = 0; p < passes; p++)
        query_tiles(job->qt + (size_t)p * dim * QW, dim, qtiles + (size_t)p * steps * 2 * TILE_U16, qnorms + p * QW);
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
        rescore_doc(job, &s, qnorms, d, n, sqrtf(largest), cand, rows);
    }
done:
    free(qtiles), free(qnorms), free(s.blocks[0]), free(s.blocks[1]), free(s.screen), free(cand);
}

static void score_bf16(const Job *job, float *rows) { score_screened(job, rows, screen_doc_bf16); }
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
    score_screened(job, rows, screen_doc_amx);
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

/* score(qt, n_query, tokens, is_f16, dim, offsets, first, last, out, path) */
static PyObject *py_score(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer qt, tokens, offsets, out;
    int n_query, is_f16, dim;
    Py_ssize_t first, last;
    const char *path;
    if (!PyArg_ParseTuple(args, "y*iy*iiy*nnw*s", &qt, &n_query, &tokens, &is_f16, &dim, &offsets, &first, &last,
                          &out, &path))
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
    Job job = {qt.buf, n_query, dim, tokens.buf, is_f16, off, first, last, out.buf};
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

static PyMethodDef methods[] = {
    {"score", py_score, METH_VARARGS, "Score documents [first, last) into out (see _maxsim.c)."},
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
