"""Resolve the user's ``n_threads`` argument into the thread count handed to compiled kernels."""

from __future__ import annotations

import numbers

from bnfold._openmp import max_threads, openmp_enabled


def effective_n_threads(n_threads) -> int:
    """None -> all available threads (OMP_NUM_THREADS respected); a positive int is taken as is;
    0, negatives and non-integers are rejected. Without OpenMP every call is serial."""
    if n_threads is None:
        n = max_threads()
    elif isinstance(n_threads, bool) or not isinstance(n_threads, numbers.Integral):
        raise TypeError(f"n_threads must be None or a positive int, got {n_threads!r}")
    elif n_threads < 1:
        raise ValueError(f"n_threads must be None or >= 1, got {n_threads}")
    else:
        n = int(n_threads)
    return n if openmp_enabled() else 1
