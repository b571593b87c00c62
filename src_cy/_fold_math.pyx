# cython: language_level=3
"""Compiled helper of the fold pass: scale a weight per channel in float64 and round once.

Folding multiplies every weight of a layer by a per-output-channel factor. numpy can do it in
float64 only through buffered casts (slow on 100 MB of weights) and then needs a ``tobytes``
copy for the TensorProto; this loop reads float32/float64 weights, multiplies in float64, rounds
once and writes straight into a new bytes object that becomes the tensor's raw_data.
No validation here: bnfold.graph checks shapes and dtypes.
"""

cimport cython
from cython cimport floating
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cython.parallel cimport prange


cdef void _scale_last_axis(const floating* src, floating* dst, Py_ssize_t first, Py_ssize_t n, Py_ssize_t C,
                           const double* factor, int n_threads) noexcept nogil:
    # inner == 1: element i (global index first + i) is channel (first + i) % C; whole rows of C
    # elements get a vectorisable loop over the factors instead of a modulo per element
    cdef Py_ssize_t i, r, c, base
    cdef Py_ssize_t head = (C - first % C) % C
    if head > n:
        head = n
    for i in range(head):
        dst[i] = <floating>(<double>src[i] * factor[(first + i) % C])
    cdef Py_ssize_t n_full = (n - head) // C
    for r in prange(n_full, nogil=True, schedule="static", num_threads=n_threads):
        base = head + r * C
        for c in range(C):
            dst[base + c] = <floating>(<double>src[base + c] * factor[c])
    for i in range(head + n_full * C, n):
        dst[i] = <floating>(<double>src[i] * factor[(first + i) % C])


cdef void _scale(const floating* src, floating* dst, Py_ssize_t first_row, Py_ssize_t n_rows, Py_ssize_t C,
                 Py_ssize_t inner, const double* factor, int n_threads) noexcept nogil:
    # rows of ``inner`` values; row r (counted from first_row) belongs to channel r % C
    cdef Py_ssize_t row, j, base
    cdef double f
    if inner == 1 and C > 1:
        _scale_last_axis(src, dst, first_row, n_rows, C, factor, n_threads)
        return
    for row in prange(n_rows, nogil=True, schedule="static", num_threads=n_threads):
        f = factor[(first_row + row) % C]
        base = row * inner
        for j in range(inner):
            dst[base + j] = <floating>(<double>src[base + j] * f)


@cython.boundscheck(False)
@cython.wraparound(False)
def scale_channels_to_bytes(const unsigned char[::1] src, Py_ssize_t outer, Py_ssize_t C, Py_ssize_t inner,
                            const double[::1] factor, bint is_double, int n_threads):
    """Bytes of ``src`` (float32 or float64, seen as (outer, C, inner)) times ``factor[c]``,
    each product computed in float64 and rounded once to the source type."""
    cdef Py_ssize_t nbytes = src.shape[0]
    out = PyBytes_FromStringAndSize(NULL, nbytes)
    cdef char* dst = PyBytes_AS_STRING(out)
    if nbytes == 0:
        return out
    with nogil:
        if is_double:
            _scale(<const double*>&src[0], <double*>dst, 0, outer * C, C, inner, &factor[0], n_threads)
        else:
            _scale(<const float*>&src[0], <float*>dst, 0, outer * C, C, inner, &factor[0], n_threads)
    return out


@cython.boundscheck(False)
@cython.wraparound(False)
def scale_rows_into(const unsigned char[::1] src, unsigned char[::1] dst, Py_ssize_t first_row, Py_ssize_t C,
                    Py_ssize_t inner, const double[::1] factor, bint is_double, int n_threads):
    """Like ``scale_channels_to_bytes`` for a slice of whole rows: ``src`` holds rows
    ``first_row, first_row + 1, ...`` of ``inner`` values each (row r is channel r % C); their
    scaled values go to ``dst`` (same size)."""
    cdef Py_ssize_t nbytes = src.shape[0]
    cdef Py_ssize_t row_bytes = inner * (8 if is_double else 4)
    if dst.shape[0] != nbytes or row_bytes == 0 or nbytes % row_bytes:
        raise ValueError("src and dst must hold the same whole rows")
    if nbytes == 0:
        return
    with nogil:
        if is_double:
            _scale(<const double*>&src[0], <double*>&dst[0], first_row, nbytes // row_bytes, C, inner,
                   &factor[0], n_threads)
        else:
            _scale(<const float*>&src[0], <float*>&dst[0], first_row, nbytes // row_bytes, C, inner,
                   &factor[0], n_threads)
