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
 * Paths: AVX-512 (AVX-512F + F16C, dimension a multiple of 16 up to 128: ColBERT's 128) and
 * AVX2 (AVX2 + FMA + F16C, dimension a multiple of 8), chosen at run time. Elsewhere (Apple
 * Silicon, old x86) the module reports no path and maxsim.py uses numpy, whose BLAS is good there.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LFM2EDGE_X86 1
#include <immintrin.h>
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
    return path_runs("avx512", dim) ? "avx512" : path_runs("avx2", dim) ? "avx2" : NULL;
}

typedef void (*ScoreFn)(const Job *, float *);

static ScoreFn path_fn(const char *name) {
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
