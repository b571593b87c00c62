# cython: language_level=3
"""OpenMP facts for the Python layer: whether the kernels were built with OpenMP, whether this
process may still start OpenMP threads, and how many threads a call will use (None -> all cores
or OMP_NUM_THREADS, as the OpenMP runtime decides).

Threads can be switched off for the rest of a process (``disable_threads``): bnfold._threads does
so in a child forked after the parent had started OpenMP threads, where GNU libgomp would wait
forever for the pool threads that fork() did not copy. From then on ``openmp_enabled()`` is False
and ``max_threads()`` is 1, so what bnfold reports matches what its kernels do.
"""

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


# Set once in a process and never cleared: a libgomp thread pool broken by fork() stays broken.
cdef bint _threads_disabled = False


def openmp_built():
    """True when the compiled kernels were built with OpenMP (whether or not this process may
    still use its threads)."""
    return bool(bnfold_omp_enabled())


def openmp_enabled():
    """True when the compiled kernels use OpenMP threads in this process: built with OpenMP, and
    threads not switched off (as they are in a child forked after bnfold had started threads)."""
    return bool(bnfold_omp_enabled()) and not _threads_disabled


def max_threads():
    """Threads a kernel call with n_threads=None uses (honours OMP_NUM_THREADS); 1 once threads
    are switched off."""
    return 1 if _threads_disabled else bnfold_omp_max_threads()


def runtime_max_threads():
    """What the OpenMP runtime itself would give a parallel region (omp_get_max_threads(); 1
    without OpenMP), even where bnfold has switched threads off. Reading it starts no thread, so
    it is safe in a forked child."""
    return bnfold_omp_max_threads()


def threads_disabled():
    """True once ``disable_threads`` has been called in this process (or in the parent it was
    forked from after the call)."""
    return bool(_threads_disabled)


def disable_threads():
    """Run every kernel of this process on the calling thread from now on (for good)."""
    global _threads_disabled
    _threads_disabled = True
