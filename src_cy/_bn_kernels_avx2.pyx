# cython: language_level=3
"""The same kernels as bnfold._bn_kernels compiled for x86-64 CPUs with AVX2 and FMA.

Everything in this translation unit (including module init) is compiled for AVX2 + FMA, so
bnfold.kernels imports it only after checking that the CPU has both; elsewhere (other CPUs,
other compilers) the module is built as a plain copy and ``TARGET_AVX2`` tells the Python layer
not to prefer it.
"""

cdef extern from *:
    """
    #if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    #pragma GCC target("avx2,fma")
    #define BNFOLD_TARGET_AVX2 1
    #else
    #define BNFOLD_TARGET_AVX2 0
    #endif
    """
    int BNFOLD_TARGET_AVX2

TARGET_AVX2 = bool(BNFOLD_TARGET_AVX2)

include "_bn_kernels_impl.pxi"
