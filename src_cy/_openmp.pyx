# cython: language_level=3
"""OpenMP facts for the Python layer: whether the kernels were built with OpenMP, and how many
threads a call will use (None -> all cores or OMP_NUM_THREADS, as the OpenMP runtime decides)."""

cdef extern from *:
    """
    #if BNFOLD_HAS_OPENMP
    #include <omp.h>
    static int bnfold_omp_enabled(void) { return 1; }
    static int bnfold_omp_max_threads(void) { return omp_get_max_threads(); }
    #else
    static int bnfold_omp_enabled(void) { return 0; }
    static int bnfold_omp_max_threads(void) { return 1; }
    #endif
    """
    int bnfold_omp_enabled()
    int bnfold_omp_max_threads()


def openmp_enabled():
    """True when the compiled kernels use OpenMP threads."""
    return bool(bnfold_omp_enabled())


def max_threads():
    """Threads a kernel call with n_threads=None uses (honours OMP_NUM_THREADS)."""
    return bnfold_omp_max_threads()
