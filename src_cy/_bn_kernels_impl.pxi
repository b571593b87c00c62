# Shared body of bnfold._bn_kernels and bnfold._bn_kernels_avx2 (included by both .pyx files).
# See _bn_kernels.pyx for the design notes.

from cython cimport floating
from cython.parallel cimport prange, threadid

import numpy as np

# Elements per unit in the rows layout: a unit (float64 worst case 32 KiB) stays in L1/L2 between
# the two passes of the statistics kernel.
cdef enum:
    BLOCK = 4096
# Upper bound on chunks in the cols layout (bounds the partial buffer; plenty for load balance).
cdef enum:
    MAX_CHUNKS = 128
# A chunk holds at least this many segments so per-chunk folding stays a small cost.
cdef enum:
    MIN_SEGS_PER_CHUNK = 8
# Chunks of samples in the short-row ("slabs") kernels.
cdef enum:
    MAX_SLAB_CHUNKS = 32
# Gap (in doubles) between the per-position arrays of one thread's scratch. Without it, for
# power-of-two segment lengths (C = 1024) shift[j], acc1[j] and acc2[j] share their low 12
# address bits and every store to acc1 stalls the next load of acc2 (4K aliasing): 2x slower.
cdef enum:
    PAD = 24


def cols_segment_rows(Py_ssize_t C):
    """Rows per segment in the cols layout: a segment has >= 960 elements, so the fixed cost of
    each inner loop is small, and its length is not a power of two for small C (see PAD)."""
    return max(1, (960 + C - 1) // C)


# ----------------------------------------------------------------------------------------------
# Small inner helpers (one contiguous run of n elements). Compilers do not vectorise a float64
# reduction `s += x[j]` without -ffast-math (it would reorder the sum), so the reductions keep
# LANES independent accumulators in a small array: the inner `for t in range(LANES)` loop is then
# an element-wise loop that vectorises, and the lanes are added at the end in a fixed order.

cdef enum:
    LANES = 16


cdef inline double _sum_lanes(double* a) noexcept nogil:
    """Sum of the LANES accumulators by halving (fixed order; short dependency chains, which
    matters for 7x7 rows where a serial 32-term sum would cost more than the row itself).
    Overwrites a."""
    cdef Py_ssize_t w = LANES // 2, t
    while w > 0:
        for t in range(w):
            a[t] = a[t] + a[t + w]
        w = w // 2
    return a[0]


cdef inline double _run_sum(const floating* x, Py_ssize_t n) noexcept nogil:
    cdef double a[LANES]
    cdef Py_ssize_t j = 0, t
    for t in range(LANES):
        a[t] = 0
    while j + LANES <= n:
        for t in range(LANES):
            a[t] += x[j + t]
        j += LANES
    for t in range(n - j):
        a[t] += x[j + t]
    return _sum_lanes(a)


cdef inline double _run_centred_sq(const floating* x, Py_ssize_t n, double m) noexcept nogil:
    cdef double a[LANES]
    cdef double d
    cdef Py_ssize_t j = 0, t
    for t in range(LANES):
        a[t] = 0
    while j + LANES <= n:
        for t in range(LANES):
            d = x[j + t] - m
            a[t] += d * d
        j += LANES
    for t in range(n - j):
        d = x[j + t] - m
        a[t] += d * d
    return _sum_lanes(a)


# The backward reduction reads two streams and does the most float64 work per element; GCC's
# vectoriser leaves the lane loop above partly scalar there, so it is written out with GCC/Clang
# vector extensions (4 x float64 per vector, the same 16 lanes and lane-sum order as the scalar
# form, which stays as the fallback for other compilers).
cdef extern from *:
    """
    #include <string.h>
    #if defined(__GNUC__) || defined(__clang__)
    typedef double bnf_v4d __attribute__((vector_size(32)));
    typedef float bnf_v4f __attribute__((vector_size(16)));
    static inline bnf_v4d bnf_ld_f(const float* p) {
        bnf_v4f v; memcpy(&v, p, sizeof v); return __builtin_convertvector(v, bnf_v4d);
    }
    static inline bnf_v4d bnf_ld_d(const double* p) {
        bnf_v4d v; memcpy(&v, p, sizeof v); return v;
    }
    #ifndef BNF_PF_DIST
    #define BNF_PF_DIST 2048
    #endif

    /* EXTRA runs once per 16 values (index j): the pipelined backward writes dx there. */
    #define BNF_SUMDOT_MAIN(LD, EXTRA)                                                   \
        bnf_v4d mv = {m, m, m, m};                                                       \
        bnf_v4d a0 = {0, 0, 0, 0}, a1 = a0, a2 = a0, a3 = a0;                            \
        bnf_v4d b0 = a0, b1 = a0, b2 = a0, b3 = a0, g;                                   \
        for (; j + 16 <= n; j += 16) {                                                   \
            __builtin_prefetch((const char*)(dy + j) + BNF_PF_DIST);                     \
            __builtin_prefetch((const char*)(x + j) + BNF_PF_DIST);                      \
            g = LD(dy + j);      a0 += g; b0 += g * (LD(x + j) - mv);                    \
            g = LD(dy + j + 4);  a1 += g; b1 += g * (LD(x + j + 4) - mv);                \
            g = LD(dy + j + 8);  a2 += g; b2 += g * (LD(x + j + 8) - mv);                \
            g = LD(dy + j + 12); a3 += g; b3 += g * (LD(x + j + 12) - mv);               \
            EXTRA;                                                                       \
        }                                                                                \
        memcpy(a, &a0, 32); memcpy(a + 4, &a1, 32); memcpy(a + 8, &a2, 32);              \
        memcpy(a + 12, &a3, 32);                                                         \
        memcpy(b, &b0, 32); memcpy(b + 4, &b1, 32); memcpy(b + 8, &b2, 32);              \
        memcpy(b + 12, &b3, 32);
    #else
    #define BNF_SUMDOT_MAIN(LD, EXTRA)                                                   \
        for (t = 0; t < 16; t++) { a[t] = 0; b[t] = 0; }                                 \
        for (; j + 16 <= n; j += 16) {                                                   \
            for (t = 0; t < 16; t++) {                                                   \
                double gg = dy[j + t]; a[t] += gg; b[t] += gg * ((double)x[j + t] - m);  \
            }                                                                            \
            EXTRA;                                                                       \
        }
    #endif
    static inline double bnf_sum16(double* a) {
        int w, t;
        for (w = 8; w > 0; w /= 2)
            for (t = 0; t < w; t++) a[t] = a[t] + a[t + w];
        return a[0];
    }
    /* sum(dy) into *sum and sum(dy * (x - m)) into *dot over dy[0:n], x[0:n]; afterwards j is
       where the last, partial block of 16 starts. */
    #define BNF_SUMDOT_BODY(LD, EXTRA, sum)                                              \
        double a[16], b[16];                                                             \
        Py_ssize_t j = 0, t;                                                             \
        BNF_SUMDOT_MAIN(LD, EXTRA)                                                       \
        for (t = 0; t < n - j; t++) {                                                    \
            double gg = dy[j + t]; a[t] += gg; b[t] += gg * ((double)x[j + t] - m);      \
        }                                                                                \
        *dot = bnf_sum16(b);                                                             \
        sum = bnf_sum16(a);
    #define BNF_SUMDOT_FN(NAME, T, LD)                                                   \
    static double NAME(const T* dy, const T* x, Py_ssize_t n, double m, double* dot) {   \
        double s;                                                                        \
        BNF_SUMDOT_BODY(LD, (void)0, s)                                                  \
        return s;                                                                        \
    }
    BNF_SUMDOT_FN(bnf_sum_dot_f, float, bnf_ld_f)
    BNF_SUMDOT_FN(bnf_sum_dot_d, double, bnf_ld_d)
    """
    double bnf_sum_dot_f(const float* dy, const float* x, Py_ssize_t n, double m,
                         double* dot) noexcept nogil
    double bnf_sum_dot_d(const double* dy, const double* x, Py_ssize_t n, double m,
                         double* dot) noexcept nogil


cdef inline double _run_sum_dot_centred(const floating* dy, const floating* x, Py_ssize_t n,
                                        double m, double* dot) noexcept nogil:
    """Returns sum(dy) and stores sum(dy * (x - m)) in *dot, both float64, one read of each."""
    if floating is float:
        return bnf_sum_dot_f(dy, x, n, m, dot)
    else:
        return bnf_sum_dot_d(dy, x, n, m, dot)


# ----------------------------------------------------------------------------------------------
# Partition helpers (shape-only, so results do not depend on the thread count).

cdef inline Py_ssize_t _blocks_per_row(Py_ssize_t inner) noexcept nogil:
    return (inner + BLOCK - 1) // BLOCK


cdef inline Py_ssize_t _n_chunks(Py_ssize_t nseg) noexcept nogil:
    cdef Py_ssize_t q = nseg // MIN_SEGS_PER_CHUNK
    if q < 1:
        q = 1
    if q > MAX_CHUNKS:
        q = MAX_CHUNKS
    return q


cdef inline Py_ssize_t _unit_span(Py_ssize_t u, Py_ssize_t nb, Py_ssize_t c0, Py_ssize_t nc,
                                  Py_ssize_t C, Py_ssize_t inner, Py_ssize_t* c,
                                  Py_ssize_t* length) noexcept nogil:
    """Rows layout, channels [c0, c0 + nc): unit u is block b of row (n, c) with
    u = (n * nc + (c - c0)) * nb + b. Returns the unit's start; sets *c and *length."""
    cdef Py_ssize_t b = u % nb
    cdef Py_ssize_t t = u // nb
    cdef Py_ssize_t cc = t % nc
    cdef Py_ssize_t n = t // nc
    cdef Py_ssize_t ln = inner - b * BLOCK
    c[0] = c0 + cc
    length[0] = ln if ln < BLOCK else BLOCK
    return (n * C + c0 + cc) * inner + b * BLOCK


# ----------------------------------------------------------------------------------------------
# Merging per-unit partials into per-channel results.

cdef inline void _merge_channel_units(const double* pmean, const double* pm2, Py_ssize_t outer,
                                     Py_ssize_t stride, Py_ssize_t nb, Py_ssize_t inner,
                                     double* mean, double* m2) noexcept nogil:
    """Exact two-pass merge of one channel's unit partials; unit (n, b) is at n * stride + b.
    Fixed order (n, then b), whatever thread computed which unit."""
    cdef Py_ssize_t last = inner - (nb - 1) * BLOCK
    cdef double total = <double>outer * <double>inner
    cdef Py_ssize_t n, b
    cdef double cnt, s = 0, m, d, q = 0
    for n in range(outer):
        for b in range(nb):
            cnt = BLOCK if b < nb - 1 else last
            s = s + cnt * pmean[n * stride + b]
    m = s / total
    for n in range(outer):
        for b in range(nb):
            cnt = BLOCK if b < nb - 1 else last
            d = pmean[n * stride + b] - m
            q = q + pm2[n * stride + b] + cnt * d * d
    mean[0] = m
    m2[0] = q


cdef void _merge_chunk_moments(const double[::1] cmean, const double[::1] cm2,
                               const double[::1] ccount, Py_ssize_t nq, Py_ssize_t C,
                               double[::1] mean_out, double[::1] m2_out) noexcept nogil:
    """Exact two-pass merge of the chunk partials (chunk q, channel c at q * C + c), chunks in
    order. Loops run chunk-major so the inner loop is contiguous over channels (it vectorises;
    a channel-major loop strides by C and cost ~0.3 ms for 128 chunks x 1024 channels); every
    channel still adds its chunks in the same order, so the results are unchanged."""
    cdef Py_ssize_t c, q
    cdef double total = 0, w, d
    for q in range(nq):
        total = total + ccount[q]
    for c in range(C):
        mean_out[c] = 0
        m2_out[c] = 0
    for q in range(nq):
        w = ccount[q]
        for c in range(C):
            mean_out[c] = mean_out[c] + w * cmean[q * C + c]
    for c in range(C):
        mean_out[c] = mean_out[c] / total
    for q in range(nq):
        w = ccount[q]
        for c in range(C):
            d = cmean[q * C + c] - mean_out[c]
            m2_out[c] = m2_out[c] + cm2[q * C + c] + w * d * d


cdef void _merge_chunk_sums(const double[::1] c1, const double[::1] c2, Py_ssize_t nq,
                           Py_ssize_t C, double[::1] out1, double[::1] out2) noexcept nogil:
    """out[c] = sum over chunks q (in order) of c[q * C + c], chunk-major like
    _merge_chunk_moments."""
    cdef Py_ssize_t c, q
    for c in range(C):
        out1[c] = 0
        out2[c] = 0
    for q in range(nq):
        for c in range(C):
            out1[c] = out1[c] + c1[q * C + c]
            out2[c] = out2[c] + c2[q * C + c]


# Wide channels-last rows (C >= 960, one row per segment): per-position accumulators in memory
# would be stored once per element, and with a row stride of 4 KiB (C = 1024 float32) each store
# 4K-aliases the next rows' loads. Instead a block of 16 channels is reduced over all rows of a
# chunk with the sums held in registers (column-block order), prefetching a few rows ahead.
cdef extern from *:
    """
    /* rows per register pass: all of the chunk (groups of 8 rows measured slower) */
    #define BNF_CB_ROWS ((Py_ssize_t)1 << 40)
    #if defined(__GNUC__) || defined(__clang__)
    #define BNF_CB_FNS(SUF, T, LD)                                                       \
    static void bnf_cb_mom_##SUF(const T* x, Py_ssize_t nr, Py_ssize_t C, double* s1,    \
                                 double* s2) {                                           \
        Py_ssize_t c, r, r0, r1;                                                         \
        memset(s1, 0, C * sizeof(double)); memset(s2, 0, C * sizeof(double));            \
        for (r0 = 1; r0 < nr; r0 += BNF_CB_ROWS) {                                       \
            r1 = r0 + BNF_CB_ROWS < nr ? r0 + BNF_CB_ROWS : nr;                          \
            for (c = 0; c + 16 <= C; c += 16) {                                          \
                bnf_v4d h0 = LD(x + c), h1 = LD(x + c + 4), h2 = LD(x + c + 8);          \
                bnf_v4d h3 = LD(x + c + 12), d;                                          \
                bnf_v4d a0 = {0, 0, 0, 0}, a1 = a0, a2 = a0, a3 = a0;                    \
                bnf_v4d b0 = a0, b1 = a0, b2 = a0, b3 = a0;                              \
                for (r = r0; r < r1; r++) {                                              \
                    const T* p = x + r * C + c;                                          \
                    __builtin_prefetch(p + 32, 0);                                       \
                    d = LD(p) - h0;      a0 += d; b0 += d * d;                           \
                    d = LD(p + 4) - h1;  a1 += d; b1 += d * d;                           \
                    d = LD(p + 8) - h2;  a2 += d; b2 += d * d;                           \
                    d = LD(p + 12) - h3; a3 += d; b3 += d * d;                           \
                }                                                                        \
                a0 += bnf_ld_d(s1 + c); a1 += bnf_ld_d(s1 + c + 4);                      \
                a2 += bnf_ld_d(s1 + c + 8); a3 += bnf_ld_d(s1 + c + 12);                 \
                b0 += bnf_ld_d(s2 + c); b1 += bnf_ld_d(s2 + c + 4);                      \
                b2 += bnf_ld_d(s2 + c + 8); b3 += bnf_ld_d(s2 + c + 12);                 \
                memcpy(s1 + c, &a0, 32); memcpy(s1 + c + 4, &a1, 32);                    \
                memcpy(s1 + c + 8, &a2, 32); memcpy(s1 + c + 12, &a3, 32);               \
                memcpy(s2 + c, &b0, 32); memcpy(s2 + c + 4, &b1, 32);                    \
                memcpy(s2 + c + 8, &b2, 32); memcpy(s2 + c + 12, &b3, 32);               \
            }                                                                            \
            for (; c < C; c++) {                                                         \
                double h = x[c], a = 0, b = 0, d;                                        \
                for (r = r0; r < r1; r++) { d = x[r * C + c] - h; a += d; b += d * d; }  \
                s1[c] += a; s2[c] += b;                                                  \
            }                                                                            \
        }                                                                                \
    }
    #else
    #define BNF_CB_FNS(SUF, T, LD)                                                       \
    static void bnf_cb_mom_##SUF(const T* x, Py_ssize_t nr, Py_ssize_t C, double* s1,    \
                                 double* s2) {                                           \
        Py_ssize_t c, r;                                                                 \
        for (c = 0; c < C; c++) {                                                        \
            double h = x[c], a = 0, b = 0, d;                                            \
            for (r = 1; r < nr; r++) { d = x[r * C + c] - h; a += d; b += d * d; }       \
            s1[c] = a; s2[c] = b;                                                        \
        }                                                                                \
    }
    #endif
    BNF_CB_FNS(f, float, bnf_ld_f)
    BNF_CB_FNS(d, double, bnf_ld_d)
    """
    void bnf_cb_mom_f(const float* x, Py_ssize_t nr, Py_ssize_t C, double* s1,
                      double* s2) noexcept nogil
    void bnf_cb_mom_d(const double* x, Py_ssize_t nr, Py_ssize_t C, double* s1,
                      double* s2) noexcept nogil


# ----------------------------------------------------------------------------------------------
# Statistics: per-channel mean and M2 (sum of squared deviations), float64.

def moments_rows(const floating[::1] x, Py_ssize_t outer, Py_ssize_t C, Py_ssize_t inner,
                 Py_ssize_t c0, Py_ssize_t c1, double[::1] mean_out, double[::1] m2_out,
                 int n_threads):
    """Rows layout (inner > 1), channels [c0, c1) (the Python layer passes all channels).
    mean_out / m2_out: (C,) float64, OUT (entries c0..c1-1 written)."""
    cdef Py_ssize_t nb = _blocks_per_row(inner)
    cdef Py_ssize_t nc = c1 - c0
    cdef Py_ssize_t n_units = outer * nc * nb
    cdef double[::1] pmean = np.empty(n_units, dtype=np.float64)
    cdef double[::1] pm2 = np.empty(n_units, dtype=np.float64)
    cdef const floating* xp = &x[0]
    cdef Py_ssize_t u, c, cc, start, length
    cdef double m
    with nogil:
        for u in prange(n_units, schedule='static', num_threads=n_threads):
            c = 0  # assigned in the loop body so that Cython makes c / length thread-private
            length = 0
            start = _unit_span(u, nb, c0, nc, C, inner, &c, &length)
            m = _run_sum(xp + start, length) / length
            pmean[u] = m
            pm2[u] = _run_centred_sq(xp + start, length, m)
        for cc in range(nc):
            _merge_channel_units(&pmean[cc * nb], &pm2[cc * nb], outer, nc * nb, nb, inner,
                                 &mean_out[c0 + cc], &m2_out[c0 + cc])


def moments_cols(const floating[::1] x, Py_ssize_t rows, Py_ssize_t C,
                 double[::1] mean_out, double[::1] m2_out, int n_threads):
    """Cols layout (inner == 1): x is (rows, C). Shifted float64 sums per chunk (shift = the
    chunk's first row, so a constant channel gives exactly 0), merged across chunks."""
    cdef Py_ssize_t k = cols_segment_rows(C)
    cdef Py_ssize_t P = k * C
    cdef Py_ssize_t nseg = (rows + k - 1) // k
    cdef Py_ssize_t nq = _n_chunks(nseg)
    cdef double[:, ::1] scratch = np.empty((max(n_threads, 1), 3 * (P + PAD)), dtype=np.float64)
    cdef double[::1] cmean = np.empty(nq * C, dtype=np.float64)
    cdef double[::1] cm2 = np.empty(nq * C, dtype=np.float64)
    cdef double[::1] ccount = np.empty(nq, dtype=np.float64)
    cdef const floating* xp = &x[0]
    cdef Py_ssize_t q, s, s0, s1, j, t, c, row0, row1, base, length
    cdef double* sh
    cdef double* a1
    cdef double* a2
    cdef double d, e, f, g, S1, S2, cnt
    with nogil:
        for q in prange(nq, schedule='dynamic', chunksize=1, num_threads=n_threads):
            sh = &scratch[threadid(), 0]
            a1 = sh + (P + PAD)
            a2 = a1 + (P + PAD)
            s0 = q * nseg // nq
            s1 = (q + 1) * nseg // nq
            row0 = s0 * k
            row1 = s1 * k
            if row1 > rows:
                row1 = rows
            cnt = <double>(row1 - row0)
            ccount[q] = cnt
            if k == 1:
                # column-block order, sums in registers (see bnf_cb_mom)
                if floating is float:
                    bnf_cb_mom_f(xp + row0 * C, row1 - row0, C, a1, a2)
                else:
                    bnf_cb_mom_d(xp + row0 * C, row1 - row0, C, a1, a2)
                for c in range(C):
                    S1 = a1[c]
                    cmean[q * C + c] = xp[row0 * C + c] + S1 / cnt
                    d = a2[c] - S1 * S1 / cnt
                    cm2[q * C + c] = d if d > 0 else 0.0
                continue
            for j in range(P):
                sh[j] = xp[row0 * C + j % C]
                a1[j] = 0
                a2[j] = 0
            s = s0
            # four full segments per sweep: a quarter of the accumulator loads/stores
            while s + 4 <= s1 and (s + 4) * P <= rows * C:
                base = s * P
                for j in range(P):
                    d = xp[base + j] - sh[j]
                    e = xp[base + P + j] - sh[j]
                    f = xp[base + 2 * P + j] - sh[j]
                    g = xp[base + 3 * P + j] - sh[j]
                    a1[j] += (d + e) + (f + g)
                    a2[j] += (d * d + e * e) + (f * f + g * g)
                s = s + 4
            while s < s1:
                base = s * P
                length = rows * C - base
                if length > P:
                    length = P
                for j in range(length):
                    d = xp[base + j] - sh[j]
                    a1[j] += d
                    a2[j] += d * d
                s = s + 1
            cnt = <double>(row1 - row0)
            ccount[q] = cnt
            for c in range(C):
                S1 = 0
                S2 = 0
                for t in range(k):
                    S1 = S1 + a1[t * C + c]
                    S2 = S2 + a2[t * C + c]
                cmean[q * C + c] = sh[c] + S1 / cnt
                d = S2 - S1 * S1 / cnt
                cm2[q * C + c] = d if d > 0 else 0.0
        _merge_chunk_moments(cmean, cm2, ccount, nq, C, mean_out, m2_out)


# Short rows (e.g. 7x7): per chunk of samples and channel, float64 sums of x - K and (x - K)^2,
# with K the mean of the channel's first row in the chunk (two passes over that one row), so the
# remaining rows need one vectorised pass and no per-row merge; (mean, M2) come out once per chunk.
# K is within about a row's spread of the chunk mean, so S2 - S1^2/cnt cancels little; a constant
# channel gives x - K == 0 exactly.
cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    static inline double bnf_hsum4(bnf_v4d v) { return (v[0] + v[2]) + (v[1] + v[3]); }
    #define BNF_SLAB_FNS(SUF, T, LD)                                                     \
    static void bnf_slab_mom_##SUF(const T* x, Py_ssize_t nr, Py_ssize_t C,              \
                                   Py_ssize_t inner, double* k, double* s1,              \
                                   double* s2) {                                         \
        Py_ssize_t n, c, j;                                                              \
        for (n = 0; n < nr; n++) {                                                       \
            const T* r = x + n * C * inner;                                              \
            for (c = 0; c < C; c++, r += inner) {                                        \
                bnf_v4d a0 = {0, 0, 0, 0}, a1 = a0, b0 = a0, b1 = a0, d, e, kv;          \
                double sa = 0, sb = 0, dd, kk;                                           \
                __builtin_prefetch((const char*)r + BNF_PF_DIST);                        \
                __builtin_prefetch((const char*)r + BNF_PF_DIST + 64);                   \
                __builtin_prefetch((const char*)r + BNF_PF_DIST + 128);                  \
                if (n == 0) {                                                            \
                    for (j = 0; j + 8 <= inner; j += 8) {                                \
                        a0 += LD(r + j); a1 += LD(r + j + 4);                            \
                    }                                                                    \
                    for (; j < inner; j++) sa += r[j];                                   \
                    kk = (bnf_hsum4(a0 + a1) + sa) / (double)inner;                      \
                    k[c] = kk; s1[c] = 0; s2[c] = 0;                                     \
                    a0 = a1 = b0;                                                        \
                    sa = 0;                                                              \
                } else {                                                                 \
                    kk = k[c];                                                           \
                }                                                                        \
                kv = (bnf_v4d){kk, kk, kk, kk};                                          \
                for (j = 0; j + 8 <= inner; j += 8) {                                    \
                    d = LD(r + j) - kv;     a0 += d; b0 += d * d;                        \
                    e = LD(r + j + 4) - kv; a1 += e; b1 += e * e;                        \
                }                                                                        \
                for (; j < inner; j++) { dd = r[j] - kk; sa += dd; sb += dd * dd; }      \
                s1[c] += bnf_hsum4(a0 + a1) + sa;                                        \
                s2[c] += bnf_hsum4(b0 + b1) + sb;                                        \
            }                                                                            \
        }                                                                                \
    }
    #else
    #define BNF_SLAB_FNS(SUF, T, LD)                                                     \
    static void bnf_slab_mom_##SUF(const T* x, Py_ssize_t nr, Py_ssize_t C,              \
                                   Py_ssize_t inner, double* k, double* s1,              \
                                   double* s2) {                                         \
        Py_ssize_t n, c, j;                                                              \
        for (n = 0; n < nr; n++) {                                                       \
            const T* r = x + n * C * inner;                                              \
            for (c = 0; c < C; c++, r += inner) {                                        \
                double sa = 0, sb = 0, dd, kk;                                           \
                if (n == 0) {                                                            \
                    for (j = 0; j < inner; j++) sa += r[j];                              \
                    kk = sa / (double)inner;                                             \
                    k[c] = kk; s1[c] = 0; s2[c] = 0; sa = 0;                             \
                } else {                                                                 \
                    kk = k[c];                                                           \
                }                                                                        \
                for (j = 0; j < inner; j++) { dd = r[j] - kk; sa += dd; sb += dd * dd; } \
                s1[c] += sa; s2[c] += sb;                                                \
            }                                                                            \
        }                                                                                \
    }
    #endif
    BNF_SLAB_FNS(f, float, bnf_ld_f)
    BNF_SLAB_FNS(d, double, bnf_ld_d)
    """
    void bnf_slab_mom_f(const float* x, Py_ssize_t nr, Py_ssize_t C, Py_ssize_t inner,
                        double* k, double* s1, double* s2) noexcept nogil
    void bnf_slab_mom_d(const double* x, Py_ssize_t nr, Py_ssize_t C, Py_ssize_t inner,
                        double* k, double* s1, double* s2) noexcept nogil


def moments_slabs(const floating[::1] x, Py_ssize_t outer, Py_ssize_t C, Py_ssize_t inner,
                  double[::1] mean_out, double[::1] m2_out, int n_threads):
    """Rows layout with short rows and many samples (e.g. 256x2048x7x7): one partial per chunk of
    samples and channel (shifted sums, see bnf_slab_mom), chunks merged with Chan's formula."""
    cdef Py_ssize_t nq = outer if outer < MAX_SLAB_CHUNKS else MAX_SLAB_CHUNKS
    cdef double[::1] cmean = np.empty(nq * C, dtype=np.float64)
    cdef double[::1] cm2 = np.empty(nq * C, dtype=np.float64)
    cdef double[::1] cs1 = np.empty(nq * C, dtype=np.float64)
    cdef double[::1] ccount = np.empty(nq, dtype=np.float64)
    cdef const floating* xp = &x[0]
    cdef Py_ssize_t q, n0, n1, c
    cdef double cnt, s1, v
    with nogil:
        for q in prange(nq, schedule='dynamic', chunksize=1, num_threads=n_threads):
            n0 = q * outer // nq
            n1 = (q + 1) * outer // nq
            if floating is float:
                bnf_slab_mom_f(xp + n0 * C * inner, n1 - n0, C, inner, &cmean[q * C],
                               &cs1[q * C], &cm2[q * C])
            else:
                bnf_slab_mom_d(xp + n0 * C * inner, n1 - n0, C, inner, &cmean[q * C],
                               &cs1[q * C], &cm2[q * C])
            cnt = <double>((n1 - n0) * inner)
            ccount[q] = cnt
            for c in range(C):
                s1 = cs1[q * C + c]
                cmean[q * C + c] = cmean[q * C + c] + s1 / cnt
                v = cm2[q * C + c] - s1 * s1 / cnt
                cm2[q * C + c] = v if v > 0 else 0.0
        _merge_chunk_moments(cmean, cm2, ccount, nq, C, mean_out, m2_out)


# ----------------------------------------------------------------------------------------------
# Element-wise inner loops. On this kind of machine (a VM whose hardware prefetchers keep few
# lines in flight) streaming loops run at about half the memory bandwidth unless they prefetch
# ahead in software, so they are written in C: one 64-byte line per step, a read prefetch of
# each input and a write prefetch of the output BNF_PF_DIST bytes ahead, and the arithmetic on
# GCC/Clang vectors (same expression, same rounding as the scalar fallback).

cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define BNF_PF_R(p) __builtin_prefetch((const char*)(p) + BNF_PF_DIST, 0)
    #define BNF_PF_W(p) __builtin_prefetch((char*)(p) + BNF_PF_DIST, 1)
    #define BNF_EW_FNS(SUF, T)                                                           \
    typedef T bnf_vec_##SUF __attribute__((vector_size(32)));                            \
    enum { BNF_STEP_##SUF = 64 / sizeof(T), BNF_HALF_##SUF = 32 / sizeof(T) };           \
    static inline bnf_vec_##SUF bnf_ldv_##SUF(const T* p) {                              \
        bnf_vec_##SUF v; memcpy(&v, p, 32); return v; }                                  \
    static inline void bnf_stv_##SUF(T* p, bnf_vec_##SUF v) { memcpy(p, &v, 32); }       \
    static void bnf_affine_##SUF(const T* x, T* y, Py_ssize_t n, T m, T s, T t) {        \
        Py_ssize_t j = 0, h;                                                             \
        for (; j + BNF_STEP_##SUF <= n; j += BNF_STEP_##SUF) {                           \
            BNF_PF_R(x + j); BNF_PF_W(y + j);                                            \
            for (h = 0; h < BNF_STEP_##SUF; h += BNF_HALF_##SUF)                         \
                bnf_stv_##SUF(y + j + h, (bnf_ldv_##SUF(x + j + h) - m) * s + t);        \
        }                                                                                \
        for (; j < n; j++) y[j] = (x[j] - m) * s + t;                                    \
    }                                                                                    \
    static void bnf_affine_p_##SUF(const T* x, T* y, Py_ssize_t n, const T* m,          \
                                   const T* s, const T* t) {                             \
        Py_ssize_t j = 0, h;                                                             \
        for (; j + BNF_STEP_##SUF <= n; j += BNF_STEP_##SUF) {                           \
            BNF_PF_R(x + j); BNF_PF_W(y + j);                                            \
            for (h = j; h < j + BNF_STEP_##SUF; h += BNF_HALF_##SUF)                     \
                bnf_stv_##SUF(y + h, (bnf_ldv_##SUF(x + h) - bnf_ldv_##SUF(m + h))       \
                              * bnf_ldv_##SUF(s + h) + bnf_ldv_##SUF(t + h));            \
        }                                                                                \
        for (; j < n; j++) y[j] = (x[j] - m[j]) * s[j] + t[j];                           \
    }                                                                                    \
    static void bnf_bwd_##SUF(const T* g, const T* x, T* y, Py_ssize_t n, T m, T a,      \
                              T b, T d) {                                                \
        Py_ssize_t j = 0, h;                                                             \
        for (; j + BNF_STEP_##SUF <= n; j += BNF_STEP_##SUF) {                           \
            BNF_PF_R(g + j); BNF_PF_R(x + j); BNF_PF_W(y + j);                           \
            for (h = j; h < j + BNF_STEP_##SUF; h += BNF_HALF_##SUF)                     \
                bnf_stv_##SUF(y + h, bnf_ldv_##SUF(g + h) * a                            \
                              + (bnf_ldv_##SUF(x + h) - m) * b + d);                     \
        }                                                                                \
        for (; j < n; j++) y[j] = g[j] * a + (x[j] - m) * b + d;                         \
    }                                                                                    \
    static void bnf_bwd_p_##SUF(const T* g, const T* x, T* y, Py_ssize_t n,             \
                                const T* m, const T* a, const T* b, const T* d) {        \
        Py_ssize_t j = 0, h;                                                             \
        for (; j + BNF_STEP_##SUF <= n; j += BNF_STEP_##SUF) {                           \
            BNF_PF_R(g + j); BNF_PF_R(x + j); BNF_PF_W(y + j);                           \
            for (h = j; h < j + BNF_STEP_##SUF; h += BNF_HALF_##SUF)                     \
                bnf_stv_##SUF(y + h, bnf_ldv_##SUF(g + h) * bnf_ldv_##SUF(a + h)         \
                              + (bnf_ldv_##SUF(x + h) - bnf_ldv_##SUF(m + h))            \
                                * bnf_ldv_##SUF(b + h) + bnf_ldv_##SUF(d + h));          \
        }                                                                                \
        for (; j < n; j++) y[j] = g[j] * a[j] + (x[j] - m[j]) * b[j] + d[j];             \
    }
    #else
    #define BNF_PF_R(p) ((void)0)
    #define BNF_EW_FNS(SUF, T)                                                           \
    static void bnf_affine_##SUF(const T* x, T* y, Py_ssize_t n, T m, T s, T t) {        \
        Py_ssize_t j; for (j = 0; j < n; j++) y[j] = (x[j] - m) * s + t; }               \
    static void bnf_affine_p_##SUF(const T* x, T* y, Py_ssize_t n, const T* m,          \
                                   const T* s, const T* t) {                             \
        Py_ssize_t j; for (j = 0; j < n; j++) y[j] = (x[j] - m[j]) * s[j] + t[j]; }      \
    static void bnf_bwd_##SUF(const T* g, const T* x, T* y, Py_ssize_t n, T m, T a,      \
                              T b, T d) {                                                \
        Py_ssize_t j; for (j = 0; j < n; j++) y[j] = g[j] * a + (x[j] - m) * b + d; }    \
    static void bnf_bwd_p_##SUF(const T* g, const T* x, T* y, Py_ssize_t n,             \
                                const T* m, const T* a, const T* b, const T* d) {        \
        Py_ssize_t j;                                                                    \
        for (j = 0; j < n; j++) y[j] = g[j] * a[j] + (x[j] - m[j]) * b[j] + d[j]; }
    #endif
    BNF_EW_FNS(f, float)
    BNF_EW_FNS(d, double)
    """
    void bnf_affine_f(const float* x, float* y, Py_ssize_t n, float m, float s, float t) noexcept nogil
    void bnf_affine_d(const double* x, double* y, Py_ssize_t n, double m, double s, double t) noexcept nogil
    void bnf_affine_p_f(const float* x, float* y, Py_ssize_t n, const float* m, const float* s,
                        const float* t) noexcept nogil
    void bnf_affine_p_d(const double* x, double* y, Py_ssize_t n, const double* m,
                        const double* s, const double* t) noexcept nogil
    void bnf_bwd_f(const float* g, const float* x, float* y, Py_ssize_t n, float m, float a,
                   float b, float d) noexcept nogil
    void bnf_bwd_d(const double* g, const double* x, double* y, Py_ssize_t n, double m,
                   double a, double b, double d) noexcept nogil
    void bnf_bwd_p_f(const float* g, const float* x, float* y, Py_ssize_t n, const float* m,
                     const float* a, const float* b, const float* d) noexcept nogil
    void bnf_bwd_p_d(const double* g, const double* x, double* y, Py_ssize_t n,
                     const double* m, const double* a, const double* b,
                     const double* d) noexcept nogil


# ----------------------------------------------------------------------------------------------
# Element-wise affine pass: y = (x - m_hi[c]) * s[c] + t[c]  (one read, one write).

def affine_rows(const floating[::1] x, Py_ssize_t outer, Py_ssize_t C, Py_ssize_t inner,
                Py_ssize_t c0, Py_ssize_t c1, const floating[::1] m_hi, const floating[::1] s,
                const floating[::1] t, floating[::1] out, int n_threads):
    cdef Py_ssize_t nb = _blocks_per_row(inner)
    cdef Py_ssize_t nc = c1 - c0
    cdef Py_ssize_t n_units = outer * nc * nb
    cdef const floating* xp = &x[0]
    cdef floating* yp = &out[0]
    cdef Py_ssize_t u, c, start, length, j
    with nogil:
        for u in prange(n_units, schedule='static', num_threads=n_threads):
            c = 0  # assigned in the loop body so that Cython makes c / length thread-private
            length = 0
            start = _unit_span(u, nb, c0, nc, C, inner, &c, &length)
            if floating is float:
                bnf_affine_f(xp + start, yp + start, length, m_hi[c], s[c], t[c])
            else:
                bnf_affine_d(xp + start, yp + start, length, m_hi[c], s[c], t[c])


def affine_cols(const floating[::1] x, Py_ssize_t rows, Py_ssize_t C,
                const floating[::1] m_hi_p, const floating[::1] s_p, const floating[::1] t_p,
                floating[::1] out, int n_threads):
    """m_hi_p / s_p / t_p are the per-channel values tiled to one segment (length k*C)."""
    cdef Py_ssize_t k = cols_segment_rows(C)
    cdef Py_ssize_t P = k * C
    cdef Py_ssize_t total = rows * C
    cdef Py_ssize_t nseg = (rows + k - 1) // k
    cdef const floating* xp = &x[0]
    cdef floating* yp = &out[0]
    cdef const floating* mp = &m_hi_p[0]
    cdef const floating* sp = &s_p[0]
    cdef const floating* tp = &t_p[0]
    cdef Py_ssize_t sg, base, length, j
    with nogil:
        for sg in prange(nseg, schedule='static', num_threads=n_threads):
            base = sg * P
            length = total - base
            if length > P:
                length = P
            if floating is float:
                bnf_affine_p_f(xp + base, yp + base, length, mp, sp, tp)
            else:
                bnf_affine_p_d(xp + base, yp + base, length, mp, sp, tp)


# ----------------------------------------------------------------------------------------------
# Backward reductions: per channel sum(dy) and sum(dy * (x - mean)), float64.

def dot_slabs(const floating[::1] dy, const floating[::1] x, Py_ssize_t outer, Py_ssize_t C,
              Py_ssize_t inner, const double[::1] mean, double[::1] sum_dy_out,
              double[::1] sum_dyxc_out, int n_threads):
    """Backward reduction for short rows: one partial per (chunk of samples, channel)."""
    cdef Py_ssize_t nq = outer if outer < MAX_SLAB_CHUNKS else MAX_SLAB_CHUNKS
    cdef double[::1] c1 = np.zeros(nq * C, dtype=np.float64)
    cdef double[::1] c2 = np.zeros(nq * C, dtype=np.float64)
    cdef const floating* xp = &x[0]
    cdef const floating* gp = &dy[0]
    cdef Py_ssize_t q, n, c, start
    cdef double a1, a2
    with nogil:
        for q in prange(nq, schedule='dynamic', chunksize=1, num_threads=n_threads):
            for n in range(q * outer // nq, (q + 1) * outer // nq):
                for c in range(C):
                    start = (n * C + c) * inner
                    a2 = 0  # assigned here so that Cython makes it thread-private
                    a1 = _run_sum_dot_centred(gp + start, xp + start, inner, mean[c], &a2)
                    c1[q * C + c] = c1[q * C + c] + a1
                    c2[q * C + c] = c2[q * C + c] + a2
        _merge_chunk_sums(c1, c2, nq, C, sum_dy_out, sum_dyxc_out)


# One sweep of the cols backward reduction over four consecutive segments (4P values of dy and x):
# per position, a1 += sum of the four dy, a2 += sum of the four dy * (x - mean). Each segment is
# its own stream, and for C = 1024 each is exactly one 4 KiB page, where hardware prefetchers
# stop; so the next sweep's four segments are prefetched in software while this one runs
# (reduction after torch's backward: 32x56x56x64 NHWC 2.4-3.0 -> 2.2-2.5 ms, 32x224x224x3
# 2.1-2.3 -> 1.9-2.0 ms; 4096x1024 unchanged; without the prefetch the C loop is no faster than
# the Cython one).
cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define BNF_SWEEP_FNS(SUF, T, LD)                                                    \
    static void bnf_dot_sweep4_##SUF(const T* g, const T* x, Py_ssize_t P,               \
                                     const double* mt, double* a1, double* a2) {         \
        Py_ssize_t j = 0, r;                                                             \
        for (; j + 4 <= P; j += 4) {                                                     \
            bnf_v4d m, g0, g1, g2, g3, s, d;                                             \
            if ((j & 15) == 0)                                                           \
                for (r = 4; r < 8; r++) {                                                \
                    __builtin_prefetch(g + r * P + j); __builtin_prefetch(x + r * P + j); \
                }                                                                        \
            m = bnf_ld_d(mt + j);                                                        \
            g0 = LD(g + j); g1 = LD(g + P + j); g2 = LD(g + 2 * P + j);                  \
            g3 = LD(g + 3 * P + j);                                                      \
            s = bnf_ld_d(a1 + j) + ((g0 + g1) + (g2 + g3));                              \
            memcpy(a1 + j, &s, 32);                                                      \
            d = bnf_ld_d(a2 + j) + ((g0 * (LD(x + j) - m) + g1 * (LD(x + P + j) - m))     \
                                    + (g2 * (LD(x + 2 * P + j) - m)                      \
                                       + g3 * (LD(x + 3 * P + j) - m)));                 \
            memcpy(a2 + j, &d, 32);                                                      \
        }                                                                                \
        for (; j < P; j++) {                                                             \
            double h0 = g[j], h1 = g[P + j], h2 = g[2 * P + j], h3 = g[3 * P + j];       \
            a1[j] += (h0 + h1) + (h2 + h3);                                              \
            a2[j] += (h0 * (x[j] - mt[j]) + h1 * (x[P + j] - mt[j]))                     \
                     + (h2 * (x[2 * P + j] - mt[j]) + h3 * (x[3 * P + j] - mt[j]));      \
        }                                                                                \
    }
    #else
    #define BNF_SWEEP_FNS(SUF, T, LD)                                                    \
    static void bnf_dot_sweep4_##SUF(const T* g, const T* x, Py_ssize_t P,               \
                                     const double* mt, double* a1, double* a2) {         \
        Py_ssize_t j;                                                                    \
        for (j = 0; j < P; j++) {                                                        \
            double h0 = g[j], h1 = g[P + j], h2 = g[2 * P + j], h3 = g[3 * P + j];       \
            a1[j] += (h0 + h1) + (h2 + h3);                                              \
            a2[j] += (h0 * (x[j] - mt[j]) + h1 * (x[P + j] - mt[j]))                     \
                     + (h2 * (x[2 * P + j] - mt[j]) + h3 * (x[3 * P + j] - mt[j]));      \
        }                                                                                \
    }
    #endif
    BNF_SWEEP_FNS(f, float, bnf_ld_f)
    BNF_SWEEP_FNS(d, double, bnf_ld_d)
    """
    void bnf_dot_sweep4_f(const float* g, const float* x, Py_ssize_t P, const double* mt,
                          double* a1, double* a2) noexcept nogil
    void bnf_dot_sweep4_d(const double* g, const double* x, Py_ssize_t P, const double* mt,
                          double* a1, double* a2) noexcept nogil


def dot_cols(const floating[::1] dy, const floating[::1] x, Py_ssize_t rows, Py_ssize_t C,
             const double[::1] mean_p, double[::1] sum_dy_out, double[::1] sum_dyxc_out,
             int n_threads):
    """mean_p: the float64 channel means tiled to one segment (length k*C)."""
    cdef Py_ssize_t k = cols_segment_rows(C)
    cdef Py_ssize_t P = k * C
    cdef Py_ssize_t nseg = (rows + k - 1) // k
    cdef Py_ssize_t nq = _n_chunks(nseg)
    cdef double[:, ::1] scratch = np.empty((max(n_threads, 1), 3 * (P + PAD)), dtype=np.float64)
    cdef double[::1] c1 = np.empty(nq * C, dtype=np.float64)
    cdef double[::1] c2 = np.empty(nq * C, dtype=np.float64)
    cdef const floating* xp = &x[0]
    cdef const floating* gp = &dy[0]
    cdef const double* mp = &mean_p[0]
    cdef Py_ssize_t q, s, s0, s1, j, t, c, base, length
    cdef double* mt
    cdef double* a1
    cdef double* a2
    cdef double g, g1, g2, g3, S1, S2
    with nogil:
        for q in prange(nq, schedule='dynamic', chunksize=1, num_threads=n_threads):
            mt = &scratch[threadid(), 0]  # private copy of mean_p, see PAD
            a1 = mt + (P + PAD)
            a2 = a1 + (P + PAD)
            s0 = q * nseg // nq
            s1 = (q + 1) * nseg // nq
            for j in range(P):
                mt[j] = mp[j]
                a1[j] = 0
                a2[j] = 0
            s = s0
            while s + 4 <= s1 and (s + 4) * P <= rows * C:
                base = s * P
                if floating is float:
                    bnf_dot_sweep4_f(gp + base, xp + base, P, mt, a1, a2)
                else:
                    bnf_dot_sweep4_d(gp + base, xp + base, P, mt, a1, a2)
                s = s + 4
            while s < s1:
                base = s * P
                length = rows * C - base
                if length > P:
                    length = P
                for j in range(length):
                    g = gp[base + j]
                    a1[j] += g
                    a2[j] += g * (xp[base + j] - mt[j])
                s = s + 1
            for c in range(C):
                S1 = 0
                S2 = 0
                for t in range(k):
                    S1 = S1 + a1[t * C + c]
                    S2 = S2 + a2[t * C + c]
                c1[q * C + c] = S1
                c2[q * C + c] = S2
        _merge_chunk_sums(c1, c2, nq, C, sum_dy_out, sum_dyxc_out)


# ----------------------------------------------------------------------------------------------
# Backward element-wise pass: dx = dy * a[c] + (x - m_hi[c]) * b[c] + d[c].

def bwd_rows(const floating[::1] dy, const floating[::1] x, Py_ssize_t outer, Py_ssize_t C,
             Py_ssize_t inner, Py_ssize_t c0, Py_ssize_t c1, const floating[::1] m_hi,
             const floating[::1] a, const floating[::1] bcoef, const floating[::1] d,
             floating[::1] out, int n_threads):
    cdef Py_ssize_t nb = _blocks_per_row(inner)
    cdef Py_ssize_t nc = c1 - c0
    cdef Py_ssize_t n_units = outer * nc * nb
    cdef const floating* xp = &x[0]
    cdef const floating* gp = &dy[0]
    cdef floating* op = &out[0]
    cdef Py_ssize_t u, c, start, length, j
    with nogil:
        for u in prange(n_units, schedule='static', num_threads=n_threads):
            c = 0  # assigned in the loop body so that Cython makes c / length thread-private
            length = 0
            start = _unit_span(u, nb, c0, nc, C, inner, &c, &length)
            if floating is float:
                bnf_bwd_f(gp + start, xp + start, op + start, length, m_hi[c], a[c], bcoef[c],
                          d[c])
            else:
                bnf_bwd_d(gp + start, xp + start, op + start, length, m_hi[c], a[c], bcoef[c],
                          d[c])


# Fused backward for the rows layout, software-pipelined. The reduction (sum(dy),
# sum(dy * (x - mean)) per channel) must be complete before a channel's dx can be written, so the
# channels are taken in stages of G: stage k reduces channels [kG, kG + G) *in the same loop* that
# writes the dx of stage k - 1, whose dy and x the same core read one stage earlier and still
# holds in L2. Reads from memory and dx writes are then in flight together, which this machine
# serves much better than a read phase followed by a write phase (32x64x56x56 right after
# PyTorch's backward: 3.7-3.9 -> 3.1-3.3 ms). G is chosen by the caller so that a thread's share
# of a stage is a few hundred KB (two stages plus the dx lines fit in L2).
#
# Work inside a stage is split evenly; a thread that finishes its share takes unclaimed units
# from the others' (one atomic counter per thread and stage), and a stage waits only for the
# reduction of the stage before it. So a thread that loses its core to another process does not
# stall the others at a barrier for every stage: with one core busy elsewhere, 32x64x56x56 takes
# ~8 ms, as the earlier one-channel-per-thread kernel did, instead of ~22 ms with barriers.
#
# Every channel's sums add its units' partials in the fixed order (n, b), whoever computed them,
# so the result does not depend on the thread count or on G. bnf_bwd_coef is also the
# coefficient math of the other layouts (bwd_coefficients).
cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #endif
    #if defined(__GNUC__) || defined(__clang__)
    /* sum(dy), sum(dy * (x - m)) over one unit (bit-identical to bnf_sum_dot) while writing
       the dx of another unit of the same length (bit-identical to bnf_bwd). */
    #define BNF_SUMDOT_BWD_FN(SUF, T, LD)                                                \
    static inline void bnf_dx16_##SUF(const T* g, const T* x, T* y, bnf_vec_##SUF m,     \
            bnf_vec_##SUF a, bnf_vec_##SUF b, bnf_vec_##SUF d) {                         \
        Py_ssize_t h;                                                                    \
        BNF_PF_W(y);                                                                     \
        for (h = 0; h < 16; h += BNF_HALF_##SUF)                                         \
            bnf_stv_##SUF(y + h, bnf_ldv_##SUF(g + h) * a + (bnf_ldv_##SUF(x + h) - m) * b \
                          + d);                                                          \
    }                                                                                    \
    static double bnf_sumdot_bwd_##SUF(const T* dy, const T* x, Py_ssize_t n, double m,  \
            double* dot, const T* g2, const T* x2, T* y2, T m2, T ca, T cb, T cd) {      \
        double s;                                                                        \
        Py_ssize_t h;                                                                    \
        bnf_vec_##SUF mv2, av, bv, dv;                                                   \
        for (h = 0; h < BNF_HALF_##SUF; h++) {                                           \
            mv2[h] = m2; av[h] = ca; bv[h] = cb; dv[h] = cd; }                           \
        BNF_SUMDOT_BODY(LD, bnf_dx16_##SUF(g2 + j, x2 + j, y2 + j, mv2, av, bv, dv), s)  \
        for (; j < n; j++) y2[j] = g2[j] * ca + (x2[j] - m2) * cb + cd;                  \
        return s;                                                                        \
    }
    /* Work sharing: claim a unit from a counter, publish a finished stage, wait for one. */
    #define BNF_STEALING 1
    #define BNF_CLAIM(p) __atomic_fetch_add((p), 1, __ATOMIC_RELAXED)
    #define BNF_PUBLISH(p, n) __atomic_fetch_add((p), (n), __ATOMIC_RELEASE)
    #define BNF_STAGE_DONE(p, n) (__atomic_load_n((p), __ATOMIC_ACQUIRE) >= (n))
    #if defined(__x86_64__) || defined(__i386__)
    #define BNF_PAUSE() __builtin_ia32_pause()
    #else
    #define BNF_PAUSE() ((void)0)
    #endif
    #else
    #define BNF_SUMDOT_BWD_FN(SUF, T, LD)                                                \
    static double bnf_sumdot_bwd_##SUF(const T* dy, const T* x, Py_ssize_t n, double m,  \
            double* dot, const T* g2, const T* x2, T* y2, T m2, T ca, T cb, T cd) {      \
        bnf_bwd_##SUF(g2, x2, y2, n, m2, ca, cb, cd);                                    \
        return bnf_sum_dot_##SUF(dy, x, n, m, dot);                                      \
    }
    /* No portable atomics here: each thread does only its own share and stages end in a
       barrier (same results, no work taking). */
    #define BNF_STEALING 0
    #define BNF_CLAIM(p) ((*(p))++)
    #define BNF_PUBLISH(p, n) ((void)(n))
    #define BNF_STAGE_DONE(p, n) ((void)(p), (void)(n), 1)
    #define BNF_PAUSE() ((void)0)
    #endif
    #if defined(__unix__) || defined(__APPLE__)
    #include <sched.h>
    #define BNF_YIELD() sched_yield()
    #else
    #define BNF_YIELD() ((void)0)
    #endif
    BNF_SUMDOT_BWD_FN(f, float, bnf_ld_f)
    BNF_SUMDOT_BWD_FN(d, double, bnf_ld_d)
    /* Elements from one thread's coefficient scratch to the next beyond 4 G (no false sharing). */
    #define BNF_COEF_PAD 16
    /* Counters from one thread's claim counter to the next (128 bytes: no false sharing). */
    #define BNF_CLAIM_STRIDE 16
    #define BNF_FUSED_FNS(SUF, T)                                                        \
    static void bnf_bwd_coef_##SUF(double s1, double s2, double w, double mean,          \
                                   double invstd, double cnt, T* m_hi, T* a, T* b,       \
                                   T* d) {                                               \
        double dweight = s2 * invstd, aa = w * invstd;                                   \
        double bb = -aa * invstd * (dweight / cnt);                                      \
        T mh = (T)mean;                                                                  \
        *m_hi = mh; *a = (T)aa; *b = (T)bb;                                              \
        *d = (T)(-aa * (s1 / cnt) + bb * ((double)mh - mean));                           \
    }                                                                                    \
    /* Item i of a step: unit i of the reduction of stage kr (gk channels, item -> unit    \
       i / gk of channel kr G + i % gk, so a thread's share is contiguous in memory) and    \
       unit i of the dx of stage kd (gd channels), each if it exists. */                    \
    static void bnf_pipe_item_##SUF(const T* g, const T* x, T* y, Py_ssize_t C,          \
            Py_ssize_t inner, Py_ssize_t block, Py_ssize_t nb, Py_ssize_t nu,            \
            Py_ssize_t G, Py_ssize_t kr, Py_ssize_t kd, Py_ssize_t i, Py_ssize_t gk,     \
            Py_ssize_t gd, const double* mean, double* p1, double* p2, const T* mh,      \
            const T* a, const T* b, const T* d) {                                        \
        int red = i < gk * nu, tr = i < gd * nu;                                         \
        Py_ssize_t c = 0, cd = 0, u = 0, ud, st = 0, sd = 0, ln = 0, lnd = -1;           \
        if (red) {                                                                       \
            u = i / gk; c = kr * G + i % gk;                                             \
            ln = inner - (u % nb) * block; if (ln > block) ln = block;                   \
            st = ((u / nb) * C + c) * inner + (u % nb) * block;                          \
        }                                                                                \
        if (tr) {                                                                        \
            ud = i / gd; cd = i % gd;                                                    \
            lnd = inner - (ud % nb) * block; if (lnd > block) lnd = block;               \
            sd = ((ud / nb) * C + kd * G + cd) * inner + (ud % nb) * block;              \
        }                                                                                \
        if (red && tr && ln == lnd)                                                      \
            p1[u * C + c] = bnf_sumdot_bwd_##SUF(g + st, x + st, ln, mean[c],            \
                &p2[u * C + c], g + sd, x + sd, y + sd, mh[cd], a[cd], b[cd], d[cd]);    \
        else {                                                                           \
            if (red) p1[u * C + c] = bnf_sum_dot_##SUF(g + st, x + st, ln, mean[c],      \
                                                        &p2[u * C + c]);                 \
            if (tr) bnf_bwd_##SUF(g + sd, x + sd, y + sd, lnd, mh[cd], a[cd], b[cd],     \
                                  d[cd]);                                                \
        }                                                                                \
    }                                                                                    \
    static void bnf_bwd_fused_##SUF(const T* g, const T* x, T* y, Py_ssize_t outer,      \
            Py_ssize_t C, Py_ssize_t inner, Py_ssize_t block, Py_ssize_t G,              \
            const double* mean, const double* w, const double* invstd, double cnt,       \
            double* p1, double* p2, double* out1, double* out2, long long* claim,        \
            long long* done, T* coef, int overlap, int nt) {                             \
        Py_ssize_t nb = (inner + block - 1) / block, nu = outer * nb;                    \
        Py_ssize_t ns = (C + G - 1) / G, nsteps = overlap ? ns + 1 : 2 * ns;             \
        /* items per claim: a claim covers >= 4096 values, so short rows (16 x 16) do not    \
           pay an atomic per row */                                                       \
        Py_ssize_t per = (inner < block ? (block + inner - 1) / inner : 1);              \
        BNF_OMP_PARALLEL                                                                 \
        {                                                                                \
            int nth = 1, t = 0, o, q, spins;                                             \
            Py_ssize_t k, kr, kd, j, cd, u, gk, gd, n = 0, nprev, r0, r1;                \
            long long got, mine;                                                         \
            double s1, s2;                                                               \
            T *mh, *a, *b, *d;                                                           \
            BNF_OMP_IDS(nth, t)                                                          \
            mh = coef + t * (4 * G + BNF_COEF_PAD); a = mh + G; b = a + G; d = b + G;    \
            /* step k: overlapped, reduce stage k and dx of stage k - 1; otherwise the    \
               reduction of stage k / 2 (k even), then its dx (k odd) */                  \
            for (k = 0; k < nsteps; k++) {                                               \
                kr = overlap ? (k < ns ? k : -1) : (k % 2 ? -1 : k / 2);                 \
                kd = overlap ? k - 1 : (k % 2 ? k / 2 : -1);                             \
                gk = kr < 0 ? 0 : (C - kr * G < G ? C - kr * G : G);                     \
                gd = kd < 0 ? 0 : (C - kd * G < G ? C - kd * G : G);                     \
                nprev = n; n = (gk > gd ? gk : gd) * nu;                                 \
                if (k > 0)                                                               \
                    for (spins = 0; !BNF_STAGE_DONE(&done[k - 1], nprev); spins++) {     \
                        if (spins < 4096) BNF_PAUSE(); else BNF_YIELD();                 \
                    }                                                                    \
                if (gd > 0) {                                                            \
                    for (j = 0; j < gd; j++) {                                           \
                        cd = kd * G + j; s1 = 0; s2 = 0;                                 \
                        for (u = 0; u < nu; u++) {                                       \
                            s1 = s1 + p1[u * C + cd]; s2 = s2 + p2[u * C + cd]; }        \
                        if (t == 0) { out1[cd] = s1; out2[cd] = s2; }                    \
                        bnf_bwd_coef_##SUF(s1, s2, w[cd], mean[cd], invstd[cd], cnt,     \
                                           &mh[j], &a[j], &b[j], &d[j]);                 \
                    }                                                                    \
                }                                                                        \
                mine = 0;                                                                \
                for (q = 0; q < (BNF_STEALING ? nth : 1); q++) {                         \
                    o = (t + q) % nth;                                                   \
                    r0 = o * n / nth; r1 = (o + 1) * n / nth;                            \
                    for (;;) {                                                           \
                        got = r0 + per * BNF_CLAIM(&claim[(k * nth + o) * BNF_CLAIM_STRIDE]); \
                        if (got >= r1) break;                                            \
                        for (j = got; j < got + per && j < r1; j++, mine++)              \
                            bnf_pipe_item_##SUF(g, x, y, C, inner, block, nb, nu, G, kr, \
                                                kd, j, gk, gd, mean, p1, p2, mh, a, b,   \
                                                d);                                      \
                    }                                                                    \
                }                                                                        \
                BNF_PUBLISH(&done[k], mine);                                             \
                if (!BNF_STEALING) { BNF_OMP_BARRIER }                                   \
            }                                                                            \
        }                                                                                \
    }
    #ifdef _OPENMP
    #define BNF_OMP_PARALLEL _Pragma("omp parallel num_threads(nt)")
    #define BNF_OMP_IDS(nth, t) nth = omp_get_num_threads(); t = omp_get_thread_num();
    #define BNF_OMP_BARRIER _Pragma("omp barrier")
    #else
    #define BNF_OMP_PARALLEL
    #define BNF_OMP_IDS(nth, t)
    #define BNF_OMP_BARRIER
    #endif
    BNF_FUSED_FNS(f, float)
    BNF_FUSED_FNS(d, double)
    """
    int BNF_COEF_PAD
    int BNF_CLAIM_STRIDE
    void bnf_bwd_coef_f(double s1, double s2, double w, double mean, double invstd, double cnt,
                        float* m_hi, float* a, float* b, float* d) noexcept nogil
    void bnf_bwd_coef_d(double s1, double s2, double w, double mean, double invstd, double cnt,
                        double* m_hi, double* a, double* b, double* d) noexcept nogil
    void bnf_bwd_fused_f(const float* g, const float* x, float* y, Py_ssize_t outer,
                         Py_ssize_t C, Py_ssize_t inner, Py_ssize_t block, Py_ssize_t G,
                         const double* mean, const double* w, const double* invstd, double cnt,
                         double* p1, double* p2, double* out1, double* out2, long long* claim,
                         long long* done, float* coef, int overlap, int nt) noexcept nogil
    void bnf_bwd_fused_d(const double* g, const double* x, double* y, Py_ssize_t outer,
                         Py_ssize_t C, Py_ssize_t inner, Py_ssize_t block, Py_ssize_t G,
                         const double* mean, const double* w, const double* invstd, double cnt,
                         double* p1, double* p2, double* out1, double* out2, long long* claim,
                         long long* done, double* coef, int overlap, int nt) noexcept nogil



def bwd_coefficients(const double[::1] sum_dy, const double[::1] sum_dyxc,
                     const double[::1] weight, const double[::1] mean, const double[::1] invstd,
                     double cnt, floating[::1] m_hi, floating[::1] a, floating[::1] bcoef,
                     floating[::1] d):
    """Per channel, dx = dy * a + (x - m_hi) * bcoef + d from the backward sums (float64 math,
    m_hi = the mean rounded to x's dtype, its residue folded into d)."""
    cdef Py_ssize_t c
    for c in range(sum_dy.shape[0]):
        if floating is float:
            bnf_bwd_coef_f(sum_dy[c], sum_dyxc[c], weight[c], mean[c], invstd[c], cnt, &m_hi[c],
                           &a[c], &bcoef[c], &d[c])
        else:
            bnf_bwd_coef_d(sum_dy[c], sum_dyxc[c], weight[c], mean[c], invstd[c], cnt, &m_hi[c],
                           &a[c], &bcoef[c], &d[c])


def bwd_fused_rows(const floating[::1] dy, const floating[::1] x, Py_ssize_t outer,
                   Py_ssize_t C, Py_ssize_t inner, const double[::1] mean,
                   const double[::1] weight, const double[::1] invstd, floating[::1] out,
                   double[::1] sum_dy_out, double[::1] sum_dyxc_out, int n_threads,
                   Py_ssize_t stage_channels, bint overlap):
    """Rows-layout backward in one parallel region over stages of stage_channels channels, each
    stage's reduction overlapped with the previous stage's dx or not (see bnf_bwd_fused): dx
    into out, per-channel sum(dy) and sum(dy * (x - mean)) into the two (C,) float64 outputs."""
    if not 1 <= stage_channels <= C:
        raise ValueError(f"stage_channels must be in [1, C={C}], got {stage_channels}")
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1, got {n_threads}")
    cdef Py_ssize_t n_units = outer * _blocks_per_row(inner)
    cdef Py_ssize_t n_steps = 2 * ((C + stage_channels - 1) // stage_channels) + 1
    cdef double[::1] p1 = np.empty(C * n_units, dtype=np.float64)
    cdef double[::1] p2 = np.empty(C * n_units, dtype=np.float64)
    # OpenMP may start fewer threads than asked for, never more: sized for n_threads.
    cdef long long[::1] claim = np.zeros(n_steps * n_threads * BNF_CLAIM_STRIDE,
                                            dtype=np.longlong)
    cdef long long[::1] done = np.zeros(n_steps, dtype=np.longlong)
    # per thread: m_hi, a, b, d for the channels of one stage
    cdef floating[::1] coef = np.empty(n_threads * (4 * stage_channels + BNF_COEF_PAD),
                                       dtype=np.float32 if floating is float else np.float64)
    cdef double cnt = <double>outer * <double>inner
    with nogil:
        if floating is float:
            bnf_bwd_fused_f(&dy[0], &x[0], &out[0], outer, C, inner, BLOCK, stage_channels,
                            &mean[0], &weight[0], &invstd[0], cnt, &p1[0], &p2[0],
                            &sum_dy_out[0], &sum_dyxc_out[0], &claim[0], &done[0], &coef[0],
                            overlap, n_threads)
        else:
            bnf_bwd_fused_d(&dy[0], &x[0], &out[0], outer, C, inner, BLOCK, stage_channels,
                            &mean[0], &weight[0], &invstd[0], cnt, &p1[0], &p2[0],
                            &sum_dy_out[0], &sum_dyxc_out[0], &claim[0], &done[0], &coef[0],
                            overlap, n_threads)


def bwd_cols(const floating[::1] dy, const floating[::1] x, Py_ssize_t rows, Py_ssize_t C,
             const floating[::1] m_hi_p, const floating[::1] a_p, const floating[::1] b_p,
             const floating[::1] d_p, floating[::1] out, int n_threads):
    cdef Py_ssize_t k = cols_segment_rows(C)
    cdef Py_ssize_t P = k * C
    cdef Py_ssize_t total = rows * C
    cdef Py_ssize_t nseg = (rows + k - 1) // k
    cdef const floating* xp = &x[0]
    cdef const floating* gp = &dy[0]
    cdef floating* op = &out[0]
    cdef const floating* mp = &m_hi_p[0]
    cdef const floating* ap = &a_p[0]
    cdef const floating* bp = &b_p[0]
    cdef const floating* dp = &d_p[0]
    cdef Py_ssize_t sg, base, length, j
    with nogil:
        for sg in prange(nseg, schedule='static', num_threads=n_threads):
            base = sg * P
            length = total - base
            if length > P:
                length = P
            if floating is float:
                bnf_bwd_p_f(gp + base, xp + base, op + base, length, mp, ap, bp, dp)
            else:
                bnf_bwd_p_d(gp + base, xp + base, op + base, length, mp, ap, bp, dp)
