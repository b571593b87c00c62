"""Resolve the user's ``n_threads`` argument into the thread count handed to compiled kernels."""

from __future__ import annotations

import numbers
import os

from bnfold._openmp import max_threads, openmp_enabled


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def effective_n_threads(n_threads) -> int:
    """None -> all available threads (OMP_NUM_THREADS respected); a positive int is taken as is;
    0, negatives and non-integers are rejected. Either way no more than the CPUs the process may
    run on: the kernels are bound by memory, so extra threads only wait for each other (the
    staged backward was 5-20x slower at 32-64 threads on 2 cores), and a huge count could make
    the OpenMP runtime fail to start its threads. Without OpenMP every call is serial."""
    if n_threads is None:
        n = max_threads()
    elif isinstance(n_threads, bool) or not isinstance(n_threads, numbers.Integral):
        raise TypeError(f"n_threads must be None or a positive int, got {n_threads!r}")
    elif n_threads < 1:
        raise ValueError(f"n_threads must be None or >= 1, got {n_threads}")
    else:
        n = int(n_threads)
    return min(n, available_cpus()) if openmp_enabled() else 1
