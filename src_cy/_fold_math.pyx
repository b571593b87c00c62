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


cdef void _scale(const floating* src, floating* dst, Py_ssize_t outer, Py_ssize_t C, Py_ssize_t inner,
                 const double* factor, int n_threads) noexcept nogil:
    cdef Py_ssize_t row, j, base
    cdef double f
    for row in prange(outer * C, nogil=True, schedule="static", num_threads=n_threads):
        f = factor[row % C]
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
            _scale(<const double*>&src[0], <double*>dst, outer, C, inner, &factor[0], n_threads)
        else:
            _scale(<const float*>&src[0], <float*>dst, outer, C, inner, &factor[0], n_threads)
    return out
